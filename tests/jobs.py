"""Tasks the tests run, importable by worker processes as tests.jobs.*."""

import os
import time

from keyjobs import Mode, task


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


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",))
def record_run(account_id: str, number: int, hold: float, log: str) -> None:
    """Append this run's start and end to ``log``, for tests that check runs of a key never overlap."""
    start = time.time()
    time.sleep(hold)
    end = time.time()
    with open(log, "a") as out:
        out.write(f"{account_id} {number} {start:.6f} {end:.6f} {os.getpid()}\n")


@task
def sleep_then_return(seconds: float, marker: str) -> str:
    """Sleep, then create ``marker`` (a path) and return it: lets a test see the run has begun."""
    open(marker + ".started", "w").close()
    time.sleep(seconds)
    return marker
