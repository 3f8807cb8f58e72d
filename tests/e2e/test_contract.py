"""The live API against its own schema: a real Redis, a real worker, the API as an operator starts it.

Schemathesis (its CLI, as a user would run it) generates requests from /openapi.json for every operation, with
the operator key and with the read-only key, and fails on any server error, any undocumented status or content
type, and any answer that breaks its documented schema. The event stream never ends, so it is left out here
(tests/e2e/test_events.py holds it to its shape).
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import OPERATOR_KEY, READ_KEY, Api, Fleet, Worker

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def node(module_fleet: Fleet, models_dir: Path) -> Worker:
    return module_fleet.worker("contract-node", models_dir)


@pytest.fixture(scope="module")
def api(module_fleet: Fleet, node: Worker) -> Api:
    # The fuzzer signs in with hundreds of made-up keys: counted as wrong keys, they would soon have every request
    # of its run answered 429 (`broker.wrong_keys`, tested in tests/e2e/test_wrong_keys.py).
    return module_fleet.api(MODELFLEET_LOAD_ON_DEMAND="false", MODELFLEET_WRONG_KEY_LIMIT="0")


def test_the_live_schema_is_served_and_the_docs_pages_load_offline(api: Api) -> None:
    schema = httpx.get(api.url + "/openapi.json", timeout=30)
    assert schema.status_code == 200 and schema.json()["openapi"].startswith("3.")
    assert schema.json()["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for page in ("/docs", "/redoc"):
        html = httpx.get(api.url + page, timeout=30)
        assert html.status_code == 200 and "https://" not in html.text


@pytest.mark.parametrize(
    ("content", "headers", "sentence"),
    [
        (b'{"modelId": "tiny-a"}', {}, "the body must be JSON with Content-Type: application/json"),
        (b'{"modelId": "tiny-a"}', {"Content-Type": "text/plain"}, "the body must be JSON with Content-Type"),
        (b'{"modelId": tiny}', {"Content-Type": "application/json"}, "the body is not valid JSON at line 1 column 13"),
        (b'{\n  "modelId":\n}', {"Content-Type": "application/json"}, "the body is not valid JSON at line 3 column 1"),
        (b"", {"Content-Type": "application/json"}, "the body is missing: it must be JSON with Content-Type"),
        (b"[1]", {"Content-Type": "application/json"}, "the body must be a JSON object, not an array"),
        (b'{"modelId": "\xff"}', {"Content-Type": "application/json"}, "could not be read as JSON (not UTF-8 text"),
        (b"[" * 5000 + b"]" * 5000, {"Content-Type": "application/json"}, "could not be read as JSON (not UTF-8"),
    ],
)
def test_a_malformed_body_gets_a_sentence_a_person_can_act_on(
    api: Api, node: Worker, content: bytes, headers: dict[str, str], sentence: str
) -> None:
    with api.client(OPERATOR_KEY) as op:
        answer = op.post(f"/api/v1/nodes/{node.fingerprint}/models/load", content=content, headers=headers)
        assert answer.status_code == 422, answer.text
        body = answer.json()
        assert body["code"] == "invalid_request" and sentence in body["error"], body["error"]
        assert body["success"] is False and body["details"]["errors"][0]["field"] == "body"
        assert op.get(f"/api/v1/nodes/{node.fingerprint}/models").json()["data"] == []  # nothing changed


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        # JSON of the wrong type is refused, not coerced: `true` would be a keep-alive of 1 s (the model gone a
        # second later) or a context of 1 token; "yes" would force a reload.
        ("/api/v1/nodes/{fp}/models/load", {"modelId": "tiny-a", "keepAlive": True}, "keepAlive"),
        ("/api/v1/nodes/{fp}/models/load", {"modelId": "tiny-a", "contextLength": True}, "contextLength"),
        ("/api/v1/nodes/{fp}/models/load", {"modelId": "tiny-a", "contextLength": "12"}, "contextLength"),
        ("/api/v1/nodes/{fp}/models/load", {"modelId": "tiny-a", "gpuLayers": 1.5}, "gpuLayers"),
        ("/v1/models/load", {"model_name": "tiny-a", "node": "{fp}", "force_reload": "yes"}, "force_reload"),
        ("/v1/models/load", {"model_name": "tiny-a", "node": "{fp}", "pin": "on"}, "pin"),
        ("/v1/models/load", {"model_name": "tiny-a", "node": "{fp}", "keep_alive": True}, "keep_alive"),
        ("/v1/completions", {"model": "tiny-a", "prompt": "Once", "stream": "yes"}, "stream"),
        ("/v1/completions", {"model": "tiny-a", "prompt": "Once", "max_tokens": True}, "max_tokens"),
        ("/v1/completions", {"model": "tiny-a", "prompt": "Once", "temperature": "0"}, "temperature"),
    ],
)
def test_a_value_of_the_wrong_json_type_is_refused_and_changes_nothing(
    api: Api, node: Worker, path: str, body: dict[str, object], field: str
) -> None:
    fp = node.fingerprint
    body = {k: (v.replace("{fp}", fp) if isinstance(v, str) else v) for k, v in body.items()}
    with api.client(OPERATOR_KEY) as op:
        answer = op.post(path.replace("{fp}", fp), json=body)
        assert answer.status_code == 422, answer.text
        text = answer.text
        assert field in text and ("invalid_request" in text), text
        assert op.get(f"/api/v1/nodes/{fp}/models").json()["data"] == []  # nothing loaded


def _schemathesis(api: Api, key: str, examples: int, tmp: Path) -> int:
    """Run `st run` against the live API with `key`; fail on any finding. Returns the cases it generated."""
    st = shutil.which("st") or str(Path(sys.executable).with_name("st"))
    report = tmp / f"st-{key[:3]}.ndjson"
    argv = [
        st,
        "run",
        api.url + "/openapi.json",
        "--header",
        f"Authorization: Bearer {key}",
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
        "response_headers_conformance",
        "--max-examples",
        str(examples),
        "--exclude-path",
        "/api/v1/events",
        "--request-timeout",
        "60",
        "--seed",
        "1",
        "--report",
        "ndjson",
        "--report-ndjson-path",
        str(report),
        "--no-color",
    ]
    # Run it in the test's folder: schemathesis writes its cache (and crash reproductions, which carry the
    # Authorization header) under the working directory, which must never be the checkout.
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd=tmp)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    cases = sum(1 for line in report.read_text().splitlines() if '"ScenarioFinished"' in line or "Case" in line)
    found = re.search(r"(\d+) generated", done.stdout)
    return int(found.group(1)) if found else cases


def test_schemathesis_finds_no_server_error_and_no_answer_off_schema(api: Api, node: Worker, tmp_path: Path) -> None:
    operator = _schemathesis(api, OPERATOR_KEY, 60, tmp_path)
    reader = _schemathesis(api, READ_KEY, 20, tmp_path)
    print(json.dumps({"operator_cases": operator, "read_cases": reader}))
    assert operator + reader >= 1000
