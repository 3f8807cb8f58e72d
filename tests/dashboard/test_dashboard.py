"""The fleet dashboard, driven in a real Chromium against real processes (see conftest).

Tests share one fleet; each leaves the nodes as it found them (nothing loaded) and saves a screenshot under its
temporary folder.
"""

import json
import os
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, Route, expect

from broker import keys
from tests.conftest import ALL_SECRETS, OPERATOR_KEY, READ_KEY, park, thaw, wait_for
from tests.dashboard.conftest import NODE_TOKEN, UNLOAD_TIMEOUT, Dash, model_row, node_card, shoot, sign_in
from workers.gguf_factory import write_tiny_llama, write_truncated_gguf


def seen(page: Page) -> list[str]:
    return page.evaluate("window.__seen")  # type: ignore[no-any-return]


def api_load(dash: Dash, fp: str, model: str) -> None:
    with dash.api.client() as client:
        response = client.post(f"/api/v1/nodes/{fp}/models/load", json={"modelId": model})
        assert response.status_code == 200, response.text


@contextmanager
def answering(dash: Dash, model: str) -> Iterator[None]:
    """A streamed prompt through the head, answered while the block runs (1,500 tokens of the endless model take
    well over ten seconds); its client leaves when the block ends."""
    prompt = {"model": model, "prompt": "Once upon a time", "stream": True, "max_tokens": 1500, "temperature": 0}
    with dash.api.client(READ_KEY) as client, client.stream("POST", "/v1/completions", json=prompt) as answer:
        assert answer.status_code == 200, answer.read()
        lines = answer.iter_lines()  # kept: a generator dropped would close the response, and the node would stop
        next(lines)
        yield


def unload_everything(dash: Dash) -> None:
    with dash.api.client() as client:
        for worker in (dash.a, dash.b):
            assert client.post(f"/api/v1/nodes/{worker.fingerprint}/models/unload-all").status_code == 200


def test_sign_in_load_with_the_keyboard_and_watch_loading_turn_loaded(dash: Dash, new_page, tmp_path: Path) -> None:
    page = new_page()
    sign_in(page, dash.api)
    expect(page.get_by_test_id("scope")).to_have_text("Operator")
    for name in ("node-a", "node-b"):
        expect(node_card(page, name)).to_have_attribute("data-online", "true")
    page.evaluate("window.__sameDocument = true")

    # Keyboard only: focus the node's load button, open the dialog, pick the file, give a context length, submit.
    node_card(page, "node-a").get_by_test_id("open-load").focus()
    page.keyboard.press("Enter")
    dialog = page.get_by_test_id("load-dialog")
    stories = dialog.get_by_role("radio", name="stories260K")
    expect(dialog.locator("label.file", has_text="stories260K")).to_contain_text("needs ~1.4 MiB")  # its estimate
    expect(dialog.locator("label.file", has_text="stories260K")).to_contain_text("fits now")
    stories.focus()
    page.keyboard.press("Space")
    expect(stories).to_be_checked()
    page.keyboard.press("Tab")
    expect(dialog.get_by_label("Context length")).to_be_focused()
    page.keyboard.type("256")
    shoot(page, tmp_path / "load-dialog.png")
    page.keyboard.press("Enter")

    row = model_row(page, "node-a", "stories260K")
    expect(row).to_have_attribute("data-state", "loaded")
    expect(row.locator("td").nth(2)).to_have_text("256")  # the context length asked for
    card = node_card(page, "node-a")
    expect(card.locator("code.fp")).to_have_text(dash.a.fingerprint[:12])
    expect(card.locator(".node-stats")).to_contain_text("1 model")
    memory = card.get_by_role("meter", name="Memory used on node-a")
    expect(memory).to_have_attribute("max", str(2 * 1024**3))  # its --memory-budget
    assert memory.evaluate("m => m.value") > 0
    marks = seen(page)
    assert marks.index("node-a/stories260K:loading") < marks.index("node-a/stories260K:loaded"), marks
    animations = page.evaluate("window.__animations")
    assert animations["node-a/stories260K:loading"] != "none" == animations["node-a/stories260K:loaded"], animations
    assert page.evaluate("window.__sameDocument") is True  # no reload happened
    expect(node_card(page, "node-a").get_by_test_id("notice")).to_contain_text("Loaded stories260K")
    expect(page.get_by_test_id("event-log").locator('[data-type="model-loaded"]')).to_contain_text("stories260K")
    expect(row).to_contain_text("1.1 MiB")  # its size

    page.get_by_test_id("tab-pool").click()
    pool_row = page.locator('[data-testid="pool-model"][data-model="stories260K"]')
    expect(pool_row.get_by_test_id("loaded-on")).to_have_text("node-a")
    page.get_by_test_id("tab-fleet").click()
    shoot(page, tmp_path / "fleet.png", "dashboard.png")
    unload_everything(dash)
    expect(row).to_have_count(0)


