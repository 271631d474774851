"""DBOS Transact's side of the bench: its workflows, its queues, and a worker process.

    python -m bench.peers.dbos_app         # a worker process: DBOS launched, dequeuing until SIGTERM

Per-account serialisation is a partitioned queue: ``partition_concurrency``
caps the workflows of one partition running at once across every process
(DBOS's docs: each partition key acts as a queue of its own, with the
queue's per-partition limits), and each call is enqueued with its account as
``queue_partition_key``. ``worker_concurrency`` caps the workflows one
process runs at once, as keyjobs' ``--threads`` does (its executor's threads
are left at DBOS's default, unbounded: DBOS runs some of its own writes there). Each call is a workflow whose body is the provider call (no
step: a step would record its output in a write of its own). A worker reads
its settings from the environment: the system database, its executor id, its
concurrency and the queues' polling interval.
"""

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from dbos import DBOS, DBOSConfig

DSN = os.environ.get("BENCH_DBOS_DSN", "postgresql://postgres@127.0.0.1:5432/kj_bench_dbos")
PROVIDER_URL = os.environ.get("PROVIDER_URL", "http://127.0.0.1:8765")
#: The application's name: the client enqueues on its behalf.
APP = "kjbench"
#: The queues, by the limit per partition (account) they hold; PLAIN has no partitions.
KEYED = {1: "calls", 3: "calls3"}
PLAIN = "plain"

_local = threading.local()


def provider() -> "object":
    """Return this thread's client of the provider, kept open from call to call (as keyjobs' tasks do)."""
    import httpx

    if getattr(_local, "client", None) is None:
        _local.client = httpx.Client(base_url=PROVIDER_URL, trust_env=False, timeout=httpx.Timeout(70.0))
    return _local.client


@DBOS.workflow(name="call")
def call(account_id: str, op: str, slots: int = 1) -> None:
    """Call the provider for ``account_id``; raise on a collision (429)."""
    query = f"?slots={slots}" if slots != 1 else ""
    provider().post(f"/call/{quote(account_id, safe='')}/{quote(op, safe='')}{query}").raise_for_status()  # type: ignore[attr-defined]


@DBOS.workflow(name="noop")
def noop() -> None:
    """Do nothing: what is left is the queue's own cost."""


def config(executor: str) -> DBOSConfig:
    return {"name": APP, "system_database_url": DSN, "executor_id": executor, "log_level": "WARNING"}


def register_queues(register: Callable[..., Any], threads: int, polling: float) -> None:
    """(Re)declare the bench's queues with this polling interval through ``register`` (``DBOS.register_queue``,
    or a client's). A queue thread starts at the polling it reads then, and comes down to a shorter one only
    gradually: the bench declares them before it starts a worker, and the worker again as it starts."""
    for limit, name in KEYED.items():
        register(name, partition_concurrency=limit, worker_concurrency=threads, polling_interval_sec=polling,
                 on_conflict="always_update")
    register(PLAIN, worker_concurrency=threads, polling_interval_sec=polling, on_conflict="always_update")


def main() -> int:
    threads = int(os.environ.get("BENCH_DBOS_THREADS", "8"))
    polling = float(os.environ.get("BENCH_DBOS_POLLING", "1.0"))
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    DBOS(config=config(os.environ.get("BENCH_DBOS_EXECUTOR", f"bench-{os.getpid()}")))
    DBOS.launch()
    register_queues(DBOS.register_queue, threads, polling)
    ready = os.environ.get("BENCH_DBOS_READY")
    if ready:
        open(ready, "w").close()  # the bench waits for this file
    while not stopping.wait(0.2):
        pass
    DBOS.destroy(workflow_completion_timeout_sec=5)
    time.sleep(0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
