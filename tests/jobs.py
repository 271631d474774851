"""Tasks the tests run, importable by worker processes as tests.jobs.*."""

import os
import time

from django.db import connection

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