def test_unload_is_optimistic(dash: Dash, new_page, tmp_path: Path) -> None:
    api_load(dash, dash.b.fingerprint, "tiny-a")
    page = new_page()
    sign_in(page, dash.api)
    row = model_row(page, "node-b", "tiny-a")
    expect(row).to_have_attribute("data-state", "loaded")

    held: list[Route] = []
    page.route("**/models/unload", lambda route: held.append(route))  # the request waits here until the test lets it go
    row.get_by_test_id("unload").click()
    wait_for(lambda: held, 10, "the unload request")
    expect(row).to_have_count(0)  # gone before the server has even received the request
    expect(node_card(page, "node-b").get_by_test_id("operating")).to_contain_text("Unloading tiny-a")
    expect(node_card(page, "node-b").get_by_test_id("open-load")).to_be_disabled()
    shoot(page, tmp_path / "optimistic.png")
    held[0].continue_()
    expect(node_card(page, "node-b").get_by_test_id("notice")).to_contain_text("Unloaded tiny-a")
    expect(row).to_have_count(0)
    expect(node_card(page, "node-b").get_by_test_id("operating")).to_have_count(0)


def test_the_event_log_says_why_a_model_left(dash: Dash, new_page, tmp_path: Path) -> None:
    """A model unloaded by the node itself (its file written over, here) left the page with no word of why."""
    doomed = dash.b.models_dir / "doomed.gguf"
    write_tiny_llama(doomed)
    try:
        api_load(dash, dash.b.fingerprint, "doomed")
        page = new_page()
        sign_in(page, dash.api)
        row = model_row(page, "node-b", "doomed")
        expect(row).to_have_attribute("data-state", "loaded")
        write_truncated_gguf(doomed)  # in place, as cp does: the node unloads it at its next heartbeat
        expect(row).to_have_count(0, timeout=15_000)
        expect(page.get_by_test_id("event-log")).to_contain_text("doomed (file changed)")
        shoot(page, tmp_path / "file-changed.png")
    finally:
        doomed.unlink()


def test_a_refused_unload_is_rolled_back_with_its_error(dash: Dash, new_page, tmp_path: Path) -> None:
    api_load(dash, dash.b.fingerprint, "tiny-b")
    page = new_page()
    sign_in(page, dash.api)
    row = model_row(page, "node-b", "tiny-b")
    expect(row).to_have_attribute("data-state", "loaded")
    park(dash.fleet, dash.b)  # frozen but still online: the API gives up on the unload after UNLOAD_TIMEOUT
    try:
        row.get_by_test_id("unload").click()
        expect(row).to_have_count(0)
        notice = node_card(page, "node-b").get_by_test_id("notice")
        expect(notice).to_contain_text(
            f"Could not unload tiny-b: Node node-b did not finish the unload within {UNLOAD_TIMEOUT} seconds",
            timeout=(UNLOAD_TIMEOUT + 5) * 1000,
        )
        expect(row).to_have_attribute("data-state", "loaded")  # rolled back
        shoot(page, tmp_path / "rolled-back.png")
    finally:
        thaw(dash.b)
    unload_everything(dash)
    expect(row).to_have_count(0)


