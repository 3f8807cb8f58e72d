"""A node-addressed job is sent only to the node process it was meant for: real workers, restarted and killed
between two lists of the same API process (which keeps each node's record between requests)."""

import signal
from pathlib import Path

import pytest

from tests.conftest import OPERATOR_KEY, Fleet, node_json, queued, wait_for

pytestmark = pytest.mark.timeout(120)


def test_a_restarted_node_gets_the_job_and_a_dead_one_gets_none(fleet: Fleet, models_dir: Path) -> None:
    worker = fleet.worker("sent-to", models_dir)
    api = fleet.api()
    url = f"/api/v1/nodes/{worker.fingerprint}/models"
    with api.client(OPERATOR_KEY) as op:
        assert op.get(url).status_code == 200
        first_boot = node_json(op, worker)["bootId"]

        worker.stop()
        again = fleet.worker("sent-to", models_dir)  # the same node (state directory), a new process
        listed = op.get(url)
        assert listed.status_code == 200, listed.text
        assert node_json(op, again)["bootId"] != first_boot

        again.signal(signal.SIGKILL)
        again.wait(10)
        wait_for(lambda: not node_json(op, again)["online"], 30, "the killed node to go offline")
        refused = op.get(url)
        assert refused.status_code == 503 and refused.json()["code"] == "node_offline", refused.text
        assert queued(fleet, again) == 0, "a job was queued for a dead node"
