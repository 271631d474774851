"""The benchmarks' keyjobs tasks. Workers import them by name (``bench.tasks.call``) when they first meet one."""

from demo_project.tasks import call_provider
from keyjobs import Mode, task


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",))
def call(account_id: str, op: str) -> None:
    """Call the provider for ``account_id``, one call per account at a time; raise on a collision."""
    # The demo's client: one httpx.Client per runner thread, kept open from call to call.
    call_provider(account_id, op)


@task
def noop() -> None:
    """Do nothing: what is left is the queue's own cost."""


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",))
def noop_keyed(account_id: str) -> None:
    """Do nothing, one at a time per account."""


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",))
def noop_keyed_numbered(account_id: str, number: int) -> None:
    """Do nothing, one at a time per account: noop_rated without its rate limit."""


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",), rate_limit="20/s")
def noop_rated(account_id: str, number: int) -> None:
    """Do nothing, one at a time per account and at most 20 starts per account in any second."""


@task(registration_concurrency=Mode.KEYS, key_arguments=("account_id",), debounce=0.5)
def refresh_debounced(account_id: str, request: int) -> int:
    """Return the request it ran for: requests of an account within 0.5 s of each other merge, the last one wins."""
    return request
