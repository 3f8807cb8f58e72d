"""Parsing the Redis URL forms (`broker.connection`); the real Sentinel is in tests/faults/test_sentinel.py."""

import pytest
import redis

from broker.connection import parse_redis_url, redis_problem
from broker.settings import BrokerSettings
from tests.conftest import RedisServer


def test_a_plain_url_is_one_server() -> None:
    target = parse_redis_url("redis://:pw@h:6379/2")
    assert not target.is_sentinel
    assert target.celery_broker() == ("redis://:pw@h:6379/2", {})


def test_redis_sentinel_url_names_sentinels_master_db_and_passwords() -> None:
    target = parse_redis_url("redis+sentinel://:p%40ss@s1:26379,s2:26380/prod/3?sentinel_password=sp")
    assert target.sentinels == [("s1", 26379), ("s2", 26380)]
    assert (target.master, target.db, target.password, target.sentinel_password) == ("prod", 3, "p@ss", "sp")
    url, options = target.celery_broker()
    assert url == "sentinel://:p%40ss@s1:26379/3;sentinel://:p%40ss@s2:26380/3"
    assert options["master_name"] == "prod" and options["sentinel_kwargs"]["password"] == "sp"
    # One try per sentinel: a sentinel that is down is passed over at once, not retried with backoff.
    assert options["sentinel_kwargs"]["retry"].get_retries() == 0
    assert "p@ss" not in target.safe() and "p%40ss" not in target.safe() and "sp" not in target.safe()


def test_celery_sentinel_url_takes_the_master_from_settings() -> None:
    settings = BrokerSettings(redis_url="sentinel://:pw@a:1/4;sentinel://b:2", sentinel_master="m")  # type: ignore[arg-type]
    target = settings.redis_target
    assert (target.sentinels, target.master, target.db, target.password) == ([("a", 1), ("b", 2)], "m", 4, "pw")
    assert target.sentinel_password is None  # sentinels usually have no password: none is sent
    assert "pw" not in settings.safe_redis_url


@pytest.mark.parametrize(
    "url",
    ["redis+sentinel://:pw@/m", "redis+sentinel://h/m", "redis+sentinel://h:1/m/x", "sentinel://h:1;redis://h:2"],
)
def test_malformed_sentinel_urls_are_refused_without_echoing_them(url: str) -> None:
    with pytest.raises(ValueError) as caught:
        BrokerSettings(redis_url=url)  # type: ignore[arg-type]
    assert "pw" not in str(caught.value).replace("password", "")


def test_a_redis_failure_is_told_by_its_kind_never_by_the_servers_words(redis_server: RedisServer) -> None:
    """A full Redis answered every write with "Redis is unreachable" while /healthz said reachable."""
    client = redis_server.client()
    client.config_set("maxmemory", 1)
    try:
        with pytest.raises(redis.ResponseError) as full:
            client.set("secret-key-name", "x" * 1000)
    finally:
        client.config_set("maxmemory", 0)
    assert "out of memory" in redis_problem(full.value) and "secret" not in redis_problem(full.value)
    assert "credentials" in redis_problem(redis.AuthenticationError("WRONGPASS"))
    assert "read-only replica" in redis_problem(redis.ReadOnlyError("READONLY You can't write against a replica."))
    assert "cannot be reached" in redis_problem(redis.ConnectionError("Connection refused"))
    assert "did not answer in time" in redis_problem(redis.TimeoutError("Redis did not answer within 1 s"))
