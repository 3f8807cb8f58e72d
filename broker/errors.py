"""The error tree. Every failure a client can see is one of these, with a stable `code`.

    ModelfleetError
    ├── InvalidRequest            bad input, rejected before anything is enqueued
    │   ├── InvalidModelId
    │   ├── ContextLengthExceeded the prompt plus max_tokens does not fit in the model's context
    │   ├── ChatTemplateError     the model's chat template failed on (or refused) these messages
    │   └── RequestTooLarge       the body is over the server's limit (`max_body_bytes`); nothing of it was used
    ├── AuthError
    │   ├── Unauthenticated       missing or wrong key
    │   ├── Forbidden             a read-only key asked for a change
    │   └── TooManyWrongKeys      too many wrong keys from this address: keys new to it wait `retry_after` s
    ├── NodeNotFound              fingerprint never registered
    ├── NodeUnavailable
    │   ├── NodeOffline           heartbeat lapsed before the request
    │   ├── NodeWentOffline       heartbeat lapsed while the job waited or ran
    │   └── NodeRestarted         a new process (boot id) took the node over while the job waited or ran
    ├── BrokerUnavailable         Redis cannot be reached
    ├── ShuttingDown              this process (an API, or a node) is stopping; another (or its restart) answers
    ├── JobTimeout                no reply within the operation's timeout
    ├── NodeError                 raised on a node, passed through by the API
    │   ├── ModelFileNotFound
    │   ├── ModelNotLoaded
    │   ├── PathOutsideModelsDir
    │   ├── InvalidModelFile
    │   ├── ModelLoadFailed
    │   │   └── BackendUnavailable
    │   ├── InsufficientMemory
    │   ├── JobExpired
    │   ├── ModelBusy             the model's queue of generations is full; retry after `retry_after` s
    │   └── GenerationFailed      the backend failed while generating
    ├── NodeLifecycleError        why a worker process cannot (go on) serving its node
    │   ├── DuplicateNode
    │   ├── LostNodeOwnership
    │   └── RedisRefused
    └── InternalError             a bug; the message never carries a traceback

The head and the nodes' inference endpoints map these classes to HTTP statuses by one table (`broker.status`);
nodes send them back by `code`.
"""

from typing import Any, ClassVar


class ModelfleetError(Exception):
    """Root of every modelfleet error: a sentence a person can act on, and a stable code."""

    code: ClassVar[str] = "error"

    def __init__(self, message: str, /, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "error": self.message, "details": self.details}


class InvalidRequest(ModelfleetError):
    """The request is malformed; nothing was enqueued."""

    code = "invalid_request"


class InvalidModelId(InvalidRequest):
    """The model id is empty, too long, or could escape its directory or URL."""

    code = "invalid_model_id"


class ContextLengthExceeded(InvalidRequest):
    """The prompt plus max_tokens is more than the loaded model's context length."""

    code = "context_length_exceeded"


class ChatTemplateError(InvalidRequest):
    """The model's chat template failed to render these messages, or refused them."""

    code = "chat_template_error"


class RequestTooLarge(InvalidRequest):
    """The request's body is over the server's limit (`MODELFLEET_MAX_BODY_BYTES`); nothing was done with it."""

    code = "request_too_large"

    @classmethod
    def over(cls, limit: int) -> "RequestTooLarge":
        """The error of a body over `limit` bytes (Starlette's 413, in the fleet's words)."""
        return cls(
            f"The request body is over this server's limit of {limit} bytes (MODELFLEET_MAX_BODY_BYTES).",
            limit_bytes=limit,
        )


class AuthError(ModelfleetError):
    """Authentication or authorization failed."""

    code = "auth_error"


class Unauthenticated(AuthError):
    """No key, or a key that is not one of ours."""

    code = "unauthenticated"


class Forbidden(AuthError):
    """The key is valid but its scope does not allow this operation."""

    code = "forbidden"


class TooManyWrongKeys(AuthError):
    """Too many wrong keys from this address lately: a key new to it waits `details.retry_after` seconds."""

    code = "too_many_wrong_keys"


