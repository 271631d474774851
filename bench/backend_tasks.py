"""The benchmarks' tasks declared through Django's tasks framework (Django 6.1): twins of ``bench.tasks``."""

from django.tasks import task

from demo_project.tasks import call_provider


@task(running_concurrency="KEYS", key_arguments=["account_id"])
def call(account_id: str, op: str) -> None:
    """Call the provider for ``account_id``, one call per account at a time; raise on a collision."""
    call_provider(account_id, op)


@task
def noop() -> None:
    """Do nothing: what is left is the queue's own cost."""
