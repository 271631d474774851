"""Workflows the tests run, importable by worker processes as tests.flows.*.

Each side effect appends a line to a log file, so that a test counts how often it really ran.
"""

import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from keyjobs import Mode, task, workflow
from keyjobs import workflows as wf


def note(log: str, line: str) -> None:
    """Append ``line`` to the log file ``log`` (one write: lines of concurrent writers do not mix)."""
    with open(log, "a") as file:
        file.write(f"{line}\n")


def lines(log: str | Path) -> list[str]:
    """Return the lines of a log written by ``note``."""
    path = Path(log)
    return path.read_text().splitlines() if path.exists() else []


# The kill tests kill runners at random: near their end only the last workflow's step is left to run, and each
# kill lands on it; a run cut short is never its call's fault, so max_recoveries (3 by default) must not end it.
ENDURES_KILLS = 1_000


@task(max_recoveries=ENDURES_KILLS)
def effect(log: str, name: str, hold: float = 0.0) -> str:
    """A child step's side effect: noted when it begins and when it ends."""
    note(log, f"begin {name} {os.getpid()}")
    time.sleep(hold)
    note(log, f"end {name}")
    return name.upper()


@task
def failing_child(message: str) -> None:
    raise ValueError(message)


def make_token(log: str, account_id: str) -> str:
    note(log, f"token {account_id}")
    return f"tok-{account_id}"


def fails_once(log: str, counter: str) -> str:
    """Raise the first time it runs, succeed after (a counter file says which)."""
    note(log, "flaky")
    count = int(Path(counter).read_text()) if Path(counter).exists() else 0
    Path(counter).write_text(str(count + 1))
    if count == 0:
        raise ConnectionError("the first call fails")
    return "second time lucky"


def raises(log: str, error: BaseException) -> None:
    note(log, f"raises {type(error).__name__}")
    raise error


class Unbuildable(Exception):
    """An exception whose arguments cannot be stored: a replay raises StepFailed in its place."""


@workflow
def steps_and_values(log: str) -> dict[str, Any]:
    """Two children, the three recorded values and an inline step; notes the values each time it runs."""
    a = effect.delay(log, "a").result
    ref, at, jitter = wf.uuid4(), wf.now(), wf.random()
    note(log, f"values {ref} {at.isoformat()} {jitter}")
    token = wf.step(make_token, log, "acme")
    b = effect.delay(log, "b").result
    note(log, f"values {ref} {at.isoformat()} {jitter}")
    return {"a": a, "b": b, "ref": str(ref), "at": at.isoformat(), "jitter": jitter, "token": token}


@workflow(max_recoveries=ENDURES_KILLS)
def chain(log: str, name: str, steps: int = 5, hold: float = 0.0) -> list[str]:
    """``steps`` children one after another, with the values of the run noted each time it runs."""
    ref, jitter = wf.uuid4(), wf.random()
    at = wf.now()
    note(log, f"values {name} {ref} {at.isoformat()} {jitter}")
    return [effect.delay(log, f"{name}-{number}", hold).result for number in range(steps)]


@workflow
def nap(log: str, seconds: float) -> str:
    wf.sleep(timedelta(seconds=seconds))
    return wf.step(make_token, log, "after-nap")


@workflow
def approval(log: str, timeout: float | None = None) -> Any:
    wf.step(make_token, log, "before")
    answer = wf.wait_for_event("approved", timeout=timeout)
    note(log, f"answer {answer}")
    return {"answer": answer}


@workflow
def approved_twice(timeout: float) -> list[Any]:
    """Waits for "approved" twice, the second time until ``timeout``: a message sent twice would answer both."""
    return [wf.wait_for_event("approved"), wf.wait_for_event("approved", timeout=timeout)]


@workflow
def versioned(flag: str, log: str) -> str:
    """Takes step ``a`` or ``b`` as the file ``flag`` says, then waits for an event: its code "changes" meanwhile."""
    if Path(flag).read_text() == "a":
        wf.step(make_token, log, "a")
    else:
        wf.step(note, log, "b")
    wf.wait_for_event("go")
    return "done"


@workflow
def patched_flow(flag: str, log: str) -> str:
    """As ``versioned``, with the change behind ``wf.patched()``."""
    wf.step(make_token, log, "first")
    if Path(flag).read_text() == "new" and wf.patched("extra-step"):
        wf.step(note, log, "extra")
    wf.wait_for_event("go")
    wf.step(make_token, log, "last")
    return "done"