class NodeNotFound(ModelfleetError):
    """No node with this fingerprint ever registered."""

    code = "node_not_found"


class NodeUnavailable(ModelfleetError):
    """The node cannot take the job now."""

    code = "node_unavailable"


class NodeOffline(NodeUnavailable):
    """The node's heartbeat had lapsed when the request arrived."""

    code = "node_offline"


class NodeWentOffline(NodeUnavailable):
    """The node's heartbeat lapsed while the job was queued or running."""

    code = "node_went_offline"


class NodeRestarted(NodeUnavailable):
    """The node's worker process was replaced (a new boot id) while the job was queued or running."""

    code = "node_restarted"


class BrokerUnavailable(ModelfleetError):
    """Redis, which carries every job, cannot be reached."""

    code = "broker_unavailable"


class ShuttingDown(ModelfleetError):
    """This process is stopping (an API: no new event streams; a node: no generations); try another or later."""

    code = "shutting_down"


class JobTimeout(ModelfleetError):
    """The node did not answer within the operation's timeout."""

    code = "timeout"


class NodeError(ModelfleetError):
    """An error raised on a node and passed back to the caller as it is."""

    code = "node_error"


class ModelFileNotFound(NodeError):
    """The model file does not exist in the node's models directory."""

    code = "model_file_not_found"


class ModelNotLoaded(NodeError):
    """The model is not loaded on this node."""

    code = "model_not_loaded"


class PathOutsideModelsDir(NodeError):
    """The model path resolves outside the node's models directory."""

    code = "path_outside_models_dir"


class InvalidModelFile(NodeError):
    """The file is not a GGUF model this node can load."""

    code = "invalid_model_file"


class ModelLoadFailed(NodeError):
    """The backend failed to load a valid-looking model."""

    code = "model_load_failed"


class BackendUnavailable(ModelLoadFailed):
    """No backend this node runs can run the file (or the one asked for is not installed or cannot)."""

    code = "backend_unavailable"


class InsufficientMemory(NodeError):
    """The model's memory estimate does not fit in the node's free budget."""

    code = "insufficient_memory"


class JobExpired(NodeError):
    """The job reached the node after its deadline and was not run."""

    code = "job_expired"


class ModelBusy(NodeError):
    """The model's bounded queue of generations is full; `details.retry_after` says when to try again."""

    code = "model_busy"


class GenerationFailed(NodeError):
    """The backend failed while generating; the model is marked unhealthy."""

    code = "generation_failed"


class NodeLifecycleError(ModelfleetError):
    """A worker cannot start, or must stop, serving its node."""

    code = "node_lifecycle"


class DuplicateNode(NodeLifecycleError):
    """Another live process already serves this node's fingerprint."""

    code = "duplicate_node"


class LostNodeOwnership(NodeLifecycleError):
    """While this node was stalled, another process took over its fingerprint."""

    code = "lost_node_ownership"


class RedisRefused(NodeLifecycleError):
    """Redis answered but refused the worker's credentials: waiting will not help."""

    code = "redis_refused"


class InternalError(ModelfleetError):
    """An unexpected failure; details are in the server's log, not in the reply."""

    code = "internal_error"


def _all_subclasses(cls: type[ModelfleetError]) -> list[type[ModelfleetError]]:
    found = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_all_subclasses(sub))
    return found


_ALL: list[type[ModelfleetError]] = [ModelfleetError, *_all_subclasses(ModelfleetError)]
ERRORS_BY_CODE: dict[str, type[ModelfleetError]] = {cls.code: cls for cls in _ALL}


def from_code(code: str, message: str, details: dict[str, Any] | None = None) -> ModelfleetError:
    """Rebuild an error sent by a node; an unknown code becomes a plain NodeError carrying that code."""
    cls = ERRORS_BY_CODE.get(code)
    if cls is None:
        err: ModelfleetError = NodeError(message, **(details or {}))
        err.code = code  # type: ignore[misc]
        return err
    return cls(message, **(details or {}))
