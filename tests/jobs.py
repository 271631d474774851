"""Tasks the tests run, importable by worker processes as tests.jobs.*."""

import logging
import os
import signal
import time
from datetime import timedelta

from keyjobs import Cancelled, Mode, Status, current, on_event, on_status, registry, task
from keyjobs.admission import Policy, Rate
from keyjobs.spec import TaskSpec


@task
def add(a: int, b: int = 0) -> int:
    return a + b


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",))
def keyed(account_id: str, op: str, hold: float = 0.0) -> str:
    time.sleep(hold)
    return f"{account_id}:{op}"


@task
def boom(message: str) -> None:
    raise ValueError(message)


@task(registration_concurrency=Mode.TASK)
def once_per_task(account_id: str, op: str = "sync") -> str:
    return account_id


@task(registration_concurrency=Mode.ARGUMENTS)
def once_per_arguments(account_id: str, op: str = "sync") -> str:
    return account_id


@task(registration_concurrency=Mode.KEYS, key_arguments=("account_id",))
def once_per_key(account_id: str, op: str = "sync") -> str:
    return account_id


@task(running_concurrency=Mode.TASK)
def serial_per_task(account_id: str, op: str = "sync") -> str:
    return account_id


@task(running_concurrency=Mode.ARGUMENTS)
def serial_per_arguments(account_id: str, op: str = "sync") -> str:
    return account_id


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",), reroute_on_concurrency_control=False)
def keyed_drop(account_id: str, op: str = "sync") -> str:
    return account_id


@task(running_concurrency=Mode.KEYS, registration_concurrency=Mode.KEYS, key_arguments=("account_id",))
def refresh_once(account_id: str) -> str:
    return account_id


@task
async def add_async(a: int, b: int) -> int:
    return a + b


@task
def not_json() -> object:
    return {1, 2}


def write_run(account_id: str, number: int, hold: float, log: str) -> None:
    """Append this run's start and end to ``log``, for tests that check runs of a key never overlap."""
    start = time.time()
    time.sleep(hold)
    end = time.time()
    with open(log, "a") as out:
        out.write(f"{account_id} {number} {start:.6f} {end:.6f} {os.getpid()}\n")


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",))
def record_run(account_id: str, number: int, hold: float, log: str) -> None:
    """Hold ``hold`` seconds and log the run (``write_run``)."""
    write_run(account_id, number, hold, log)


@task
def sleep_then_return(seconds: float, marker: str) -> str:
    """Sleep, then create ``marker`` (a path) and return it: lets a test see the run has begun."""
    open(marker + ".started", "w").close()
    time.sleep(seconds)
    return marker


@task(max_retries=2, retry_for=(ConnectionError,), retry_backoff=0.01)
def flaky(counter: str, failures: int) -> int:
    """Raise ConnectionError the first ``failures`` times (counted in the file ``counter``)."""
    with open(counter, "a+") as file:
        file.seek(0)
        attempt = len(file.read()) + 1
        file.write("x")
    if attempt <= failures:
        raise ConnectionError(f"attempt {attempt} failed")
    return attempt


@task(max_retries=3, retry_for=(ValueError,), retry_backoff=0.01)
def wrong_kind_of_error() -> None:
    raise KeyError("not retried")


@task(registration_concurrency=Mode.KEYS, key_arguments=("account_id",), max_retries=1, retry_backoff=60)
def flaky_once_per_key(account_id: str) -> None:
    raise ConnectionError("provider down")


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",), max_retries=1, retry_backoff=60)
def flaky_serial_per_key(account_id: str, op: str = "sync") -> None:
    raise ConnectionError("provider down")


@task(timeout=0.05)
def too_slow(seconds: float) -> None:
    time.sleep(seconds)


