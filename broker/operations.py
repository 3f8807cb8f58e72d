"""The registry of operations: each job a node runs, declared once.

An `Op` says everything both sides need to know about one operation: its Celery task name, the job model the
API sends, the result model the node answers, how long the API waits by default (and which setting overrides
that), and the key scope a caller needs. The API's `JobClient`, the worker's task registration, the routes'
`response_model`s and the Python client read these declarations; nothing else keys a table by task name.

Adding an operation: declare its job and result models in `broker.schemas`, an `Op` here and add it to
`OPERATIONS`; the worker then refuses to start until it has a handler for it (`workers.tasks.HANDLERS`).
"""

from dataclasses import dataclass
from functools import cached_property
from typing import Generic, TypeVar

from pydantic import BaseModel

from broker import errors as e
from broker import keys
from broker.auth import Scope
from broker.schemas import (
    CatalogJob,
    Job,
    ListJob,
    LoadJob,
    LoadResult,
    ModelList,
    NodeCatalog,
    Operation,
    Reply,
    UnloadAllJob,
    UnloadAllResult,
    UnloadJob,
    UnloadResult,
)

J = TypeVar("J", bound=Job)
R = TypeVar("R", bound=BaseModel)


@dataclass(frozen=True, eq=False)
class Op(Generic[J, R]):
    """One operation a node runs for the API: what goes, what comes back, how long to wait, who may ask."""

    name: Operation
    """Stable name: the `operation` label of the API's job metrics."""
    title: str
    """What a sentence calls it ("the model list")."""
    job: type[J]
    result: type[R]
    default_timeout: float
    """Seconds the API waits for the reply unless `timeout_setting` says otherwise."""
    timeout_setting: str
    """The API setting (`ApiSettings` field, `MODELFLEET_<NAME>` variable) that overrides the default."""
    scope: Scope
    errors: tuple[type[e.ModelfleetError], ...] = ()
    """What the node itself may answer besides the result (the API adds its own: offline, timeout...)."""

    @property
    def changes_models(self) -> bool:
        """Whether the job may change the node's models (an operator's job): its node publishes the change before
        it replies."""
        return self.scope is Scope.OPERATOR

    @cached_property
    def reply(self) -> "type[Reply[R]]":
        """The model of this operation's reply, `Reply[result]`, made once. Pydantic keeps a parametrized model
        only weakly: made afresh in a function, it lives until a garbage collection, and the next reply paid
        milliseconds to make it again (8% of an API's lists did, under load)."""
        return Reply[self.result]  # type: ignore[name-defined]

    @property
    def task(self) -> str:
        """The Celery task name the job travels under."""
        return keys.task_name(self.name.value)

    def __repr__(self) -> str:
        return f"Op({self.name.value})"


# Any job can arrive late, be malformed (a version mismatch) or hit a bug on the node.
_ANY_JOB = (e.JobExpired, e.InvalidRequest, e.InternalError)

LOAD = Op(
    Operation.LOAD,
    "load",
    LoadJob,
    LoadResult,
    default_timeout=600.0,
    timeout_setting="load_timeout",
    scope=Scope.OPERATOR,
    errors=(
        e.ModelFileNotFound,
        e.PathOutsideModelsDir,
        e.InvalidModelFile,
        e.ModelLoadFailed,
        e.InsufficientMemory,
        *_ANY_JOB,
    ),
)
UNLOAD = Op(
    Operation.UNLOAD,
    "unload",
    UnloadJob,
    UnloadResult,
    default_timeout=60.0,
    timeout_setting="unload_timeout",
    scope=Scope.OPERATOR,
    errors=(e.ModelNotLoaded, e.JobTimeout, *_ANY_JOB),
)
UNLOAD_ALL = Op(
    Operation.UNLOAD_ALL,
    "unload-all",
    UnloadAllJob,
    UnloadAllResult,
    default_timeout=60.0,
    timeout_setting="unload_timeout",
    scope=Scope.OPERATOR,
    errors=_ANY_JOB,
)
LIST = Op(
    Operation.LIST,
    "model list",
    ListJob,
    ModelList,
    default_timeout=30.0,
    timeout_setting="list_timeout",
    scope=Scope.READ,
    errors=_ANY_JOB,
)
CATALOG = Op(
    Operation.CATALOG,
    "catalog",
    CatalogJob,
    NodeCatalog,
    default_timeout=30.0,
    timeout_setting="list_timeout",
    scope=Scope.READ,
    errors=_ANY_JOB,
)

OPERATIONS: tuple[Op, ...] = (LOAD, UNLOAD, UNLOAD_ALL, LIST, CATALOG)
"""Every operation, in the order documentation lists them."""
