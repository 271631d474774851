"""The example of docs/howto/testing.md, which shows this file from its marker on: keep it a good example."""

# -- the example --
import pytest
from django.core.management import call_command

from keyjobs import Mode, Status, task


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",))
def sync_account(account_id: str, op: str) -> str:
    return f"{op} for {account_id}"


def test_a_task_is_a_plain_function() -> None:
    assert sync_account("acme", "list_invoices") == "list_invoices for acme"


@pytest.mark.django_db
def test_delay_registers_an_invocation_in_the_callers_transaction() -> None:
    invocation = sync_account.delay("acme", op="list_invoices")

    assert invocation.status == Status.REGISTERED
    assert (invocation.task_name, invocation.args, invocation.kwargs) == (
        sync_account.name, ["acme"], {"op": "list_invoices"})


@pytest.mark.django_db(transaction=True)  # the runner threads must see the invocations: commit them
def test_a_burst_worker_runs_a_keys_calls_one_after_another() -> None:
    first = sync_account.delay("acme", op="fetch_profile")
    second = sync_account.delay("acme", op="list_invoices")

    call_command("runworker", "--burst", "--noreload", "--threads", "2", verbosity=0)

    first.refresh_from_db()
    second.refresh_from_db()
    assert (first.result, second.result) == ("fetch_profile for acme", "list_invoices for acme")
    assert first.finished_at <= second.started_at  # one key: never two at once
