"""The OpenAI wire schemas: what requests are accepted, refused, and how answers and errors look."""

import pytest
from pydantic import ValidationError

from broker.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    Usage,
    error_body,
    sse_data,
)


def test_a_minimal_request_and_the_options_clients_send_anyway() -> None:
    request = CompletionRequest.model_validate(
        {"model": "m", "prompt": "p", "user": "u", "n": 1, "presence_penalty": 0, "some_future_option": True}
    )
    assert request.unsupported() is None and request.stop_sequences == () and not request.include_usage


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"n": 2}, "n=2"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"logprobs": 3}, "logprobs"),
        ({"logprobs": 0}, "logprobs"),  # OpenAI's legacy completions: the chosen tokens' logprobs
        ({"echo": True}, "echo"),
        ({"prompt": ["a", "b"]}, "2 prompts"),
        ({"prompt": [1, 2, 3]}, "token-id prompts"),
        ({"prompt": [[1, 2, 3]]}, "token-id prompts"),  # OpenAI's array of token arrays: 400, not 422
        ({"stream_options": {"include_usage": True}}, "only allowed with stream"),
    ],
)
def test_what_no_backend_does_is_refused_by_name(extra: dict[str, object], words: str) -> None:
    request = CompletionRequest.model_validate({"model": "m", "prompt": "p"} | extra)
    problem = request.unsupported()
    assert problem is not None and words in problem


CHAT = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"tools": [TOOL]}, "tools"),
        ({"tools": [TOOL], "tool_choice": "required"}, "tools"),
        ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
        ({"functions": [TOOL["function"]], "function_call": {"name": "f"}}, "functions"),
        ({"function_call": {"name": "f"}}, "function_call"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "logprobs"),
    ],
)
def test_chat_options_that_would_change_the_answer_are_refused_by_name(extra: dict[str, object], words: str) -> None:
    """Each was answered 200 with ordinary text, as if a tool call, JSON or logprobs were impossible to ask for."""
    request = ChatCompletionRequest.model_validate(CHAT | extra)
    problem = request.unsupported()
    assert problem is not None and words in problem


@pytest.mark.parametrize(
    "extra",
    [
        {"tools": [TOOL], "tool_choice": "none"},
        {"tool_choice": "auto"},
        {"response_format": {"type": "text"}},
        {"logprobs": False, "top_logprobs": 0},
        {"functions": [], "function_call": "none"},
    ],
)
def test_chat_options_at_openais_defaults_are_accepted(extra: dict[str, object]) -> None:
    request = ChatCompletionRequest.model_validate(CHAT | extra)
    assert request.unsupported() is None


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": 2.5},
        {"top_p": -0.1},
        {"top_p": 1.5},
        {"prompt": [[1, 2], "a"]},
        {"max_tokens": 0},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"stop": ""},
        {"model": ""},
    ],
)
def test_out_of_range_values_fail_validation(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": "p"} | bad)


def test_chat_takes_text_parts_and_the_smaller_token_limit() -> None:
    request = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "max_tokens": 50,
            "max_completion_tokens": 20,
            "stream_options": {"include_usage": True},
        }
    )
    assert request.messages[0].text == "ab" and request.token_limit == 20 and request.include_usage
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": []})
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}
        )


def test_errors_and_events_have_openais_shape() -> None:
    body = error_body(429, "model_busy", "busy").model_dump()
    assert body == {"error": {"message": "busy", "type": "rate_limit_error", "param": None, "code": "model_busy"}}
    assert Usage.of(5, 10).total_tokens == 15
    assert sse_data(Usage.of(1, 2)) == b'data: {"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}\n\n'
