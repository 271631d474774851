"""The demo's tasks again, declared through Django's tasks framework (``django.tasks``, Django 6.1).

The same calls to the provider with the same keyjobs options, given to
Django's ``@task(...)``: ``manage.py demo B --api django`` enqueues these
with ``enqueue()`` instead of ``delay()``, and the same workers run them.
"""

from django.tasks import task

from .tasks import call_provider


@task(running_concurrency="KEYS", key_arguments=["account_id"])
def call_keyed(account_id: str, op: str) -> dict[str, object]:
    """Call the provider, one call per account at a time; a blocked call waits its turn."""
    return call_provider(account_id, op)


@task(running_concurrency="KEYS", registration_concurrency="KEYS", key_arguments=["account_id"])
def refresh_once(account_id: str) -> dict[str, object]:
    """Refresh an account: requests made while one is already waiting merge into it."""
    return call_provider(account_id, "refresh")


#: The django.tasks twin of each scenario's task, by letter.
TWINS = {"B": call_keyed, "D": refresh_once}