def test_a_model_that_fails_its_health_check_says_it_is_not_answering(dash: Dash, new_page, tmp_path: Path) -> None:
    """stories260K loaded with a one-token context loads, then fails its health check (no prompt fits): its row
    says that no prompts go to it. Loaded again as usual, it answers its check and the row says nothing more."""
    fp = dash.a.fingerprint
    with dash.api.client() as client:
        body = {"modelId": "stories260K", "contextLength": 1, "backend": "ctransformers"}
        response = client.post(f"/api/v1/nodes/{fp}/models/load", json=body)
        assert response.status_code == 200, response.text
    page = new_page()
    sign_in(page, dash.api)
    row = model_row(page, "node-a", "stories260K")
    expect(row).to_have_attribute("data-state", "loaded")
    expect(row.get_by_test_id("health")).to_contain_text("Not answering: it failed its health check")
    shoot(page, tmp_path / "not-answering.png")

    unload_everything(dash)
    expect(row).to_have_count(0)
    api_load(dash, fp, "stories260K")

    def healthy() -> bool:
        with dash.api.client() as client:
            listed = client.get(f"/api/v1/nodes/{fp}/models").json()["data"]
        return any(m["id"] == "stories260K" and m["healthy"] for m in listed)

    wait_for(healthy, 30, "the reloaded model to answer its check")
    expect(row).to_have_attribute("data-state", "loaded")
    expect(row.get_by_test_id("health")).to_have_count(0)
    unload_everything(dash)


def test_a_file_the_backend_refuses_shows_failed_with_its_reason(dash: Dash, new_page, tmp_path: Path) -> None:
    page = new_page(800, 900)
    sign_in(page, dash.api)
    node_card(page, "node-a").get_by_test_id("open-load").click()
    page.get_by_test_id("load-dialog").get_by_role("radio", name="headless").check()
    page.get_by_test_id("load-submit").click()
    row = model_row(page, "node-a", "headless")
    expect(row).to_have_attribute("data-state", "failed")
    expect(row.get_by_test_id("reason")).to_contain_text("could not load")
    expect(node_card(page, "node-a").get_by_test_id("notice")).to_contain_text("could not load")
    assert page.evaluate("document.documentElement.scrollWidth") <= 800  # readable at 800 px: no sideways scroll
    shoot(page, tmp_path / "failed-800px.png")


def test_a_corrupt_file_is_marked_in_the_catalog_and_its_load_shows_failed_with_the_reason(
    dash: Dash, new_page, tmp_path: Path
) -> None:
    cut = write_truncated_gguf(dash.a.models_dir / "cut.gguf")  # no header reader can parse it
    try:
        page = new_page(800, 900)
        sign_in(page, dash.api)
        node_card(page, "node-a").get_by_test_id("open-load").click()
        dialog = page.get_by_test_id("load-dialog")
        choice = dialog.locator("label.file", has=page.get_by_role("radio", name="cut"))
        expect(choice).to_contain_text("cannot load")  # the catalog says so before anyone tries
        problem = choice.locator(".fit.no").get_attribute("title")
        assert problem and "GGUF" in problem, problem
        dialog.get_by_role("radio", name="cut").check()
        page.get_by_test_id("load-submit").click()
        row = model_row(page, "node-a", "cut")
        expect(row).to_have_attribute("data-state", "failed")
        expect(row.get_by_test_id("reason")).to_have_text(problem)  # the node's own reason, as the catalog gave it
        shoot(page, tmp_path / "corrupt-failed.png")
    finally:
        cut.unlink()


