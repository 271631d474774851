"""Triggers: an outcome enqueues its subscribers in the transaction that records it, once; emit() in the caller's."""

import pytest
from django.db import IntegrityError, transaction

from keyjobs import ArgumentError, Status, TaskDeclarationError, emit, on_event, on_status, task
from keyjobs.execute import Outcome, finish
from keyjobs.firing import fire
from keyjobs.models import Event, Invocation
from keyjobs.worker import Worker
from tests import jobs
from tests.factories import RunnerFactory

pytestmark = pytest.mark.django_db(transaction=True)


def run_all() -> None:
    Worker(threads=1, burst=True).run()


# -- status triggers --------------------------------------------------------------------------


def test_a_success_triggers_its_subscriber_with_the_arguments_and_the_result():
    synced = jobs.sync_account.delay("acme", op="nightly")
    run_all()
    triggered = Invocation.objects.get(task_name="tests.jobs.reindex_account")
    assert triggered.kwargs == {"account_id": "acme", "op": "nightly", "result": "synced acme"}
    assert (triggered.cause_invocation_id, triggered.cause_status) == (synced.pk, Status.SUCCESS)
    assert triggered.status == Status.SUCCESS
    assert triggered.return_value == ["acme", "nightly", "synced acme"]
    assert list(Invocation.objects.get(pk=synced.pk).triggered.all()) == [triggered]
    assert not Invocation.objects.filter(task_name="tests.jobs.report_sync_failure").exists()


def test_defaults_of_the_triggering_call_are_filled_in():
    jobs.sync_account.delay("acme")
    run_all()
    assert Invocation.objects.get(task_name="tests.jobs.reindex_account").kwargs["op"] == "sync"


def test_a_failure_triggers_its_subscriber_with_the_error():
    failed = jobs.sync_account.delay("acme", fail=True)
    run_all()
    triggered = Invocation.objects.get(task_name="tests.jobs.report_sync_failure")
    assert triggered.kwargs == {"account_id": "acme", "error": "ValueError: could not sync acme"}
    assert (triggered.cause_invocation_id, triggered.cause_status) == (failed.pk, Status.FAILED)


def test_the_trigger_is_written_with_the_outcome_or_not_at_all():
    """The outcome's transaction holds the trigger: if it is undone, neither is written."""
    runner = RunnerFactory()
    synced = jobs.sync_account.delay("acme")
    Invocation.objects.filter(pk=synced.pk).update(status=Status.RUNNING, runner=runner)
    synced.refresh_from_db()

    class Undone(Exception):
        pass

    with pytest.raises(Undone), transaction.atomic():
        finish(synced, Outcome(Status.SUCCESS, {"return_value": "synced acme"}), runner, using="default")
        assert Invocation.objects.filter(task_name="tests.jobs.reindex_account").exists()
        raise Undone
    assert not Invocation.objects.filter(task_name="tests.jobs.reindex_account").exists()
    assert Invocation.objects.get(pk=synced.pk).status == Status.RUNNING
    assert finish(synced, Outcome(Status.SUCCESS, {"return_value": "synced acme"}), runner, using="default") \
        == Status.SUCCESS
    assert Invocation.objects.filter(task_name="tests.jobs.reindex_account").count() == 1


def test_a_recording_retried_after_it_landed_triggers_nothing_more():
    runner = RunnerFactory()
    synced = jobs.sync_account.delay("acme")
    Invocation.objects.filter(pk=synced.pk).update(status=Status.RUNNING, runner=runner)
    synced.refresh_from_db()
    outcome = Outcome(Status.SUCCESS, {"return_value": "synced acme"})
    assert finish(synced, outcome, runner, using="default") == Status.SUCCESS
    synced.status = Status.RUNNING  # as the retrying thread still believes
    # Found recorded by this very thread: its own success, and nothing is written or fired again.
    assert finish(synced, Outcome(Status.SUCCESS, {"return_value": "synced acme"}), runner, using="default") \
        == Status.SUCCESS
    fire(synced, Status.SUCCESS, {"return_value": "synced acme"}, using="default")  # even fired again by hand
    assert Invocation.objects.filter(task_name="tests.jobs.reindex_account").count() == 1


