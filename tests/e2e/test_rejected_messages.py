"""Whatever reaches a node's queue is untrusted: a message the worker refuses is logged by its size and a hash,
never by its bytes, and the node goes on serving."""

import base64
import json
import uuid
from pathlib import Path

from broker import keys
from broker.operations import LOAD
from tests.conftest import Fleet, node_json, wait_for
from workers.consumer import fingerprint

MARKER = "leak-MARKER-\u2028-\x1b[31m-"


def _envelope(queue: str, body: bytes, content_type: str, task: str | None) -> str:
    headers = {"id": uuid.uuid4().hex, "task": task, "lang": "py", "argsrepr": MARKER} if task else {}
    return json.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "binary" if content_type != "application/json" else "utf-8",
            "content-type": content_type,
            "headers": headers,
            "properties": {
                "body_encoding": "base64",
                "delivery_tag": uuid.uuid4().hex,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
            },
        }
    )


def test_refused_messages_are_logged_by_size_and_hash_only(fleet: Fleet, models_dir: Path) -> None:
    worker = fleet.worker("wary", models_dir)
    queue = keys.node_queue(worker.fingerprint)
    pickled = b"\x80\x04\x95" + MARKER.encode() + b"."
    not_json = b"{" + MARKER.encode()
    unknown = json.dumps([[MARKER], {}, {}]).encode()
    client = fleet.redis.client()
    client.lpush(queue, _envelope(queue, pickled, "application/x-python-serialize", LOAD.task))
    client.lpush(queue, _envelope(queue, not_json, "application/json", LOAD.task))
    client.lpush(queue, _envelope(queue, unknown, "application/json", "some.other.task"))

    wait_for(lambda: worker.log().count("refused ") >= 3, 20, "the worker to refuse all three messages")
    log = worker.log()
    for body in (pickled, not_json, unknown):
        assert fingerprint(body) in log, f"{fingerprint(body)} not logged"
    assert "leak-MARKER" not in log and "\u2028" not in log and "\x1b[31m" not in log, log[-3000:]
    api = fleet.api()
    with api.client() as http:
        assert node_json(http, worker)["online"] is True
        assert http.get(f"/api/v1/nodes/{worker.fingerprint}/models").status_code == 200
