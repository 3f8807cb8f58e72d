"""No secret reaches a log, an HTTP answer or `modelfleet up`'s output, even when a request carries one.

The harness's secrets (conftest `ALL_SECRETS`: the Redis password, an operator key and a read-only key) are
distinctive strings, so a plain substring search over every byte the processes wrote finds any leak. A
response may repeat what its own request sent (a missing model's id, say): that tells the caller nothing it
did not know, and masking it would instead confirm a guessed secret. Every other secret must be absent.
"""

import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

import httpx

from tests.conftest import ALL_SECRETS, OPERATOR_KEY, READ_KEY, REDIS_PASSWORD, Api, Fleet, free_port
from tests.e2e.test_up import Up, stop_with_ctrl_c

MASKED_URL = "redis://:**@"
# A Redis URL with a password that is not the mask: `redis://:<anything but **>@`.
UNMASKED_URL = re.compile(r"rediss?://[^\s/@]*:(?!\*\*@)[^\s/@]+@")


def leaked(text: str, candidates: tuple[str, ...] | list[str]) -> list[str]:
    """The candidates found in `text`, verbatim or percent-encoded (as a URL would carry them)."""
    return [s for s in candidates if s in text or quote(s, safe="") in text]


@dataclass
class Exchange:
    request: str
    response: str

    def sent(self) -> list[str]:
        """The secrets this request itself carried, which its response may echo."""
        return leaked(self.request + unquote(self.request), ALL_SECRETS)


