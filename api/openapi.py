"""How the routes describe themselves in the OpenAPI schema, and the pages that show it (`/docs`, `/redoc`).

A route declares its key scope and the errors it can answer through `guarded` (or `job_route` for a route that
runs one operation of `broker.operations`): the same declaration installs the auth dependency and documents
the 401/403 answers, so the schema says exactly what the route does. Error statuses come from the one table in
`api.errors`.

Swagger UI and ReDoc are served by the API itself from the assets `fastapi-offline` ships (a PyPI package that
only carries them): GPU clusters are often air-gapped, and a CDN-hosted page would be blank there.
"""

from typing import Any

from api.deps import secured
from api.errors import documented
from broker import errors as e
from broker.operations import Op, Scope

TAGS = [
    {"name": "nodes", "description": "One node at a time, as remote-model-control.txt defines it (camelCase)."},
    {"name": "pool", "description": "The fleet as one pool, as model-loading.txt defines it (snake_case)."},
    {"name": "events", "description": "The pool's changes, live, as Server-Sent Events."},
    {"name": "operations", "description": "Health and metrics, for the people and machines that run the fleet."},
    {"name": "inference", "description": "OpenAI's completions and chat completions, run on the fleet."},
    {"name": "session", "description": "The dashboard's sign-in: a key once, then an HttpOnly session cookie."},
]

DESCRIPTION = """\
Control which AI models are loaded on a fleet of GPU nodes.

Every route but `/healthz` and the dashboard's sign-in needs `Authorization: Bearer <key>` (the **Authorize**
button) or the dashboard's session cookie: a read-only key for everything that changes nothing, an operator key
for loads and unloads. Errors answer
`{"success": false, "error": "<what to do>", "code": "<stable code>", "details": {...}}`, except under `/v1`
outside the pool's routes (inference, one model's entry), where they take OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, which openai-python reads.
"""


def auth_errors(scope: Scope) -> tuple[type[e.ModelfleetError], ...]:
    keys = (e.Unauthenticated, e.TooManyWrongKeys)
    return keys if scope is Scope.READ else (*keys, e.Forbidden)


def guarded(
    scope: Scope,
    *errors: type[e.ModelfleetError],
    streaming: bool = False,
    openai: bool = False,
    openapi_extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Route options for a route that needs a key of `scope`, reads Redis and can answer `errors` (in OpenAI's
    shape with `openai`: a route `api.errors.speaks_openai` names)."""
    return {
        **secured(scope, openapi_extra),
        "responses": documented(*auth_errors(scope), e.BrokerUnavailable, *errors, streaming=streaming, openai=openai),
    }


JOB_ERRORS = (e.InvalidRequest, e.NodeNotFound, e.NodeUnavailable, e.JobTimeout, e.NodeError)
"""What the API itself answers around a job on a named node (a node's unknown error code passes as NodeError)."""


def job_route(op: Op[Any, Any], *errors: type[e.ModelfleetError]) -> dict[str, Any]:
    """Route options for a route that runs `op` on one node: its scope, its answer, every error it can answer."""
    return {"response_model": op.result, **guarded(op.scope, *JOB_ERRORS, *op.errors, *errors)}


def document_body_limit(schema: dict[str, Any]) -> None:
    """Add the body limit's 413 (`broker.body_limit`) to every operation of `schema` that takes a body, in the
    shape of its other errors (its 500's content: the API's `ErrorBody` or OpenAI's)."""
    error = e.RequestTooLarge
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            if "requestBody" not in operation:
                continue
            responses = operation["responses"]
            responses["413"] = {
                "description": f"The error's `code` is one of:\n\n- `{error.code}`: {(error.__doc__ or '').strip()}",
                "content": responses["500"]["content"],
            }
