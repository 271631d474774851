"""The benchmarks' keyjobs tasks. Workers import them by name (``bench.tasks.call``) when they first meet one."""

from demo_project.tasks import call_provider
from keyjobs import Mode, task, workflow
from keyjobs import workflows as wf


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",))
def call(account_id: str, op: str) -> None:
    """Call the provider for ``account_id``, one call per account at a time; raise on a collision."""
    # The demo's client: one httpx.Client per runner thread, kept open from call to call.
    call_provider(account_id, op)


@task
def call_plain(account_id: str, op: str) -> None:
    """Call the provider without a key: ``call``'s work, each call its own account, so that none can collide."""
    call_provider(f"{account_id}.{op}", op)


@task
def noop_plain(account_id: str, op: str) -> None:
    """Do nothing with a call's arguments, without a key: ``noop_keyed_numbered``'s keyless twin."""


@task
def noop() -> None:
    """Do nothing: what is left is the queue's own cost."""


@task
def work(seconds: float) -> None:
    """Work ``seconds`` (a sleep, as a call to a service waits): a backlog's unrelated call (bench.boost)."""
    import time

    time.sleep(seconds)


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


def plan_slots(account_id: str) -> int:
    """The tier bench's plans: four calls at once for the two enterprise accounts, one for the others."""
    return 4 if account_id.startswith("enterprise") else 1


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",), running_limit=2)
def call_two(account_id: str, op: str) -> None:
    """Call the provider, two calls per account at a time."""
    call_provider(account_id, op, 2)


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",), running_limit=3)
def call_three(account_id: str, op: str) -> None:
    """Call the provider, three calls per account at a time."""
    call_provider(account_id, op, 3)


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",), running_limit=plan_slots)
def call_tiered(account_id: str, op: str) -> None:
    """Call the provider, as many calls per account at a time as its plan allows (``plan_slots``)."""
    call_provider(account_id, op, plan_slots(account_id))


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",), running_limit=8)
def call_eight(account_id: str, op: str) -> None:
    """Call the provider, eight calls per account at a time; a freed key's next call keeps its place."""
    call_provider(account_id, op, 8)


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",), running_limit=8, round_robin=True)
def call_eight_round_robin(account_id: str, op: str) -> None:
    """``call_eight``, taking turns across keys: a freed key's next call goes to the back of the queue."""
    call_provider(account_id, op, 8)


@task
def spin(iterations: int) -> int:
    """Burn the CPU in pure Python, holding the GIL: what threads of one process cannot share."""
    total = 0
    for number in range(iterations):
        total += number * number % 7
    return total


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",), timeout=1, kill_on_timeout=True)
def hang(account_id: str, seconds: float) -> None:
    """Sleep ``seconds`` under a hard limit of 1 s, holding ``account_id``'s key."""
    import time

    time.sleep(seconds)


@task
def fan_out(levels: int, width: int = 4) -> int:
    """Delay ``width`` children one level down and wait for each (pausing meanwhile); return how many ran."""
    if levels == 0:
        return 1
    children = fan_out.delay_many([((levels - 1, width), {})] * width)
    return 1 + sum(child.get_result() for child in children)


@task
def noop_payload(number: int, payload: object) -> None:
    """Do nothing with a large argument (bench.values): its run still reads it."""


@task
def chain_link(remaining: int) -> None:
    """Do nothing, then delay the chain's next call: ``remaining`` calls one after another, no workflow."""
    if remaining > 1:
        chain_link.delay(remaining - 1)


@workflow
def child_steps(count: int) -> int:
    """``count`` no-op calls one after another, each a child step the workflow suspends on until it ends."""
    return len([noop.delay().result for _ in range(count)])


@workflow
def inline_steps_then_an_event(count: int) -> int:
    """``count`` inline steps, then a wait for the event "go": once it is sent, a replay at step ``count``."""
    total = sum(wf.step(int, number) for number in range(count))
    wf.wait_for_event("go")
    return total
