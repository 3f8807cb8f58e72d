"""Request dependencies as `Annotated` aliases: the services on app.state, and the two auth scopes."""

from typing import Annotated

from fastapi import Depends, Header, Request

from api.auth import KeyRing, Scope
from api.events import EventRelay
from api.jobs import JobClient
from api.metrics import Metrics
from api.pool import Pool
from api.proxy import NodeProxy
from api.settings import ApiSettings
from broker.registry import NodeDirectory


def _state(request: Request):
    return request.app.state


def get_settings(request: Request) -> ApiSettings:
    return _state(request).settings


def get_directory(request: Request) -> NodeDirectory:
    return _state(request).directory


def get_jobs(request: Request) -> JobClient:
    return _state(request).jobs


def get_relay(request: Request) -> EventRelay:
    return _state(request).relay


def get_metrics(request: Request) -> Metrics:
    return _state(request).metrics


def get_proxy(request: Request) -> NodeProxy:
    return _state(request).proxy


def get_pool(request: Request) -> Pool:
    state = _state(request)
    return Pool(state.directory, state.jobs, state.settings)


def _authorize(request: Request, authorization: str | None, scope: Scope) -> Scope:
    keyring: KeyRing = _state(request).keyring
    return keyring.authorize(authorization, scope)


def require_read(request: Request, authorization: Annotated[str | None, Header()] = None) -> Scope:
    return _authorize(request, authorization, Scope.READ)


def require_operator(request: Request, authorization: Annotated[str | None, Header()] = None) -> Scope:
    return _authorize(request, authorization, Scope.OPERATOR)


Settings = Annotated[ApiSettings, Depends(get_settings)]
Directory = Annotated[NodeDirectory, Depends(get_directory)]
Jobs = Annotated[JobClient, Depends(get_jobs)]
Relay = Annotated[EventRelay, Depends(get_relay)]
AppMetrics = Annotated[Metrics, Depends(get_metrics)]
Fleet = Annotated[Pool, Depends(get_pool)]
Proxy = Annotated[NodeProxy, Depends(get_proxy)]
Reader = Annotated[Scope, Depends(require_read)]
Operator = Annotated[Scope, Depends(require_operator)]