@task(timeout=0.05)
async def too_slow_async(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


# The chaos runs kill workers at random, a kill a second: a run cut short is never its call's fault, and under load
# one call can be cut short more often than a poison pill's limit (max_recoveries, 3 by default) allows.
@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",), max_recoveries=1_000)
def record_span(account_id: str, number: int, hold: float, log: str) -> None:
    """Log this run's start and end as separate lines, so that a run killed midway still shows its start."""
    _log_span(log, account_id, number, hold)


def _log_start(log: str, account_id: str, number: int) -> None:
    if log:
        with open(log, "a", buffering=1) as out:
            out.write(f"{account_id} {number} {time.time():.6f} {os.getpid()}\n")


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",), rate_limit=(3, timedelta(seconds=1)))
def rated(account_id: str, number: int, log: str = "") -> None:
    """At most 3 starts per account in any second; logs its start to ``log``."""
    _log_start(log, account_id, number)


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",), rate_limit="2/m",
      reroute_on_concurrency_control=False)
def rated_drop(account_id: str, number: int) -> int:
    return number


def _rated_wide(account_id: str, number: int, log: str = "") -> None:
    _log_start(log, account_id, number)
    time.sleep(0.05)


#: Four runs of an account at once, but at most 3 starts of it in any second: only the rate window holds
#: two racing workers back. (A TaskSpec built by hand: the policy's limit is what running_limit declares.)
rated_wide = TaskSpec(
    name="tests.jobs.rated_wide", func=_rated_wide,
    policy=Policy(running=Mode.KEYS, key_arguments=("account_id",), limit=4, rate=Rate(3, 1.0)),
)
registry.register(rated_wide)

#: rated_wide's slots, with a window of a minute: a test may take its time between the starts that fill it.
rated_per_minute = TaskSpec(
    name="tests.jobs.rated_per_minute", func=_rated_wide,
    policy=Policy(running=Mode.KEYS, key_arguments=("account_id",), limit=4, rate=Rate(3, 60.0)),
)
registry.register(rated_per_minute)


@task(registration_concurrency=Mode.KEYS, key_arguments=("account_id",), debounce=0.3, debounce_max=1.0)
def debounced(account_id: str, reason: str) -> str:
    return reason


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",))
def stoppable(account_id: str, marker: str, seconds: float = 30.0, obey: bool = True) -> str:
    """Run until ``seconds`` pass or, with ``obey``, until its cancel is requested."""
    open(marker + ".started", "w").close()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if current().cancel_requested:
            if obey:
                raise Cancelled("stopped as asked")
            return "asked, but finished anyway"
        time.sleep(0.02)
    return "finished"


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",))
async def stoppable_async(account_id: str, marker: str, seconds: float = 30.0) -> str:
    import asyncio

    open(marker + ".started", "w").close()
    await asyncio.sleep(seconds)
    return "finished"


# Triggers (tests/test_triggers.py): tasks of their own, so that no other test's counts see them.
@task
def sync_account(account_id: str, op: str = "sync", fail: bool = False) -> str:
    if fail:
        raise ValueError(f"could not sync {account_id}")
    return f"synced {account_id}"


@task(trigger=on_status(sync_account, Status.SUCCESS))
def reindex_account(account_id: str, op: str, result: str) -> list[str]:
    return [account_id, op, result]


@task(trigger=on_status(sync_account, Status.FAILED))
def report_sync_failure(account_id: str, error: str) -> str:
    return error


# A source whose subscribers fail to enqueue (tests/test_triggers.py): the source's outcome stands.
@task
def close_account(account_id: str) -> str:
    return f"closed {account_id}"


def limit_of_a_down_service(account_id: str) -> int:
    raise RuntimeError("the tier service is down")


def limit_from_a_missing_table(account_id: str) -> int:
    from django.db import connection

    with connection.cursor() as cursor:  # refused by the database: on PostgreSQL it aborts the transaction
        cursor.execute("SELECT running_limit FROM keyjobs_no_such_table")
    return 1


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",), running_limit=limit_of_a_down_service,
      trigger=on_status(close_account, Status.SUCCESS))
def archive_closed(account_id: str) -> str:
    return account_id


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",), running_limit=limit_from_a_missing_table,
      trigger=on_status(close_account, Status.SUCCESS))
def bill_closed(account_id: str) -> str:
    return account_id


@task(trigger=on_status(close_account, Status.SUCCESS))
def notify_closed(account_id: str, result: str) -> str:
    return result


@task(trigger=on_event("account.updated"))
def push_metadata(account_id: str) -> str:
    return account_id


@task(trigger=on_event("account.updated"))
def audit_update(**fields: object) -> dict[str, object]:
    return dict(fields)


