"""Celery's side of the bench: Redis as broker, no result backend, the same tasks as ``bench.tasks``.

Celery has no per-key control: calls for one account may overlap, and the
provider counts the collisions. No-op tasks note when they ran in a Redis
list, which is how the bench times a drain without a result backend.
"""

import os
import threading
import time
from urllib.parse import quote

import httpx
import redis
from celery import Celery

REDIS_URL = os.environ.get("KEYJOBS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
PROVIDER_URL = os.environ.get("PROVIDER_URL", "http://127.0.0.1:8765")
QUEUE = "kjbench"
#: Redis keys the tasks write and the bench reads.
DONE_KEY = "kjbench:done"
LATENCY_KEY = "kjbench:latency"
READY_KEY = "kjbench:ready"

app = Celery("kjbench", broker=REDIS_URL)
app.conf.update(
    task_default_queue=QUEUE,
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)

_local = threading.local()
_redis = redis.Redis.from_url(REDIS_URL)


def provider() -> httpx.Client:
    """Return this thread's client of the provider, kept open from call to call."""
    if getattr(_local, "client", None) is None:
        _local.client = httpx.Client(base_url=PROVIDER_URL, trust_env=False, timeout=httpx.Timeout(70.0))
    client: httpx.Client = _local.client
    return client


@app.task(name="call")
def call(account_id: str, op: str) -> None:
    """Call the provider for ``account_id``; raise on a collision (429)."""
    provider().post(f"/call/{quote(account_id, safe='')}/{quote(op, safe='')}").raise_for_status()


@app.task(name="noop")
def noop() -> None:
    """Do nothing but note the time it ran."""
    _redis.rpush(DONE_KEY, time.time())


@app.task(name="stamp")
def stamp(sent_at: float) -> None:
    """Note how long after ``sent_at`` (the caller's clock, the same machine) this started."""
    _redis.rpush(LATENCY_KEY, time.time() - sent_at)


@app.task(name="ready")
def ready() -> None:
    _redis.rpush(READY_KEY, 1)
