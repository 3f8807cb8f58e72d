"""The OpenAI wire format of the inference routes, shared by the nodes (which answer) and the head (which proxies).

These follow OpenAI's API reference for `POST /v1/completions`, `POST /v1/chat/completions` and their
Server-Sent Event chunks, so openai-python, LangChain and curl work unchanged. Unlike `broker.schemas`, they are
snake_case on the wire (OpenAI's spelling) and requests ignore fields they do not know: clients send options
such as `user` or `logit_bias` routinely, and an unknown field must not fail a request that would otherwise work.
Options that change what is generated and that no backend here implements are refused by `unsupported()`.

Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}` (`ErrorBody`); `code` is the
modelfleet error code (`broker.errors`), `type` OpenAI's coarse class of it (`error_type`).
"""

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from broker.schemas import ModelId, ModelInfo

MAX_STOP_SEQUENCES = 4
"""OpenAI's own limit on `stop`."""
MAX_STOP_LENGTH = 256

FinishReason = Literal["stop", "length"]


def unicode_text(value: Any) -> Any:
    """`value` (a text, a list of texts or parts, anything else as it is) if all its text is valid Unicode.

    JSON can spell half of a UTF-16 surrogate pair (`"\\ud83d"`), which Python's `json` reads as a string holding
    no character: refused here, before it reaches a tokenizer, which would fail to encode it (and the node would
    count the model as broken)."""
    texts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    for text in texts:
        text = text.text if isinstance(text, TextPart) else text
        if not isinstance(text, str):
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = text[exc.start : exc.end].encode("unicode_escape").decode()
            raise ValueError(f"not valid Unicode text: it holds {bad}, half of a surrogate pair") from None
    return value


class _Request(BaseModel):
    """Numbers and booleans are strict, as OpenAI's own API is: `"stream": "yes"` or `"max_tokens": true` is
    refused (422, as every body off the schema), not a stream or one token. A JSON integer is still a number
    (`"temperature": 1`)."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class StreamOptions(_Request):
    include_usage: StrictBool = False
    """Send one more chunk before `data: [DONE]`, with empty `choices` and the request's `usage`."""


class _Sampling(_Request):
    """What both kinds of request share."""

    model: ModelId
    max_tokens: int | None = Field(default=None, ge=1, strict=True)
    temperature: float | None = Field(default=None, ge=0, le=2, strict=True)
    """0 is greedy: always the most likely token (same answer every time)."""
    top_p: float | None = Field(default=None, ge=0, le=1, strict=True)
    """0 keeps only the most likely token: greedy, as temperature 0."""
    seed: int | None = Field(default=None, strict=True)
    stop: str | list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]] | None = None
    n: int | None = Field(default=None, ge=1, strict=True)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, strict=True)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, strict=True)
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(value)}")
        if isinstance(value, str) and not 0 < len(value) <= MAX_STOP_LENGTH:
            raise ValueError(f"a stop sequence has 1 to {MAX_STOP_LENGTH} characters")
        return unicode_text(value)

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def unsupported(self) -> str | None:
        """Why this request asks for something no backend here does (or OpenAI refuses too), or None. A sentence
        for a 400."""
        if self.stream_options is not None and not self.stream:
            return "stream_options is only allowed with stream: true."
        if self.n is not None and self.n > 1:
            return f"n={self.n} is not supported: each request generates one choice; send {self.n} requests."
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty and frequency_penalty are not supported; leave them out or at 0."
        if self.logit_bias:
            return "logit_bias is not supported."
        return None


