"""Every route handler and dependency of the head and of a node's endpoint is a coroutine: FastAPI runs a plain
`def` in its thread pool, a thread hop per call per request, which showed in the head's profile."""

import inspect
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from pydantic import SecretStr

from api.app import create_app
from api.settings import ApiSettings
from broker.auth import KeyRing
from broker.wrong_keys import WrongKeys
from workers.backend import CTransformersLoader
from workers.inference.server import create_node_app
from workers.manager import ModelManager


def _calls(dependant: Dependant) -> Iterator[object]:
    for sub in dependant.dependencies:
        if sub.call is not None:
            yield sub.call
        yield from _calls(sub)


def _routes(routes: list[Any]) -> Iterator[APIRoute]:
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):  # FastAPI >= 0.16x keeps an included router whole
            yield from _routes(route.original_router.routes)


def _blocking(app: FastAPI) -> list[str]:
    found = []
    for route in _routes(app.routes):
        if not route.endpoint.__module__.startswith(("api.", "workers.")):
            continue  # the docs pages of fastapi-offline
        for call in [route.endpoint, *_calls(route.dependant)]:
            runs = call if inspect.isfunction(call) else type(call).__call__  # a security scheme's instance
            if not inspect.iscoroutinefunction(runs):
                found.append(f"{route.path}: {getattr(call, '__qualname__', call)}")
    return found


def test_the_heads_handlers_and_dependencies_never_hop_to_a_thread() -> None:
    app = create_app(ApiSettings(operator_keys="op-key", api_keys="read-key"))
    assert len(list(_routes(app.routes))) > 20
    assert _blocking(app) == []


def test_a_nodes_handlers_and_dependencies_never_hop_to_a_thread() -> None:
    app = create_node_app(
        ModelManager(CTransformersLoader(threads=1)), KeyRing([SecretStr("k")], []), wrong_keys=WrongKeys(20, 60)
    )
    assert _blocking(app) == []
