"""Procrastinate's side of the bench: its app and the same tasks as ``bench.tasks``.

Per-account serialisation is Procrastinate's ``lock``: no two jobs with the
same lock run at once, and a job waits while an older one of its lock waits.
The provider call is async (one httpx.AsyncClient per worker process), the way
Procrastinate runs concurrent I/O; its sync tasks would share the event loop's
default thread pool, which holds at most cores + 4 threads.
"""

import os
from urllib.parse import quote

import httpx
from procrastinate import App, PsycopgConnector

DSN = os.environ.get("BENCH_PROCRASTINATE_DSN", "postgresql://postgres@127.0.0.1:5432/kj_bench_procrastinate")
PROVIDER_URL = os.environ.get("PROVIDER_URL", "http://127.0.0.1:8765")

# A connection per concurrent job and a few for the worker itself, as Procrastinate's docs advise sizing the pool.
app = App(connector=PsycopgConnector(conninfo=DSN, min_size=2, max_size=int(os.environ.get("BENCH_POOL_SIZE", "24"))))

_client: httpx.AsyncClient | None = None


def client() -> httpx.AsyncClient:
    global _client
    if _client is None:
        _client = httpx.AsyncClient(base_url=PROVIDER_URL, trust_env=False, timeout=httpx.Timeout(70.0),
                                    limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
    return _client


@app.task(name="call")
async def call(account_id: str, op: str) -> None:
    """Call the provider for ``account_id``; raise on a collision (429)."""
    response = await client().post(f"/call/{quote(account_id, safe='')}/{quote(op, safe='')}")
    response.raise_for_status()


@app.task(name="noop")
def noop() -> None:
    """Do nothing, as a sync task (run in a thread)."""


@app.task(name="noop_async")
async def noop_async() -> None:
    """Do nothing, as an async task (run on the worker's event loop)."""