class Recorder:
    """Keeps the full text of every request and response made through its clients."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []

    def _record(self, response: httpx.Response) -> None:
        response.read()
        req = response.request
        request = f"{req.method} {req.url}\n{dict(req.headers)}\n{req.content.decode(errors='replace')}"
        text = f"{response.status_code}\n{dict(response.headers)}\n{response.text}"
        self.exchanges.append(Exchange(request, text))

    def client(self, api: Api, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=api.url, headers=headers, timeout=30, event_hooks={"response": [self._record]})


def test_leak_check_finds_a_planted_secret() -> None:
    """The grep below can fail: it finds each secret, plain or percent-encoded, and nothing in clean text."""
    for secret in ALL_SECRETS:
        assert leaked(f"2026-01-01 INFO x: connecting with {secret}, ok", ALL_SECRETS) == [secret]
        assert leaked(f"GET /a?k={quote(secret + '/&', safe='')} 200", [secret + "/&"]) == [secret + "/&"]
    assert leaked(f"redis://:**@127.0.0.1:6379/0 {OPERATOR_KEY[:-1]}", ALL_SECRETS) == []
    assert UNMASKED_URL.search(f"redis://:{REDIS_PASSWORD}@127.0.0.1:1/0")
    assert UNMASKED_URL.search("connect rediss://user:hunter2@host:6380")
    assert not UNMASKED_URL.search("redis://:**@127.0.0.1:1/0 and redis://127.0.0.1:6379/0")
    assert Exchange(f"GET /api/v1/nodes/{quote(READ_KEY)}", "").sent() == [READ_KEY]


def test_no_secret_in_any_log_or_answer(fleet: Fleet, models_dir: Path) -> None:
    worker = fleet.worker("secrets-node", models_dir)
    api = fleet.api(MODELFLEET_ACCESS_LOG="true")  # the request lines too, secrets in URLs and all
    rec = Recorder()
    fp = worker.fingerprint
    models = f"/api/v1/nodes/{fp}/models"

    with rec.client(api, OPERATOR_KEY) as op, rec.client(api, READ_KEY) as ro:
        nodes = ro.get("/api/v1/nodes")
        assert nodes.status_code == 200 and [n["fingerprint"] for n in nodes.json()["data"]] == [fp]
        assert op.post(f"{models}/load", json={"modelId": "tiny-a"}).status_code == 200
        assert ro.get(models).json()["data"][0]["state"] == "loaded"
        missing = op.post(f"{models}/load", json={"modelId": "no-such-model"})
        assert (missing.status_code, missing.json()["code"]) == (404, "model_file_not_found")
        bad_id = op.post(f"{models}/load", json={"modelId": "../etc/passwd"})
        assert (bad_id.status_code, bad_id.json()["code"]) == (422, "invalid_request")
        readonly = ro.post(f"{models}/load", json={"modelId": "tiny-b"})
        assert (readonly.status_code, readonly.json()["code"]) == (403, "forbidden")
        assert op.post(f"{models}/unload", json={"modelId": "tiny-a"}).status_code == 200
        assert op.post(f"{models}/load", json={"modelId": "tiny-b"}).status_code == 200
        unload_all = op.post(f"{models}/unload-all")
        assert unload_all.status_code == 200 and unload_all.json()["unloaded"] == ["tiny-b"]

        # Secrets where they do not belong: each travels as far as the product lets it (the worker included).
        as_model = op.post(f"{models}/load", json={"modelId": REDIS_PASSWORD})
        assert (as_model.status_code, as_model.json()["code"]) == (404, "model_file_not_found")
        as_unload = op.post(f"{models}/unload", json={"modelId": REDIS_PASSWORD})
        assert (as_unload.status_code, as_unload.json()["code"]) == (404, "model_not_loaded")
        as_path = op.get(f"/api/v1/nodes/{REDIS_PASSWORD}/models")
        assert (as_path.status_code, as_path.json()["code"]) == (404, "node_not_found")
        assert op.get(models, params={"token": OPERATOR_KEY}).status_code == 200
        assert ro.post(f"{models}/load", json={"modelId": READ_KEY}).status_code == 403
        assert op.post(f"{models}/unload", json={"modelId": OPERATOR_KEY}).status_code == 404
        assert op.post(f"{models}/load", json={"modelId": "x", "modelPath": REDIS_PASSWORD}).status_code == 404

    with rec.client(api, "wrong-key") as bad, rec.client(api, REDIS_PASSWORD) as pw, rec.client(api, None) as anon:
        wrong = bad.get("/api/v1/nodes")
        assert (wrong.status_code, wrong.json()["code"]) == (401, "unauthenticated")
        assert pw.get("/api/v1/nodes").status_code == 401
        assert anon.get("/api/v1/nodes").status_code == 401

    fleet.stop()  # shutdown lines are logs too
    logs = fleet.logs()
    assert len(logs) == 2 and all(logs.values())
    for name, text in logs.items():
        assert not leaked(text, ALL_SECRETS), f"{name} holds {leaked(text, ALL_SECRETS)}"
        assert not UNMASKED_URL.search(text), f"{name} holds an unmasked Redis URL"
        assert MASKED_URL in text, f"{name} never shows the Redis URL in its masked form"
    # The secret-bearing requests reached the API's log (so the grep above looked at them), masked. The worker
    # logs only each job's outcome code, never its reply text, so what a caller sent does not reach its log.
    api_log = next(t for n, t in logs.items() if n.startswith("api-"))
    worker_log = next(t for n, t in logs.items() if n.startswith("worker-"))
    assert '"GET /api/v1/nodes/***/models HTTP/1.1" 404' in api_log
    assert "raised expected: JobFailed('model_not_loaded')" in worker_log

    assert len(rec.exchanges) == 19
    for exchange in rec.exchanges:
        others = [s for s in ALL_SECRETS if s not in exchange.sent()]
        assert not leaked(exchange.response, others), f"{exchange.request!r} -> {exchange.response!r}"
        assert not UNMASKED_URL.search(exchange.response)


def test_the_access_log_is_off_unless_asked_for(fleet: Fleet) -> None:
    quiet = fleet.api()  # it answered /healthz to come up
    assert httpx.get(quiet.url + "/api/v1/nodes").status_code == 401
    fleet.stop()
    assert "HTTP/1.1" not in quiet.log() and " started" in quiet.log().lower()


def test_up_never_shows_environment_keys_or_its_redis_password(tmp_path: Path) -> None:
    op_key = "envop-SECRET-" + secrets.token_hex(12)
    ro_key = "envro-SECRET-" + secrets.token_hex(12)
    port = free_port()
    env = {"MODELFLEET_OPERATOR_KEYS": op_key, "MODELFLEET_API_KEYS": ro_key, "MODELFLEET_ACCESS_LOG": "true"}
    up = Up(tmp_path / "run", ["--port", str(port)], env).start()
    try:
        banner = up.wait_banner()
        assert banner.operator_key is None and banner.read_key is None
        assert "from MODELFLEET_OPERATOR_KEYS / MODELFLEET_API_KEYS (not shown)" in up.output()
        saved = (tmp_path / "run" / ".modelfleet" / "keys").read_text()
        assert op_key not in saved and ro_key not in saved  # keys from the environment stay there
        # The embedded Redis's password exists only in the children's environment; read it to grep for it too.
        [api_child] = [p for p in up.children() if " api " in " ".join(p.cmdline()) + " "]
        redis_password = httpx.URL(api_child.environ()["MODELFLEET_REDIS_URL"]).password
        assert redis_password and len(redis_password) >= 16

        fp = banner.fingerprint
        auth = {"Authorization": f"Bearer {op_key}"}
        with httpx.Client(base_url=banner.url, headers=auth, timeout=60) as op:
            assert op.post(f"/api/v1/nodes/{fp}/models/load", json={"modelId": "demo-tiny"}).status_code == 200
            assert op.post(f"/api/v1/nodes/{fp}/models/load", json={"modelId": op_key}).status_code == 404
            assert op.get(f"/api/v1/nodes/{redis_password}").status_code == 404
            assert op.post(f"/api/v1/nodes/{fp}/models/unload-all").status_code == 200
        ro = httpx.get(f"{banner.url}/api/v1/nodes", headers={"Authorization": f"Bearer {ro_key}"})
        assert ro.status_code == 200
        assert httpx.get(f"{banner.url}/api/v1/nodes", headers={"Authorization": "Bearer nope"}).status_code == 401
        output = stop_with_ctrl_c(up)
    finally:
        up.cleanup()

    assert "modelfleet is up" in output and "up | stopping" in output
    assert not leaked(output, [op_key, ro_key, redis_password]), leaked(output, [op_key, ro_key, redis_password])
    for line in output.splitlines():
        assert "requirepass" not in line, line
        assert not UNMASKED_URL.search(line), line
    assert MASKED_URL in output
    # On disk, only in the keys file (0600, in a 0700 directory) that lets a restart and the commands run there
    # join this fleet; the 0600 config that carried `requirepass` is gone once Redis answers.
    state = tmp_path / "run" / ".modelfleet"
    holders = [p for p in state.rglob("*") if p.is_file() and redis_password.encode() in p.read_bytes()]
    assert holders == [state / "keys"]
    assert stat.S_IMODE((state / "keys").stat().st_mode) == 0o600 and stat.S_IMODE(state.stat().st_mode) == 0o700
    assert '"GET /api/v1/nodes/*** HTTP/1.1" 404' in output  # the password in a path was logged, masked
