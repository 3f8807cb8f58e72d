"""The Celery app both sides share: JSON only, events on, and no result backend.

Replies do not go through Celery's result backend: `AsyncResult.get()` blocks, leaks subscriptions and has no
awaitable form. A worker writes its reply to `keys.reply(job_id)` and publishes it on `keys.replies_channel()`
(see `broker.replies`), and the API awaits it on its own event loop.

Acks are early (the default), chosen deliberately: a job whose worker is killed mid-run is lost rather than
redelivered an hour later by the visibility timeout, which would load a model nobody is waiting for. The API
notices the lapsed heartbeat and answers 503 within seconds.
"""

from celery import Celery

from broker.settings import BrokerSettings


def make_celery(settings: BrokerSettings, *, main: str = "modelfleet") -> Celery:
    """Build the shared app. Both the API (to send) and workers (to consume) call this at start-up."""
    url, transport_options = settings.redis_target.celery_broker()
    app = Celery(main, broker=url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=False,
        # It cancels running acks_late tasks when the broker connection drops: we have none, so it changes nothing;
        # left unset, Celery warns about its coming default in a 6-line warning at every Redis blip.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        task_send_sent_event=True,
        worker_send_task_events=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": 3600, **transport_options},
        task_create_missing_queues=True,
        enable_utc=True,
    )
    return app