def test_a_read_only_key_sees_everything_and_changes_nothing(dash: Dash, new_page, tmp_path: Path) -> None:
    with dash.api.client() as client:
        pinned = {"model_name": "tiny-a", "node": dash.b.fingerprint, "pin": True}
        assert client.post("/v1/models/load", json=pinned).status_code == 200
    page = new_page()
    sign_in(page, dash.api, READ_KEY)
    expect(page.get_by_test_id("scope")).to_have_text("Read-only")
    expect(page.get_by_test_id("read-only")).to_contain_text("operator key")
    row = model_row(page, "node-b", "tiny-a")
    expect(row).to_have_attribute("data-state", "loaded")
    expect(row.locator("td").nth(3)).to_have_text("pinned")
    for control in (
        node_card(page, "node-b").get_by_test_id("open-load"),
        node_card(page, "node-b").get_by_test_id("unload-all"),
        row.get_by_test_id("unload"),
    ):
        expect(control).to_be_disabled()
        expect(control).to_have_attribute(
            "title", "Read-only key: sign in with an operator key to load or unload models."
        )
    page.get_by_test_id("tab-pool").click()
    expect(page.get_by_test_id("pool-load").first).to_be_disabled()
    shoot(page, tmp_path / "read-only.png")

    # The session itself cannot change anything either, with or without the CSRF token.
    fp = dash.b.fingerprint
    statuses = page.evaluate(
        """async (fp) => {
            const session = await (await fetch('/api/v1/session')).json();
            const send = (headers) => fetch(`/api/v1/nodes/${fp}/models/unload`, {method: 'POST',
                headers: {'Content-Type': 'application/json', ...headers}, body: JSON.stringify({modelId: 'tiny-a'})});
            return [(await send({[session.csrfHeader]: session.csrfToken})).status, (await send({})).status];
        }""",
        fp,
    )
    assert statuses == [403, 403]
    page.get_by_test_id("tab-fleet").click()
    expect(row).to_have_attribute("data-state", "loaded")
    unload_everything(dash)


def test_a_second_browser_sees_the_first_ones_changes_live(dash: Dash, new_page, tmp_path: Path) -> None:
    first, second = new_page(), new_page(800, 900)
    sign_in(first, dash.api)
    sign_in(second, dash.api)
    first.get_by_test_id("tab-pool").click()
    first.locator('[data-testid="pool-model"][data-model="tiny-b"]').get_by_test_id("pool-load").click()
    row = model_row(second, "node-b", "tiny-b")
    expect(row).to_have_attribute("data-state", "loaded")  # placed automatically on the only node that has it
    second.get_by_test_id("tab-pool").click()
    expect(second.locator('[data-testid="pool-model"][data-model="tiny-b"]').get_by_test_id("loaded-on")).to_have_text(
        "node-b"
    )
    second.get_by_test_id("tab-fleet").click()

    first.get_by_test_id("tab-fleet").click()
    node_card(first, "node-b").get_by_test_id("unload-all").click()
    confirm = first.get_by_test_id("confirm-dialog")
    expect(confirm).to_contain_text("tiny-b will be unloaded")
    shoot(first, tmp_path / "confirm.png")
    confirm.get_by_test_id("confirm-unload-all").click()
    expect(row).to_have_count(0)
    expect(second.get_by_test_id("event-log").locator('[data-type="model-unloaded"]').first).to_contain_text("tiny-b")
    shoot(second, tmp_path / "second.png")


