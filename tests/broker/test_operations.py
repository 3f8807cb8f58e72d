"""The operation registry: one declaration per operation, read by every side, and no other table of them."""

import gc
import re
import weakref
from pathlib import Path

from pydantic import BaseModel

from api.settings import ApiSettings
from broker import keys
from broker.operations import LOAD, OPERATIONS, Scope
from broker.schemas import Job, LoadResult, Operation, Reply, ReplyHeader
from workers.tasks import HANDLERS

ROOT = Path(__file__).resolve().parents[2]


def test_every_operation_is_declared_once_with_its_types_timeout_and_scope() -> None:
    assert [op.name for op in OPERATIONS] == list(Operation)
    assert len({op.task for op in OPERATIONS}) == len(OPERATIONS)
    settings = ApiSettings()
    for op in OPERATIONS:
        assert op.task == keys.task_name(op.name.value) and op.task.startswith(f"{keys.PREFIX}.")
        assert issubclass(op.job, Job) and issubclass(op.result, BaseModel)
        assert op.timeout_setting in ApiSettings.model_fields
        assert settings.timeout(op) == op.default_timeout > 0
        assert op.scope in Scope
    assert {op.name.value for op in OPERATIONS if op.scope is Scope.OPERATOR} == {"load", "unload", "unload_all"}
    assert ApiSettings(load_timeout=5).timeout(LOAD) == 5


def test_the_worker_handles_every_operation() -> None:
    assert set(HANDLERS) == set(OPERATIONS)


def test_no_task_name_is_written_outside_the_registry() -> None:
    """Task names are made by `keys.task_name` for `broker.operations`; a literal anywhere else is a second table."""
    names = re.compile(r"""["']modelfleet\.(load|unload|unload_all|list|catalog)["']""")
    tables = re.compile(r"\b(OPERATION_NAMES|_JOB_TYPES|TASK_[A-Z_]+)\b")
    for package in ("api", "broker", "workers", "modelfleet", "bench"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            assert not names.search(text), path
            assert not tables.search(text), path


def test_a_reply_carries_its_operations_result_model() -> None:
    result = LoadResult(model_id="m", node="n", state="loaded", load_seconds=0.1, already_loaded=False)
    raw = Reply[LoadResult](job_id="j", node="n", result=result).model_dump_json(by_alias=True)
    assert '"loadSeconds":0.1' in raw and '"jobId":"j"' in raw
    assert ReplyHeader.model_validate_json(raw).job_id == "j"
    back = LOAD.reply.model_validate_json(raw)
    assert back.result == result and isinstance(back.result, LoadResult)


def test_each_operations_reply_model_is_made_once_and_kept() -> None:
    """Pydantic keeps a parametrized model only weakly. Made per reply (`Reply[op.result]` in a function), it
    was collected by the next full garbage collection and made again, milliseconds each time, for 8% of lists."""
    for op in OPERATIONS:
        made = weakref.ref(op.reply)
        gc.collect()
        assert made() is op.reply
        assert op.reply.model_fields["result"].annotation == op.result | None