# Schedules (tests/test_schedules.py) run tasks through Schedule rows, not @task(schedule=...):
# a declared schedule would tick in every test that runs a worker.
@task
def tick_log(log: str) -> None:
    with open(log, "a") as out:
        out.write(f"{os.getpid()}\n")


@task(registration_concurrency=Mode.TASK)
def slow_report(seconds: float) -> None:
    time.sleep(seconds)


def tier_limit(account_id: str) -> int:
    """Two slots for a gold account, one for the others: a running_limit of the key arguments."""
    return 2 if account_id.startswith("gold") else 1


def bad_tier_limit(account_id: str) -> object:
    return {"zero": 0, "text": "2", "yes": True}[account_id]


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",), running_limit=2)
def keyed_two_slots(account_id: str, op: str, hold: float = 0.0) -> str:
    time.sleep(hold)
    return f"{account_id}:{op}"


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",), running_limit=2, round_robin=True)
def keyed_two_slots_round_robin(account_id: str, op: str) -> str:
    return f"{account_id}:{op}"


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",), running_limit=tier_limit)
def keyed_tiered(account_id: str, op: str) -> str:
    return f"{account_id}:{op}"


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",), running_limit=tier_limit,
      registration_concurrency=Mode.TASK, debounce=0.05)
def debounced_across_keys(account_id: str, op: str) -> str:
    """One call of the task waits at a time, and runs serial per account: a merge can change its running key."""
    return f"{account_id}:{op}"


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",), running_limit=bad_tier_limit)
def keyed_bad_tier(account_id: str) -> str:
    return account_id


@task(running_concurrency=Mode.TASK, running_limit=3)
def three_at_once(number: int) -> int:
    return number


def _log_span(log: str, account_id: str, number: int, hold: float) -> None:
    with open(log, "a", buffering=1) as out:
        out.write(f"S {account_id} {number} {time.time():.6f} {os.getpid()}\n")
    time.sleep(hold)
    with open(log, "a", buffering=1) as out:
        out.write(f"E {account_id} {number} {time.time():.6f} {os.getpid()}\n")


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",), running_limit=tier_limit)
def record_span_tiered(account_id: str, number: int, hold: float, log: str) -> None:
    """record_span with two slots for a gold account and one for the others."""
    _log_span(log, account_id, number, hold)


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",), running_limit=3)
def record_span_three(account_id: str, number: int, hold: float, log: str) -> None:
    """record_span with three slots per account."""
    _log_span(log, account_id, number, hold)


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",), timeout=1, kill_on_timeout=True)
def hard_limited(account_id: str, seconds: float, marker: str) -> str:
    """Sleep ``seconds`` under a hard limit of 1 s: a run past it is stopped by killing its process."""
    open(marker + ".started", "w").close()
    time.sleep(seconds)
    return account_id


@task
def fan_out(levels: int, width: int = 4) -> int:
    """Delay ``width`` children one level down and wait for each: return how many runs the tree made."""
    if levels == 0:
        return 1
    children = [fan_out.delay(levels - 1, width) for _ in range(width)]
    return 1 + sum(child.get_result() for child in children)


@task
def wait_for_child(seconds: float, marker: str, timeout: float | None = None) -> str:
    """Delay sleep_then_return(seconds, marker) and return its result, waiting at most ``timeout`` seconds."""
    return str(sleep_then_return.delay(seconds, marker).get_result(timeout=timeout))


@task
def peek_at_child(seconds: float, marker: str) -> str:
    """Read the result of a child not final yet: ``.result`` does not wait, so the run is never PAUSED."""
    from keyjobs import InvocationNotFinished

    child = sleep_then_return.delay(seconds, marker)
    try:
        return str(child.result)
    except InvocationNotFinished:
        return "not finished"


@task
async def await_child(seconds: float, marker: str) -> str:
    """Delay sleep_then_return(seconds, marker) from async code and await its result: the run is PAUSED meanwhile."""
    child = await sleep_then_return.adelay(seconds, marker)
    return str(await child.aget_result(timeout=60))


@task
def wait_on_itself() -> None:
    from keyjobs.models import Invocation

    Invocation.objects.get(task_name=wait_on_itself.name, status="RUNNING").wait()


