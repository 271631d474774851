"""Tasks declared through django.tasks (Django 6.1) for keyjobs' backend, importable by worker processes."""

import time

from django.tasks import TaskContext, task

from keyjobs import Mode
from tests.jobs import write_run


@task
def add(a: int, b: int = 0) -> int:
    return a + b


@task(queue_name="reports", priority=10)
def report(name: str) -> str:
    return f"report {name}"


@task(running_concurrency="KEYS", key_arguments=["account_id"])
def sync_account(account_id: str, op: str, hold: float = 0.0) -> dict[str, str]:
    time.sleep(hold)
    return {"account": account_id, "op": op}


@task(running_concurrency=Mode.KEYS, key_arguments=["account_id"])
def record_run(account_id: str, number: int, hold: float, log: str) -> None:
    """The django.tasks twin of ``tests.jobs.record_run``: the same log line, for the same overlap checks."""
    write_run(account_id, number, hold, log)


@task(registration_concurrency=Mode.KEYS, key_arguments=["account_id"])
def refresh_once(account_id: str) -> str:
    return account_id


@task(running_concurrency=Mode.KEYS, key_arguments=["account_id"], reroute_on_concurrency_control=False)
def keyed_drop(account_id: str) -> str:
    return account_id


@task
def fail(message: str) -> None:
    raise ValueError(message)


@task(max_retries=2, retry_backoff=0.0, retry_backoff_max=0.0)
def fail_twice_then_succeed(marker: str) -> int:
    """Fail on the first two attempts (counted in the file ``marker``), then return the attempt."""
    with open(marker, "a") as out:
        out.write("x")
    with open(marker) as counted:
        attempt = len(counted.read())
    if attempt < 3:
        raise KeyError(f"attempt {attempt}")
    return attempt


@task(takes_context=True, max_retries=1, retry_backoff=0.0, retry_backoff_max=0.0)
def attempt_and_id(context: TaskContext, fail_first: bool) -> dict[str, object]:
    if fail_first and context.attempt == 1:
        raise RuntimeError("first attempt fails")
    return {"attempt": context.attempt, "id": context.task_result.id, "worker_ids": context.task_result.worker_ids}


@task(takes_context=True, running_concurrency="KEYS", key_arguments=["account_id"])
def keyed_with_context(context: TaskContext, account_id: str) -> str:
    return f"{account_id}:{context.attempt}"


@task
async def add_async(a: int, b: int) -> int:
    return a + b


@task(takes_context=True)
async def async_with_context(context: TaskContext, value: int) -> list[int]:
    return [value, context.attempt]


@task
def not_json() -> object:
    return {1, 2}


@task(takes_context=True)
def context_id(context: TaskContext) -> str:
    return context.task_result.id


@task(takes_context=True)
def taken_from_its_runner(context: TaskContext, thief_id: int) -> str:
    """Give its own invocation to runner ``thief_id`` while it runs, as a recovery would: its outcome is discarded."""
    from keyjobs.models import Invocation

    Invocation.objects.filter(pk=context.task_result.id).update(runner_id=thief_id)
    return context.task_result.id
