"""`modelfleet ps` rows: what the STATE column says of a model's health."""

from datetime import UTC, datetime

import pytest

from broker.schemas import ModelInfo, ModelState
from modelfleet.commands import _model_row


@pytest.mark.parametrize(
    ("fields", "state"),
    [
        ({"healthy": True}, "loaded"),
        ({"healthy": True, "pinned": True}, "loaded (pinned)"),
        ({"healthy": False, "checking": True}, "loaded (checking)"),
        ({"healthy": False, "pinned": True}, "loaded (pinned, unhealthy)"),
        ({"healthy": False, "state": ModelState.LOADING}, "loading"),
    ],
)
def test_the_state_column_says_whether_a_loaded_model_answers(fields: dict, state: str) -> None:
    model = ModelInfo(id="m", path="/m.gguf", size_bytes=1, **{"state": ModelState.LOADED, **fields})
    assert _model_row("local", model, datetime.now(UTC))[2] == state