@task
def wait_cycle_parent() -> None:
    """Delay wait_cycle_child, which waits on this invocation while this one waits on it."""
    wait_cycle_child.delay().wait()
    raise AssertionError("a wait cycle ended")


@task
def wait_cycle_child() -> None:
    from keyjobs.models import Invocation

    me = Invocation.objects.get(task_name=wait_cycle_child.name, status="RUNNING")
    assert me.parent is not None
    me.parent.wait()


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",))
def wait_on_own_key(account_id: str, nested: bool = False) -> str:
    """Wait on an invocation of its own key: it could only start once this one, holding the key, ended."""
    if nested:
        return "nested"
    return str(wait_on_own_key.delay(account_id, nested=True).get_result())


class Halt(BaseException):
    """A BaseException of the task's own, as some libraries define one."""


def _raise_base(kind: str) -> None:
    import sys

    if kind == "SystemExit":
        sys.exit(3)
    if kind == "KeyboardInterrupt":
        raise KeyboardInterrupt("pressed inside the task")
    if kind == "GeneratorExit":
        raise GeneratorExit("closed")
    raise Halt("halted")


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",))
def raise_base(account_id: str, kind: str) -> None:
    """Raise a BaseException that is not an Exception: ``kind`` is its class name, or Halt."""
    _raise_base(kind)


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",))
async def raise_base_async(account_id: str, kind: str) -> None:
    _raise_base(kind)


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",))
def chatty(account_id: str, count: int, secret: str = "") -> int:
    """Log ``count`` lines at INFO, and a warning with ``secret`` in it if given (tests/test_runlogs.py)."""
    log = logging.getLogger("tests.jobs.chatty")
    for number in range(count):
        log.info("line %d of %d for %s", number + 1, count, account_id)
    if secret:
        log.warning("calling the provider with token=%s", secret)
    return count


@task(max_retries=2, retry_backoff=0.01)
def echo(*args: object, **kwargs: object) -> object:
    """Return the call as its run saw it (tests/test_values.py); whatever it raises is retried twice."""
    return {"args": list(args), "kwargs": kwargs}


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",))
def keyed_echo(account_id: object, payload: object = None, *rest: object, **extra: object) -> object:
    """Return the call as its run saw it, by parameter (tests/test_values.py)."""
    return {"account_id": account_id, "payload": payload, "rest": list(rest), "extra": extra}


@task
def text_of(size: int) -> str:
    """Return ``size`` characters (tests/test_values.py)."""
    return "x" * size


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",))
def poison_pill(account_id: str, log: str) -> None:
    """Kill the process running it, as a segfault or an out-of-memory kill would; each attempt adds a line to ``log``."""
    with open(log, "a") as attempts:
        attempts.write("attempt\n")
    os.kill(os.getpid(), signal.SIGKILL)


@task(timeout=1, kill_on_timeout=True)
def patient_parent(wait: float, marker: str) -> str:
    """Work 0.3 s, wait ``wait`` seconds on a child, work 0.3 s more: 0.6 s of work under limits of 1 s."""
    time.sleep(0.3)
    sleep_then_return.delay(wait, marker).wait(timeout=60)
    time.sleep(0.3)
    return marker


@task(timeout=1)
async def patient_parent_async(wait: float, marker: str) -> str:
    """``patient_parent`` as a coroutine, which its limit cancels: 0.6 s of work, a long wait, under a limit of 1 s."""
    import asyncio

    await asyncio.sleep(0.3)
    child = await sleep_then_return.adelay(wait, marker)
    await child.aget_result(timeout=60)
    await asyncio.sleep(0.3)
    return marker


@task
def until_told(marker: str) -> str:
    """Create ``marker``.started, then return once ``marker``.go exists (at most a minute): a run a test ends."""
    open(marker + ".started", "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(marker + ".go") and time.monotonic() < deadline:
        time.sleep(0.02)
    return marker


@task
def wait_on(pk: int, timeout: float) -> str:
    """Wait on invocation ``pk`` for ``timeout`` seconds at most; return its final status, or that it timed out."""
    from keyjobs.models import Invocation

    try:
        return Invocation.objects.get(pk=pk).wait(timeout=timeout)
    except TimeoutError:
        return "timed out"
