"""The demo's tasks: calls to the provider on behalf of client accounts, under several concurrency settings.

The provider answers 429 to a second call for an account while one is in
flight; every task raises on it, so that a collision shows up as a FAILED
invocation as well as in the provider's counters.
"""

import functools
import ssl
import threading
from urllib.parse import quote

import httpx
from django.conf import settings

from keyjobs import Mode, task

from .provider import MAX_HOLD

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
