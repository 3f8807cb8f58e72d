"""The job ledger scripts (`broker.replies`) against fakeredis: a job starts once, or never once cancelled, and
the API's cancel says which boot had started it."""

import asyncio

import fakeredis

from broker.replies import AGAIN, CANCELLED, START, abandon_job, start_job
from tests.broker.conftest import Run


def test_a_job_starts_once_and_a_second_delivery_is_recognised() -> None:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeRedis(server=server)
    assert start_job(client, "j1", "boot-1", ttl=60) == START
    assert start_job(client, "j1", "boot-2", ttl=60) == AGAIN
    started = asyncio.run(abandon_job(fakeredis.FakeAsyncRedis(server=server), "j1", ttl=60))
    assert started == "boot-1"


def test_a_cancelled_job_never_starts_and_a_successor_keeps_its_job(run: Run) -> None:
    server = fakeredis.FakeServer()
    client, aclient = fakeredis.FakeRedis(server=server), fakeredis.FakeAsyncRedis(server=server)
    assert run(abandon_job(aclient, "j2", ttl=60)) is None
    assert start_job(client, "j2", "boot-1", ttl=60) == CANCELLED
    assert start_job(client, "j3", "boot-2", ttl=60) == START
    assert run(abandon_job(aclient, "j3", ttl=60, keep_for="boot-2")) == "boot-2"
    assert not client.exists("modelfleet:cancel:j3")  # the new process that took it goes on