def test_a_killed_worker_goes_offline(dash: Dash, new_page, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    os.link(dash.a.models_dir / "endless.gguf", models / "long.gguf")  # a model that generates as long as asked
    worker = dash.fleet.worker(
        "node-c",
        models,
        wait=False,
        MODELFLEET_HEARTBEAT_INTERVAL="0.5",
        MODELFLEET_HEARTBEAT_TTL="2",
        MODELFLEET_NODE_TOKEN=NODE_TOKEN,
    )
    page = new_page()
    sign_in(page, dash.api)
    card = node_card(page, "node-c")
    expect(card).to_have_attribute("data-online", "true", timeout=30_000)
    with dash.api.client() as client:
        body = {"modelId": "long", "contextLength": 2048}
        assert client.post(f"/api/v1/nodes/{worker.fingerprint}/models/load", json=body).status_code == 200
    in_flight = model_row(page, "node-c", "long").get_by_test_id("in-flight")
    with answering(dash, "long"):
        expect(in_flight).to_have_text("1")
        worker.signal(signal.SIGKILL)  # mid-answer: no usage update will ever say it ended
        expect(card).to_have_attribute("data-online", "false", timeout=10_000)  # its 2 s heartbeat window, a tick
    expect(card).to_have_class("card node is-offline")
    expect(card.locator(".node-id")).to_contain_text(re.compile(r"offline\s*for \d+s"))  # and for how long
    expect(card.get_by_test_id("open-load")).to_be_disabled()
    expect(in_flight).to_have_text("\u2013")  # a dash: an offline node runs nothing, whatever it last reported
    expect(page.get_by_test_id("event-log").locator('[data-type="node-offline"]').first).to_contain_text("node-c")
    shoot(page, tmp_path / "offline.png")


def test_an_api_restart_misses_no_event(dash: Dash, new_page, tmp_path: Path) -> None:
    page = new_page()
    sign_in(page, dash.api)
    redis = dash.fleet.redis.client()
    (start,) = redis.xrevrange("modelfleet:events", count=1) or [(b"0-0", {})]
    dash.stop_api()
    expect(page.get_by_test_id("connection")).to_have_text("Reconnecting…")
    other = dash.fleet.api()  # the fleet goes on changing through another API process meanwhile
    with other.client() as client:
        for path, body in (("load", {"modelId": "tiny-a"}), ("unload", {"modelId": "tiny-a"})):
            response = client.post(f"/api/v1/nodes/{dash.b.fingerprint}/models/{path}", json=body)
            assert response.status_code == 200, response.text
    dash.start_api()
    expect(page.get_by_test_id("connection")).to_have_text("Live", timeout=30_000)
    log = page.get_by_test_id("event-log")
    expect(log.locator('[data-type="model-unloaded"]').first).to_contain_text("tiny-a")
    missed = [e[0].decode() for e in redis.xrange("modelfleet:events", min=f"({start[0].decode()}")]
    assert len(missed) >= 4
    shown = log.locator("li").evaluate_all("items => items.map(i => i.dataset.id)")
    assert set(missed) <= set(shown), (missed, shown)
    expect(page.get_by_label("API key")).to_have_count(0)  # still signed in: the session outlived the process
    shoot(page, tmp_path / "caught-up.png")


def test_no_key_reaches_the_page_its_storage_a_url_or_the_log(dash: Dash, new_page, tmp_path: Path) -> None:
    page = new_page()
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))
    sign_in(page, dash.api)
    expect(node_card(page, "node-a")).to_be_visible()
    cookies = page.context.cookies()
    (cookie,) = [c for c in cookies if c["name"] == "modelfleet_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and not cookie["secure"]  # Secure over HTTPS only
    exposed = page.evaluate(
        """() => JSON.stringify({html: document.documentElement.outerHTML, cookie: document.cookie,
            local: {...localStorage}, session: {...sessionStorage}, url: location.href, history: history.length})"""
    )
    assert "modelfleet_session" not in exposed and cookie["value"] not in exposed
    shoot(page, tmp_path / "signed-in.png")

    # Sign out ends the session on the server too: the old cookie opens nothing.
    page.get_by_test_id("sign-out").click()
    expect(page.get_by_label("API key")).to_be_visible()
    stale = httpx.get(dash.api.url + "/api/v1/nodes", cookies={"modelfleet_session": cookie["value"]})
    assert stale.status_code == 401

    redis = dash.fleet.redis.client()
    stored = json.dumps([[k.decode(), str(redis.dump(k))] for k in redis.scan_iter()])
    for secret in (*ALL_SECRETS, NODE_TOKEN, cookie["value"]):
        assert secret not in exposed
        assert not any(secret in url for url in urls)
        assert secret not in dash.api.log()
        assert secret not in stored
    assert OPERATOR_KEY not in page.content()


def test_the_playground_streams_an_answer(dash: Dash, new_page, tmp_path: Path) -> None:
    api_load(dash, dash.a.fingerprint, "stories260K")
    page = new_page()
    sign_in(page, dash.api)
    page.get_by_test_id("tab-playground").click()
    expect(page.get_by_test_id("pg-model")).to_have_value("stories260K")
    page.get_by_test_id("pg-prompt").fill("Once upon a time")
    page.get_by_label("Max tokens").fill("16")
    page.get_by_label("Temperature").fill("0")  # greedy: the model's one answer
    page.evaluate(
        """() => {
            window.__lengths = [];
            const out = document.querySelector('[data-testid="pg-output"]');
            new MutationObserver(() => window.__lengths.push(out.textContent.length))
                .observe(out, { subtree: true, childList: true, characterData: true });
        }"""
    )
    page.get_by_test_id("pg-send").click()
    expect(page.get_by_test_id("pg-stats")).to_contain_text("finish: length", timeout=90_000)
    text = page.get_by_test_id("pg-output").text_content() or ""
    assert text.startswith("Once upon a time, there was a little girl named Lily"), text
    lengths = page.evaluate("window.__lengths")
    assert len(set(lengths)) >= 3, lengths  # it grew piece by piece, as the tokens came
    expect(page.get_by_test_id("pg-send")).to_be_enabled()
    shoot(page, tmp_path / "playground.png", "dashboard-playground.png")
    unload_everything(dash)


def endless_on_a(dash: Dash) -> dict:
    """node-a's record of the endless model: its generations running and queued, and its tokens so far."""
    with dash.api.client(READ_KEY) as client:
        response = client.get(f"/api/v1/nodes/{dash.a.fingerprint}/models")
        assert response.status_code == 200, response.text
    [model] = [m for m in response.json()["data"] if m["id"] == "endless"]
    return model  # type: ignore[no-any-return]


def load_endless(dash: Dash) -> str:
    """Load the endless model on node-a with all of its context; returns node-a's fingerprint."""
    fp = dash.a.fingerprint
    with dash.api.client() as client:
        response = client.post(f"/api/v1/nodes/{fp}/models/load", json={"modelId": "endless", "contextLength": 2048})
        assert response.status_code == 200, response.text
    return fp


def test_stop_ends_the_stream_and_frees_the_models_slot_on_the_node(dash: Dash, new_page, tmp_path: Path) -> None:
    fp = load_endless(dash)
    page = new_page()
    sign_in(page, dash.api)
    page.get_by_test_id("tab-playground").click()
    expect(page.get_by_test_id("pg-model")).to_have_value("endless")
    prompt = "Once upon a time"
    page.get_by_test_id("pg-prompt").fill(prompt)
    page.get_by_label("Max tokens").fill("1500")  # well over ten seconds of this model's text (`write_endless_model`)
    # Greedy: this model's EOS logit is zero, which sampling can pick; the argmax never does.
    page.get_by_label("Temperature").fill("0")
    page.get_by_test_id("pg-send").click()
    output = page.get_by_test_id("pg-output")
    # Polled from here, not with page.wait_for_function: Playwright 1.45 (the floor) runs that through eval in the
    # page, which the dashboard's CSP (script-src 'self') refuses.
    wait_for(lambda: len(output.text_content() or "") > len(prompt) + 20, 30, "the answer to start streaming")
    wait_for(lambda: endless_on_a(dash)["inFlight"] == 1, 10, "the node to be generating the answer")

    page.get_by_test_id("pg-stop").click()
    expect(page.get_by_test_id("pg-stats")).to_contain_text("Stopped after")
    expect(page.get_by_test_id("pg-stop")).to_have_count(0)
    stopped = output.text_content()
    # The page went away from the stream: the head releases its lease and the node stops generating.
    redis = dash.fleet.redis.client()
    wait_for(lambda: redis.zcard(keys.inflight(fp)) == 0, 10, "the head to release the request's lease")
    wait_for(lambda: endless_on_a(dash)["inFlight"] + endless_on_a(dash)["queued"] == 0, 10, "the generation to stop")
    tokens = endless_on_a(dash)["tokensGenerated"]
    assert 0 < tokens < 1500, tokens  # stopped before the end of the answer
    assert output.text_content() == stopped  # nothing more arrived after Stop
    shoot(page, tmp_path / "stopped.png")

    # The freed model answers the next prompt at once.
    page.get_by_label("Max tokens").fill("4")
    page.get_by_test_id("pg-send").click()
    expect(page.get_by_test_id("pg-stats")).to_contain_text("finish: length", timeout=60_000)
    assert endless_on_a(dash)["tokensGenerated"] == tokens + 4
    unload_everything(dash)


class Requests:
    """Every request the page starts, and those that ended (answered or failed), in the order the browser says."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.started: list[str] = []
        self.finished: list[str] = []
        page.on("request", lambda request: self.started.append(request.url))
        page.on("requestfinished", lambda request: self.finished.append(request.url))
        page.on("requestfailed", lambda request: self.finished.append(request.url))

    def settle(self, dash: Dash) -> int:
        """Wait until the snapshot's reads (each node's catalog, the pool) and every other request but the event
        stream have been answered; returns how many requests the page had started then."""
        reads = [f"/api/v1/nodes/{w.fingerprint}/catalog" for w in (dash.a, dash.b)] + ["/v1/models"]

        def settled() -> bool:
            self.page.evaluate("0")  # Playwright delivers the network events that came meanwhile during a call
            return len(self.finished) == len(self.started) - 1 and all(
                any(u.endswith(r) for u in self.finished) for r in reads
            )

        wait_for(settled, 10, "the page's first reads to be answered")
        return len(self.started)

    def since(self, before: int, dash: Dash) -> list[str]:
        """The requests started after the first `before`, and a marker the test makes now: the browser reports
        requests in the order they start, so once the marker is seen, any request started earlier was too."""
        marker = dash.api.url + f"/healthz?marker-{len(self.started)}"
        self.page.evaluate("url => fetch(url).then(() => true)", marker)
        wait_for(lambda: self.page.evaluate("0") == 0 and marker in self.started, 10, "the marker request")
        return [url for url in self.started[before:] if url != marker]


def test_the_page_never_polls(dash: Dash, new_page, tmp_path: Path) -> None:
    page = new_page()
    page.clock.install()  # the page's timers run on a clock the test moves
    requests = Requests(page)
    sign_in(page, dash.api)
    expect(node_card(page, "node-b")).to_be_visible()
    streams = [url for url in requests.started if "/api/v1/events" in url]
    assert len(streams) == 1, streams  # one EventSource
    before = requests.settle(dash)

    page.clock.run_for("30:00")  # half an hour of the page's time: any timer a poll could hang on fires
    assert requests.since(before, dash) == []
    expect(page.get_by_test_id("connection")).to_have_text("Live")

    # And yet a change made elsewhere shows: the stream says so, and only then does the page read.
    api_load(dash, dash.b.fingerprint, "tiny-a")
    expect(model_row(page, "node-b", "tiny-a")).to_have_attribute("data-state", "loaded")
    shoot(page, tmp_path / "no-polling.png")
    unload_everything(dash)


def test_in_flight_moves_live_with_no_request_but_the_event_stream(dash: Dash, new_page, tmp_path: Path) -> None:
    load_endless(dash)
    page = new_page()
    requests = Requests(page)
    sign_in(page, dash.api)
    in_flight = model_row(page, "node-a", "endless").get_by_test_id("in-flight")
    expect(in_flight).to_have_text("0")
    before = requests.settle(dash)

    with answering(dash, "endless"):  # a prompt from elsewhere, through the head
        expect(in_flight).to_have_text("1")
        shoot(page, tmp_path / "in-flight.png")
    # The prompt's client left: the node stops generating, and its next usage update shows the model idle.
    expect(in_flight).to_have_text("0")
    assert (in_flight.get_attribute("title") or "").split()[0] != "0", "its tokens were counted too"
    assert requests.since(before, dash) == [], "usage moved with no request: only the one event stream"
    assert len([url for url in requests.started if "/api/v1/events" in url]) == 1
    unload_everything(dash)


CONTROL_ROLES = {"button", "textbox", "combobox", "radio", "spinbutton", "checkbox", "link", "tab", "searchbox"}


def unnamed_controls(page: Page) -> list[str]:
    """The controls a screen reader would announce without a name, from Chromium's own accessibility tree."""
    cdp = page.context.new_cdp_session(page)
    try:
        nodes = cdp.send("Accessibility.getFullAXTree")["nodes"]
    finally:
        cdp.detach()
    controls = [n for n in nodes if not n.get("ignored") and n.get("role", {}).get("value") in CONTROL_ROLES]
    assert controls  # the tree was read
    return [f"{n['role']['value']} {n.get('backendDOMNodeId')}" for n in controls if not n.get("name", {}).get("value")]


