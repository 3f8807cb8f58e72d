"""Fixtures of the API's tests."""

import pytest

from tests.conftest import RedisServer


@pytest.fixture
def redis(redis_server: RedisServer) -> str:
    """The URL of the session's redis-server, emptied for this test."""
    redis_server.client().flushdb()
    return redis_server.url