@workflow(max_retries=1, retry_backoff=0.01, retry_backoff_max=0.02)
def retried(log: str, counter: str) -> str:
    first = wf.step(make_token, log, "first")
    return f"{first} {wf.step(fails_once, log, counter)}"


@workflow
def catches(log: str) -> str:
    """A step's exception caught by the workflow; then a sleep, so that a replay meets the step again."""
    try:
        wf.step(raises, log, KeyError("missing"))
        caught = "nothing"
    except KeyError as exc:
        caught = f"KeyError {exc.args[0]}"
    try:
        wf.step(raises, log, Unbuildable(object()))
    except Exception as exc:
        caught += f"; {type(exc).__name__}"
    note(log, f"caught {caught}")
    wf.sleep(0.5)
    return caught


@workflow
def exits_in_a_step(log: str) -> None:
    wf.step(raises, log, SystemExit(3))


@workflow
def fails_by_child(log: str) -> str:
    ok = effect.delay(log, "ok").result
    failed = failing_child.delay("child failed").result
    return f"unreachable: {ok} {failed}"


@workflow(running_concurrency=Mode.KEYS, key_arguments=("account_id",))
def same_key(account_id: str, child: bool = False) -> Any:
    """Waits on a child of its own task and key: the child waits behind it, for ever."""
    if child:
        return "child"
    return same_key.delay(account_id, True).result


@workflow(running_concurrency=Mode.KEYS, key_arguments=("account_id",))
def keyed_nap(account_id: str, log: str) -> str:
    wf.step(note, log, f"start {account_id}")
    wf.sleep(0.3)
    wf.step(note, log, f"end {account_id}")
    return account_id


@workflow
def sleeps_then_steps(log: str, seconds: float) -> str:
    wf.sleep(seconds)
    return str(effect.delay(log, "after").result)


@workflow
def fan_out(log: str, width: int) -> list[str]:
    children = effect.delay_many([((log, f"child-{number}"), {}) for number in range(width)])
    return [child.result for child in children]


@workflow
def loops(count: int) -> int:
    return sum(wf.step(int, number) for number in range(count))


@workflow
def steps_in_a_step(log: str) -> None:
    wf.step(lambda: wf.now())


@task
def plain_task_using_wf() -> None:
    wf.now()


@workflow
def waits_elsewhere(log: str) -> str:
    """Waits on a child of the queue "elsewhere", which the test's runner does not serve."""
    return str(effect.using(queue="elsewhere").delay(log, "elsewhere").result)


@workflow
def two_steps_and_a_sleep(log: str) -> str:
    """Every new step of a workflow's life: two recorded, a suspension, a resume."""
    wf.step(note, log, "one")
    # Long enough that a loaded machine does not reach the check after it first (no suspension to fault).
    wf.sleep(1.0)
    wf.step(note, log, "two")
    return "done"


@workflow
def sleeps_and_stamps(seconds: float) -> float:
    """Sleep, then one step: the time it ran."""
    wf.sleep(seconds)
    return wf.step(time.time)


@workflow
def restartable(log: str, counter: str) -> str:
    """Fails at its third step the first time (no retries): restarted by hand from its second."""
    first = wf.step(make_token, log, "first")
    second = wf.step(make_token, log, "second")
    return f"{first} {second} {wf.step(fails_once, log, counter)}"


@workflow
def many_steps_then_an_event(count: int) -> int:
    """``count`` inline steps, then a wait for the event "go": a replay at step ``count``."""
    total = sum(wf.step(int, number) for number in range(count))
    wf.wait_for_event("go")
    return total


@task
def large_report(size: int) -> str:
    """A child whose result is stored out of line (over KEYJOBS_INLINE_VALUE_BYTES)."""
    return "r" * size


@workflow
def reads_a_large_child_result(size: int) -> int:
    """Wait, in this run, until a child with a large result is final (another thread runs it), then read it."""
    from keyjobs.models import Invocation

    child = large_report.delay(size)
    while not Invocation.objects.filter(pk=child.pk, status__in=("SUCCESS", "FAILED")).exists():
        time.sleep(0.02)
    return len(child.get_result())
