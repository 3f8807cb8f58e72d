"""The fleet's OpenAI-compatible inference routes: `POST /v1/completions` and `POST /v1/chat/completions`.

Read-scope keys run inference (model-loading.txt: standard keys run inference, operator keys manage). The head
validates the body with the same schemas the nodes answer with (`broker.openai`), refuses what no node can do,
and proxies the request as it came to a replica of the model (`api.proxy`, `api.routing`). Answers are the
node's own: JSON, or with `stream: true` Server-Sent Events ending in `data: [DONE]`. Errors, the head's and the
node's, have OpenAI's shape.
"""

from typing import Any

from fastapi import APIRouter, Request

from api.deps import Proxy, secured
from api.errors import documented
from api.proxy import NodeProxy, ProxyResponse
from broker.auth import Scope
from broker.errors import (
    BrokerUnavailable,
    Forbidden,
    GenerationFailed,
    InsufficientMemory,
    InvalidRequest,
    JobTimeout,
    ModelBusy,
    ModelFileNotFound,
    NodeError,
    NodeUnavailable,
    TooManyWrongKeys,
    Unauthenticated,
)
from broker.openai import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorBody,
)

router = APIRouter(prefix="/v1", tags=["inference"])


def _answers(answer: type, chunk: type) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI description of an inference route's answers: JSON, an event stream of chunks, OpenAI errors.

    The head's own failures come from the one error table (`api.errors.documented`, in OpenAI's shape); a node's
    answers pass through as they came, so its statuses (429 busy) are listed as well.
    """
    stream = {
        "schema": {
            "type": "string",
            "description": f"`data: <{chunk.__name__}>` events, then `data: [DONE]`. Without"
            ' `stream_options.include_usage`, an SSE comment `: {"completion_tokens":N}` (which SSE clients'
            " skip) comes before `data: [DONE]`.",
        }
    }
    errors = documented(*_ERRORS, openai=True)
    for status, description in _DESCRIPTIONS.items():
        errors.setdefault(status, {"model": ErrorBody, "description": ""})
        errors[status]["description"] = f"{description}\n\n{errors[status]['description']}".strip()
    return {200: {"model": answer, "content": {"text/event-stream": stream}}, **errors}


_ERRORS = (  # the head's own, and a node's passed through
    InvalidRequest,
    ModelBusy,
    GenerationFailed,
    Unauthenticated,
    TooManyWrongKeys,
    Forbidden,  # a signed-in page's request without its CSRF token
    NodeUnavailable,
    BrokerUnavailable,
    ModelFileNotFound,
    InsufficientMemory,
    JobTimeout,
    NodeError,
)
_DESCRIPTIONS = {
    400: "Invalid parameters, or options no node supports.",
    404: "The model is on no online node (or not loaded, with load on demand off).",
    409: "The model fits on no node.",
    422: "The body does not match the schema (OpenAI's shape, `param` names the first field).",
    429: "Every replica's queue is full, or this address sent too many wrong keys lately; retry after `Retry-After`.",
    502: "A node answered something unusable.",
    503: "No replica could answer (each failed before its first byte), or Redis is unreachable.",
    504: "The load on demand did not finish within the load timeout.",
}


COMPLETIONS, CHAT = "/completions", "/chat/completions"
BODIES: dict[str, type[CompletionRequest | ChatCompletionRequest]] = {
    router.prefix + COMPLETIONS: CompletionRequest,
    router.prefix + CHAT: ChatCompletionRequest,
}
"""Each route's full path and its body's schema (`api.fastlane` answers both beneath FastAPI)."""

SCOPE = Scope.READ
"""What a key needs to run inference (model-loading.txt: standard keys run inference, operator keys manage)."""


async def proxied(
    proxy: NodeProxy, body: CompletionRequest | ChatCompletionRequest, request: Request, path: str
) -> ProxyResponse:
    """The proxied answer to a valid body, as the routes and `api.fastlane` both make it."""
    why = body.unsupported()
    if why is not None:  # refused here, before a load on demand or a node's queue is spent on it
        raise InvalidRequest(why)
    raw = await request.body()  # passed on as it came: fields this head does not know still reach the node
    authorization = request.headers.get("authorization")
    return ProxyResponse(proxy, body.model, path, raw, stream=bool(body.stream), authorization=authorization)


@router.post(
    COMPLETIONS,
    response_model=CompletionResponse,
    responses=_answers(CompletionResponse, CompletionResponse),
    **secured(SCOPE),
    summary="Continue a prompt on a node that has the model",
)
async def completions(body: CompletionRequest, request: Request, proxy: Proxy) -> ProxyResponse:
    """OpenAI's completions API: the prompt runs on the least busy node where the model is loaded (loaded on
    demand if it is loaded nowhere), as JSON or, with `stream: true`, as Server-Sent Events."""
    return await proxied(proxy, body, request, router.prefix + COMPLETIONS)


@router.post(
    CHAT,
    response_model=ChatCompletionResponse,
    responses=_answers(ChatCompletionResponse, ChatCompletionChunk),
    **secured(SCOPE),
    summary="Answer a conversation on a node that has the model",
)
async def chat_completions(body: ChatCompletionRequest, request: Request, proxy: Proxy) -> ProxyResponse:
    """OpenAI's chat completions API, rendered with the model's chat template: routed, loaded on demand and
    streamed as `/v1/completions` is."""
    return await proxied(proxy, body, request, router.prefix + CHAT)
