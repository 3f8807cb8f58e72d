"""The dashboard in a real Chromium (Debian's, driven by Playwright; no browser download) against a real API,
Redis and two real worker processes: `node-a` with the real stories260K model, a file its backend refuses and a
model whose text never ends (for the playground's Stop), `node-b` with generated tiny llamas."""

import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import FREEZE_TTL, OPERATOR_KEY, STORIES, Api, Fleet, Worker
from workers.gguf_factory import write_endless_model, write_headless_llama, write_tiny_llama

playwright_api = pytest.importorskip("playwright.sync_api")
playwright_api.expect.set_options(timeout=15_000)

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
NODE_TOKEN = "ntk-SECRET-dashboard-" + secrets.token_hex(8)
"""The head's bearer to the nodes' inference endpoints: a cookie-signed-in page has no key for the head to pass on."""
UNLOAD_TIMEOUT = 3
"""Seconds the test API waits for an unload: a frozen node's unload fails after it."""
# Where the README's screenshot is written when MODELFLEET_UPDATE_SCREENSHOTS=1.
DOCS = Path(__file__).resolve().parents[2] / "docs"


@dataclass
class Dash:
    """The fleet the dashboard tests share."""

    fleet: Fleet
    api: Api
    a: Worker
    b: Worker
    port: int

    def stop_api(self) -> None:
        self.api.stop()
        self.fleet.procs.remove(self.api)

    def start_api(self) -> Api:
        self.api = self.fleet.api(
            port=self.port, MODELFLEET_UNLOAD_TIMEOUT=str(UNLOAD_TIMEOUT), MODELFLEET_NODE_TOKEN=NODE_TOKEN
        )
        return self.api


# Module-scoped: Playwright's sync API keeps an event loop running in this thread while it is open, which
# asyncio.run() in later tests would trip over.
@pytest.fixture(scope="module")
def browser() -> Iterator["playwright_api.Browser"]:
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def dash(module_fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Dash:
    if not STORIES.exists():
        pytest.skip(f"the real model is not at {STORIES}")
    a_dir = tmp_path_factory.mktemp("models-a")
    shutil.copy(STORIES, a_dir / "stories260K.gguf")
    write_headless_llama(a_dir / "headless.gguf")
    write_endless_model(a_dir / "endless.gguf")
    b_dir = tmp_path_factory.mktemp("models-b")
    write_tiny_llama(b_dir / "tiny-a.gguf", seed=1)
    write_tiny_llama(b_dir / "tiny-b.gguf", seed=2)
    # One event per token: stories260K is so fast that a 16-token answer would otherwise come in two writes, and
    # the playground's test watches the text grow piece by piece.
    a = module_fleet.worker(
        "node-a",
        a_dir,
        "--memory-budget",
        "2GiB",
        "--stream-interval",
        "0",
        wait=False,
        MODELFLEET_NODE_TOKEN=NODE_TOKEN,
    )
    # node-b may be frozen (SIGSTOP) for a few seconds and stay online: its unload then times out at the API.
    b = module_fleet.worker(
        "node-b",
        b_dir,
        "--memory-budget",
        "1GiB",
        wait=False,
        MODELFLEET_HEARTBEAT_TTL=str(FREEZE_TTL),
        MODELFLEET_NODE_TOKEN=NODE_TOKEN,
    )
    module_fleet.wait_online(a)
    module_fleet.wait_online(b)
    api = module_fleet.api(MODELFLEET_UNLOAD_TIMEOUT=str(UNLOAD_TIMEOUT), MODELFLEET_NODE_TOKEN=NODE_TOKEN)
    return Dash(module_fleet, api, a, b, int(api.url.rsplit(":", 1)[1]))


# Records every state each model row showed, and the animation its state badge ran then, so a test can tell that
# `loading` was on screen (and animated) even when the load took milliseconds.
SEEN_STATES = """
window.__seen = [];
window.__animations = {};
new MutationObserver(() => {
  for (const row of document.querySelectorAll('[data-testid="model"]')) {
    const mark = `${row.closest('[data-testid="node"]')?.dataset.node}/${row.dataset.model}:${row.dataset.state}`;
    if (window.__seen[window.__seen.length - 1] !== mark && !window.__seen.includes(mark)) window.__seen.push(mark);
    const badge = row.querySelector('[data-testid="state"]');
    if (badge) window.__animations[mark] = getComputedStyle(badge).animationName;
  }
}).observe(document, { subtree: true, childList: true, attributes: true, attributeFilter: ["data-state"] });
"""


@pytest.fixture
def new_page(browser: "playwright_api.Browser", dash: Dash) -> Iterator:
    contexts = []

    def make(width: int = 1440, height: int = 900) -> "playwright_api.Page":
        context = browser.new_context(viewport={"width": width, "height": height})
        context.add_init_script(SEEN_STATES)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(20_000)
        return page

    yield make
    for context in contexts:
        context.close()


def sign_in(page: "playwright_api.Page", api: Api, key: str = OPERATOR_KEY) -> None:
    page.goto(api.url + "/")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    playwright_api.expect(page.get_by_test_id("connection")).to_have_text("Live")


def node_card(page: "playwright_api.Page", name: str) -> "playwright_api.Locator":
    return page.locator(f'[data-testid="node"][data-node="{name}"]')


def model_row(page: "playwright_api.Page", node: str, model: str) -> "playwright_api.Locator":
    return node_card(page, node).locator(f'[data-testid="model"][data-model="{model}"]')


def shoot(page: "playwright_api.Page", path: Path, readme_name: str | None = None) -> None:
    page.screenshot(path=path, full_page=True)
    if readme_name and os.environ.get("MODELFLEET_UPDATE_SCREENSHOTS") == "1":
        DOCS.mkdir(exist_ok=True)
        shutil.copy(path, DOCS / readme_name)
