"""Schemas, errors, settings and log masking: the contract both sides rely on."""

import ast
import io
import logging
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from api.settings import ApiSettings
from broker import errors
from broker.logs import SecretMask
from broker.schemas import LoadJob, ModelState, Reply, check_model_id
from broker.settings import BrokerSettings

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("good", ["m", "org/model-7b.Q4_K_M", "a b", "x" * 128, "ünïcode"])
def test_good_model_ids(good: str) -> None:
    assert check_model_id(good) == good


@pytest.mark.parametrize(
    "bad",
    [
        *["", " ", "..", "a/../b", "/abs", "\\win", "a\x00b", "a\x7fb", "x" * 129, "a\u2028b", "a\u2029b", "a\x85b"],
        *[
            "a\u202eb",
            "a\u200bb",
            "a\xa0b",
            "a%2fb",
            "a?b",
            "a#b",
            "a'b",
            'a"b',
            "a;b",
            "a*b",
            "a$b",
            "a`b",
            " a",
            "a ",
        ],
    ],
)
def test_bad_model_ids(bad: str) -> None:
    with pytest.raises(errors.InvalidModelId) as caught:
        check_model_id(bad)
    assert caught.value.message.isprintable(), caught.value.message  # safe to log and to show in a terminal
    with pytest.raises(ValidationError):
        LoadJob(deadline=1.0, model_id=bad)


def test_wire_models_are_frozen_strict_and_camel_case() -> None:
    job = LoadJob(deadline=1.0, model_id="m", context_length=5)
    assert job.wire() == {
        "deadline": 1.0,
        "modelId": "m",
        "modelPath": None,
        "contextLength": 5,
        "gpuLayers": None,
        "forceReload": False,
        "evict": False,
        "pin": False,
        "keepAlive": None,
        "backend": None,
    }
    assert LoadJob.model_validate(job.wire()) == job
    with pytest.raises(ValidationError):
        LoadJob.model_validate({**job.wire(), "extra": 1})
    with pytest.raises(ValidationError):
        job.model_id = "other"  # type: ignore[misc]
    assert ModelState("loaded") is ModelState.LOADED


def test_errors_round_trip_by_code() -> None:
    sent = errors.InsufficientMemory("no room", needed_bytes=5)
    back = errors.from_code(sent.code, sent.message, sent.details)
    assert type(back) is errors.InsufficientMemory and back.details == {"needed_bytes": 5}
    unknown = errors.from_code("something_new", "text")
    assert isinstance(unknown, errors.NodeError) and unknown.code == "something_new"
    codes = [cls.code for cls in errors.ERRORS_BY_CODE.values()]
    assert len(codes) == len(set(codes)), "every error class needs its own code"
    reply = Reply(job_id="j", node="n", error={"code": "x", "error": "y"})
    assert reply.error is not None and reply.error.details == {}


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELFLEET_REDIS_URL", "redis://:hunter2-pass@h:1/0")
    monkeypatch.setenv("MODELFLEET_OPERATOR_KEYS", "k1, k2")
    monkeypatch.setenv("MODELFLEET_API_KEYS", "r1")
    monkeypatch.setenv("MODELFLEET_LOAD_TIMEOUT", "12")
    settings = ApiSettings()
    assert [k.get_secret_value() for k in settings.operator_keys] == ["k1", "k2"]
    assert settings.load_timeout == 12
    assert "hunter2" not in settings.safe_redis_url and "hunter2" not in repr(settings)
    assert BrokerSettings(redis_url=SecretStr("redis://h:1/0")).safe_redis_url == "redis://h:1/0"


def test_secret_mask_scrubs_messages_args_and_tracebacks() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(SecretMask(["s3cr3t-value"]))
    logger = logging.getLogger("test-mask")
    logger.addHandler(handler)
    try:
        logger.error("direct s3cr3t-value and %s", "arg s3cr3t-value")
        try:
            raise RuntimeError("boom s3cr3t-value")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    assert "s3cr3t-value" not in stream.getvalue() and stream.getvalue().count("***") >= 3


def _imports(package: str) -> set[str]:
    found: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        found |= _imports_of(path)
    return found


def _imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_imports_flow_api_to_broker_from_workers() -> None:
    assert "workers" not in _imports("api") and "ctransformers" not in _imports("api")
    broker = _imports("broker")
    assert not broker & {"api", "workers", "fastapi", "ctransformers", "starlette"}
    assert "api" not in _imports("workers")
    # The node's inference endpoint is the one place a worker speaks HTTP; the rest stays free of the transport.
    web = {"fastapi", "starlette", "uvicorn"}
    serving = [p.relative_to(ROOT) for p in (ROOT / "workers").rglob("*.py") if _imports_of(p) & web]
    assert serving == [Path("workers/inference/server.py")]


def test_error_details_may_use_any_name() -> None:
    err = errors.from_code("model_not_loaded", "gone", {"message": "x", "code": "y"})
    assert err.message == "gone" and err.details == {"message": "x", "code": "y"}