def test_the_database_refuses_a_second_trigger_of_one_outcome():
    synced = jobs.sync_account.delay("acme")
    first = jobs.reindex_account.delay("acme", "sync", "x")
    Invocation.objects.filter(pk=first.pk).update(cause_invocation=synced, cause_status=Status.SUCCESS)
    second = jobs.reindex_account.delay("acme", "sync", "x")
    with pytest.raises(IntegrityError), transaction.atomic():
        Invocation.objects.filter(pk=second.pk).update(cause_invocation=synced, cause_status=Status.SUCCESS)


def test_a_subscriber_that_cannot_be_enqueued_leaves_the_outcome_and_the_other_subscribers_alone(caplog):
    """A subscriber's running_limit that raises, or a query of it that the database refuses, fails that subscriber only."""
    closed = jobs.close_account.delay("acme")
    run_all()
    closed.refresh_from_db()
    assert (closed.status, closed.return_value) == (Status.SUCCESS, "closed acme")
    notified = Invocation.objects.get(task_name=jobs.notify_closed.name)
    assert (notified.status, notified.cause_invocation_id) == (Status.SUCCESS, closed.pk)
    assert not Invocation.objects.filter(task_name__in=[jobs.archive_closed.name, jobs.bill_closed.name]).exists()
    failures = list(Event.objects.filter(invocation=closed, kind=Event.Kind.TRIGGER_FAILED).order_by("id"))
    assert [(event.from_status, event.to_status) for event in failures] == [(Status.SUCCESS, Status.SUCCESS)] * 2
    assert failures[0].note.startswith(f"could not trigger {jobs.archive_closed.name}: builtins.RuntimeError: the tier service")
    assert failures[1].note.startswith(f"could not trigger {jobs.bill_closed.name}: ")
    assert "keyjobs_no_such_table" in failures[1].note
    logged = [record for record in caplog.records if "could not trigger" in record.getMessage()]
    assert len(logged) == 2 and all(record.exc_info for record in logged)


def test_on_status_must_name_a_task():
    with pytest.raises(TaskDeclarationError, match="must be a task declared with @task"):
        on_status(print, Status.SUCCESS)


@pytest.mark.parametrize("status", ["DONE", Status.RUNNING, Status.RETRY])
def test_on_status_must_name_an_outcome(status):
    with pytest.raises(TaskDeclarationError, match="a trigger follows a recorded outcome"):
        on_status(jobs.sync_account, status)


def test_a_triggered_task_must_be_able_to_take_what_it_receives():
    with pytest.raises(TaskDeclarationError, match=r"cannot give the required argument\(s\) region"):

        @task(name="tests.needs_region", trigger=on_status(jobs.sync_account, Status.SUCCESS))
        def needs_region(account_id, region): ...


def test_a_trigger_is_on_status_or_on_event():
    with pytest.raises(TaskDeclarationError, match="must be on_status"):

        @task(name="tests.odd", trigger="account.updated")
        def odd(account_id): ...


# -- events ---------------------------------------------------------------------------------------


def test_emit_enqueues_every_subscriber_with_the_arguments_it_takes():
    made = emit("account.updated", account_id="acme", plan="pro")
    by_task = {invocation.task_name: invocation for invocation in made}
    assert set(by_task) == {"tests.jobs.push_metadata", "tests.jobs.audit_update"}
    assert by_task["tests.jobs.push_metadata"].kwargs == {"account_id": "acme"}
    assert by_task["tests.jobs.audit_update"].kwargs == {"account_id": "acme", "plan": "pro"}
    assert all(invocation.cause_event == "account.updated" for invocation in made)


def test_emit_joins_the_callers_transaction():
    with pytest.raises(RuntimeError), transaction.atomic():
        emit("account.updated", account_id="acme")
        raise RuntimeError("undo")
    assert not Invocation.objects.exists()


def test_an_event_without_subscribers_enqueues_nothing():
    assert emit("nobody.listens", x=1) == []


def test_emit_checks_its_arguments_where_the_caller_sees_them():
    with pytest.raises(ArgumentError, match="emit"):
        emit("account.updated", account_id=object())
    with pytest.raises(ArgumentError, match="an event is a non-empty string"):
        emit("", account_id="acme")
    with pytest.raises(TaskDeclarationError, match="an event is a non-empty string"):
        on_event("")