@pytest.mark.parametrize("width", [800, 1440])
def test_every_view_is_labelled_usable_by_keyboard_and_fits_the_width(
    dash: Dash, new_page, tmp_path: Path, width: int
) -> None:
    api_load(dash, dash.b.fingerprint, "tiny-a")
    page = new_page(width, 900)

    def check(view: str) -> None:
        assert unnamed_controls(page) == [], view
        assert page.evaluate("document.documentElement.scrollWidth") <= width, view  # no sideways scroll
        shoot(page, tmp_path / f"{view}-{width}px.png")

    page.goto(dash.api.url + "/")
    expect(page.get_by_label("API key")).to_be_focused()
    check("sign-in")
    page.keyboard.type(OPERATOR_KEY)
    page.keyboard.press("Enter")
    expect(page.get_by_test_id("connection")).to_have_text("Live")
    row = model_row(page, "node-b", "tiny-a")
    expect(row).to_have_attribute("data-state", "loaded")
    check("fleet")

    # Unload all asks first; Escape cancels and gives the focus back to the button that opened the dialog.
    unload_all = node_card(page, "node-b").get_by_test_id("unload-all")
    unload_all.focus()
    page.keyboard.press("Enter")
    confirm = page.get_by_test_id("confirm-dialog")
    expect(confirm.get_by_role("button", name="Cancel")).to_be_focused()
    check("confirm")
    page.keyboard.press("Escape")
    expect(confirm).to_have_count(0)
    expect(unload_all).to_be_focused()
    expect(row).to_have_attribute("data-state", "loaded")

    node_card(page, "node-a").get_by_test_id("open-load").click()
    expect(page.get_by_test_id("load-dialog").locator("label.file").first).to_be_visible()
    check("load-dialog")
    page.keyboard.press("Escape")
    expect(page.get_by_test_id("load-dialog")).to_have_count(0)

    for tab in ("pool", "playground"):
        page.get_by_test_id(f"tab-{tab}").focus()
        page.keyboard.press("Enter")
        expect(page.get_by_test_id(f"tab-{tab}")).to_have_attribute("aria-current", "page")
        check(tab)
    unload_everything(dash)
