"""The demo's tasks: calls to the provider on behalf of client accounts, under several concurrency settings.

The provider answers 429 to a second call for an account while one is in
flight; every task raises on it, so that a collision shows up as a FAILED
invocation as well as in the provider's counters.
"""

import functools
import logging
import ssl
import threading
from datetime import timedelta
from urllib.parse import quote

import httpx
from django.conf import settings

from keyjobs import Mode, task, workflow
from keyjobs import workflows as wf

from .provider import MAX_HOLD

logger = logging.getLogger(__name__)
_clients = threading.local()
_tls_lock = threading.Lock()


@functools.cache
def _build_tls() -> ssl.SSLContext:
    return httpx.create_ssl_context()


def tls() -> ssl.SSLContext:
    """Return the process's TLS settings, shared by every thread's client."""
    # Each client would otherwise load the CA bundle itself, ~50 ms of CPU:
    # the pool's threads doing that at once would delay the first calls.
    with _tls_lock:
        return _build_tls()


def provider() -> httpx.Client:
    """Return this thread's client of the provider at ``settings.PROVIDER_URL``."""
    url = settings.PROVIDER_URL
    # One client per runner thread, so that each thread keeps its connection
    # open from call to call instead of connecting for every call.
    if getattr(_clients, "url", None) != url:
        close_provider()
        _clients.client = httpx.Client(
            base_url=url,
            # The provider holds a call for up to MAX_HOLD seconds by design.
            timeout=httpx.Timeout(10.0, read=MAX_HOLD + 10.0),
            # The provider is a local stand-in: a proxy from the environment would only intercept its calls.
            trust_env=False,
            verify=tls(),
        )
        _clients.url = url
    client: httpx.Client = _clients.client
    return client


def close_provider() -> None:
    """Close this thread's client of the provider, if it has one."""
    client = getattr(_clients, "client", None)
    if client is not None:
        client.close()
        del _clients.client, _clients.url


def call_provider(account_id: str, op: str, slots: int = 1) -> dict[str, object]:
    """Make one call for ``account_id``; return the provider's record of it, or raise on a collision.

    ``slots``: the calls the account may have in flight at once (the provider counts the one after a collision).
    """
    query = f"?slots={slots}" if slots != 1 else ""
    response = provider().post(f"/call/{quote(account_id, safe='')}/{quote(op, safe='')}{query}")
    response.raise_for_status()
    answer: dict[str, object] = response.json()
    return answer


@task
def call_unsafe(account_id: str, op: str) -> dict[str, object]:
    """Call the provider with no concurrency control: calls for one account may overlap."""
    return call_provider(account_id, op)


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",))
def call_keyed(account_id: str, op: str) -> dict[str, object]:
    """Call the provider, one call per account at a time; a blocked call waits its turn."""
    return call_provider(account_id, op)


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",), reroute_on_concurrency_control=False)
def call_keyed_drop(account_id: str, op: str) -> dict[str, object]:
    """Call the provider, one call per account at a time; a blocked call is dropped."""
    return call_provider(account_id, op)


@task(running_concurrency=Mode.KEYS, registration_concurrency=Mode.KEYS, key_arguments=("account_id",))
def refresh_once(account_id: str) -> dict[str, object]:
    """Refresh an account: requests made while one is already waiting merge into it."""
    return call_provider(account_id, "refresh")


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",), rate_limit="2/s")
def call_rated(account_id: str, op: str) -> dict[str, object]:
    """Call the provider, one call per account at a time and at most 2 starts per account in any second."""
    return call_provider(account_id, op)


def tier_slots(account_id: str) -> int:
    """The calls in flight an account's plan allows: acme is on the enterprise plan, globex on business."""
    return {"acme": 3, "globex": 2}.get(account_id, 1)


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",), running_limit=tier_slots)
def call_tiered(account_id: str, op: str) -> dict[str, object]:
    """Call the provider, up to the account's plan's calls at a time (``tier_slots``); more wait their turn."""
    return call_provider(account_id, op, tier_slots(account_id))


@task(max_retries=3, retry_for=(httpx.HTTPStatusError,), retry_backoff=0.5)
def call_retrying(account_id: str, op: str) -> dict[str, object]:
    """Call the provider with no concurrency control, and try again (up to 3 more times) after a collision."""
    logger.info("calling %s for %s", op, account_id)
    try:
        return call_provider(account_id, op)
    except httpx.HTTPStatusError as exc:
        logger.warning("%s for %s collided (%s): trying again", op, account_id, exc.response.status_code)
        raise


@task
def sync_report(account_id: str) -> dict[str, object]:
    """Sync an account's four calls (one at a time, by its key) and wait for them: a run that waits on children."""
    from .scenarios import OPS

    children = [call_keyed.delay(account_id=account_id, op=op) for op in OPS]
    logger.info("waiting on %d calls for %s: %s", len(children), account_id, ", ".join(f"#{c.pk}" for c in children))
    results = [child.get_result() for child in children]  # each waits: this run is PAUSED meanwhile
    done = {op: result["op"] if isinstance(result, dict) else result for op, result in zip(OPS, results, strict=True)}
    logger.info("all %d calls for %s are done", len(done), account_id)
    return {"account_id": account_id, "synced": list(done)}


@workflow(running_concurrency=Mode.KEYS, key_arguments=("account_id",))
def onboard(account_id: str) -> dict[str, object]:
    """Onboard an account durably: fetch its profile, take a reference, let it settle, then sync.

    Each step runs once: a runner killed in the middle, the workflow resumes
    on another at the step it stopped at; the pause holds no thread.
    """
    profile = call_keyed.delay(account_id=account_id, op="fetch_profile").result
    ref = wf.uuid4()
    wf.sleep(timedelta(seconds=2))
    synced = call_keyed.delay(account_id=account_id, op="sync").result
    return {"account_id": account_id, "ref": str(ref), "steps": [profile["op"], synced["op"]]}
