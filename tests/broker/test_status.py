"""One status table (`broker.status`) for the head and the nodes: a failure answers the same status wherever a
client meets it, and the head's OpenAPI schema documents what the nodes answer."""

import json

import pytest

from api.errors import documented
from broker import errors as e
from broker.status import STATUS, status_of
from workers.inference.server import error_response


def test_a_generation_that_failed_is_a_502_on_the_head_and_on_the_node() -> None:
    failed = e.GenerationFailed("Model m failed while generating: RuntimeError.")
    assert status_of(failed) == status_of(failed, openai=True) == 502
    answer = error_response(failed)
    assert answer.status_code == 502
    assert json.loads(bytes(answer.body))["error"]["code"] == "generation_failed"
    assert 502 in documented(e.GenerationFailed, openai=True, streaming=True)


def test_a_request_that_will_not_run_is_422_on_the_heads_routes_and_400_in_openais_shape() -> None:
    assert status_of(e.InvalidRequest) == 422
    assert status_of(e.ContextLengthExceeded, openai=True) == 400  # a subclass answers its parent's status
    assert error_response(e.ContextLengthExceeded("too long")).status_code == 400


@pytest.mark.parametrize("cls", list(STATUS), ids=lambda cls: cls.__name__)
def test_the_node_answers_every_error_with_the_status_the_heads_schema_documents(
    cls: type[e.ModelfleetError],
) -> None:
    node_status = error_response(cls("x")).status_code
    assert node_status in documented(cls, openai=True)
    assert node_status == status_of(cls, openai=True)