class CompletionRequest(_Sampling):
    """`POST /v1/completions`: continue a prompt."""

    prompt: str | list[str] | list[int] | list[list[int]]
    """Text or a list holding one text. Token ids (a list of them, or a list of such lists, as OpenAI takes them)
    pass the schema and are refused as unsupported (400)."""
    echo: StrictBool | None = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, strict=True)

    _unicode = field_validator("prompt", "suffix")(unicode_text)

    def unsupported(self) -> str | None:
        if isinstance(self.prompt, list) and self.prompt and not isinstance(self.prompt[0], str):
            return "token-id prompts are not supported: send the prompt as text."
        if isinstance(self.prompt, list) and len(self.prompt) > 1:
            return f"a list of {len(self.prompt)} prompts is not supported: send one prompt per request."
        if self.echo:
            return "echo is not supported."
        if self.suffix:
            return "suffix (insertion) is not supported."
        if self.best_of is not None and self.best_of > 1:
            return "best_of is not supported."
        if self.logprobs is not None and self.logprobs is not False:  # 0 asks for the chosen tokens' logprobs
            return "logprobs are not supported; leave them out."
        return super().unsupported()


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    """One message of a conversation. `content` may be OpenAI's list of parts; only text parts are accepted."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    _unicode = field_validator("content", "name")(unicode_text)

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    """`POST /v1/chat/completions`: answer a conversation, rendered through the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, strict=True)
    """OpenAI's newer name for `max_tokens`; the smaller wins when both are given."""
    top_logprobs: Any = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: Any = None

    def unsupported(self) -> str | None:
        """Besides what both kinds refuse: what would change the answer in a way no backend here can (tool
        calls, JSON output, logprobs). Accepted as OpenAI's defaults: tools with `tool_choice` "none", a
        `response_format` of type "text", `logprobs` false."""
        if self.tools and self.tool_choice != "none":
            return "tools are not supported: the model answers in text only; leave tools out or send tool_choice none."
        if self.functions and self.function_call != "none":
            return "functions are not supported: the model answers in text only; leave functions out."
        if self.tool_choice not in (None, "none", "auto"):
            return "tool_choice is not supported: no tool is called here."
        if self.function_call not in (None, "none", "auto"):
            return "function_call is not supported: no function is called here."
        if self.response_format is not None and self.response_format != {"type": "text"}:
            return "response_format is not supported: answers are free text; leave it out or send type text."
        if self.logprobs not in (None, False) or self.top_logprobs not in (None, 0):
            return "logprobs are not supported; leave logprobs and top_logprobs out."
        return super().unsupported()

    @property
    def token_limit(self) -> int | None:
        limits = [x for x in (self.max_tokens, self.max_completion_tokens) if x is not None]
        return min(limits) if limits else None


# Answers.


class _Answer(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Usage(_Answer):
    """Tokens counted with the model's own tokenizer."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "Usage":
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def chat_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def created_now() -> int:
    return int(time.time())


class CompletionChoice(_Answer):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None


class CompletionResponse(_Answer):
    """The answer of `/v1/completions`; also each streamed chunk (same `object`, as OpenAI sends it)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class AssistantMessage(_Answer):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Answer):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletionResponse(_Answer):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(_Answer):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Answer):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_Answer):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ErrorDetail(_Answer):
    message: str
    type: str
    param: str | None = None
    code: str


class OpenAIErrorBody(_Answer):
    """OpenAI's error shape; also the `data:` of an error event in a stream that already started.

    Named apart from modelfleet's own `broker.answers.ErrorBody`: both are components of the head's schema."""

    error: ErrorDetail


ErrorBody = OpenAIErrorBody


def error_type(status: int) -> str:
    """OpenAI's `type` for an HTTP status (openai-python keys its exception classes on the status, not this)."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status < 500:
        return "invalid_request_error"
    return "server_error"


def error_body(status: int, code: str, message: str, param: str | None = None) -> ErrorBody:
    return ErrorBody(error=ErrorDetail(message=message, type=error_type(status), param=param, code=code))


class ModelCard(ModelInfo):
    """A model as `GET /v1/models` lists it: modelfleet's record plus OpenAI's `object`, `created`, `owned_by`."""

    object: Literal["model"] = Field(default="model", alias="object")
    created: int = Field(default=0, alias="created")
    owned_by: str = Field(default="modelfleet", alias="owned_by")


class ModelCardList(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    object: Literal["list"] = "list"
    data: list[ModelCard]


SSE_DONE = b"data: [DONE]\n\n"


def sse_data(answer: BaseModel) -> bytes:
    """One Server-Sent Event carrying `answer` as JSON, as OpenAI streams it."""
    return b"data: " + answer.model_dump_json().encode() + b"\n\n"
