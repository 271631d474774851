"""Cancellation: a waiting invocation ends CANCELLED; a running one is asked to stop; the key goes on."""

import os
from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.utils import timezone

from keyjobs import InvocationCancelled, Status, current
from keyjobs.claim import claim
from keyjobs.control import retry
from keyjobs.models import Event, Invocation
from keyjobs.worker import Worker
from tests import jobs
from tests.factories import InvocationFactory, RunnerFactory
from tests.waiting import thread_worker, wait_for

pytestmark = pytest.mark.django_db

ACME = '{"account_id":"acme"}'


def test_a_waiting_invocation_ends_cancelled() -> None:
    invocation = jobs.keyed.delay("acme", "sync")

    assert invocation.cancel(by="tests")

    assert invocation.status == Status.CANCELLED and invocation.finished_at is not None
    assert invocation.error == "Cancelled by tests"
    with pytest.raises(InvocationCancelled, match="was cancelled"):
        _ = invocation.result
    [event] = Event.objects.filter(invocation=invocation)
    assert (event.from_status, event.to_status, event.note) == (Status.REGISTERED, Status.CANCELLED,
                                                                "cancelled by tests")


def test_a_deferred_or_retrying_invocation_ends_cancelled() -> None:
    later = timezone.now() + timedelta(hours=1)
    deferred = InvocationFactory(status=Status.REGISTERED, run_after=later)
    retrying = InvocationFactory(status=Status.RETRY, run_after=later)
    assert deferred.cancel() and retrying.cancel()
    assert {deferred.status, retrying.status} == {Status.CANCELLED}


def test_cancelling_a_parked_head_wakes_the_next_invocation_of_its_key() -> None:
    head = InvocationFactory(task_name=jobs.keyed.name, running_key=ACME, status=Status.REROUTED)
    behind = InvocationFactory(task_name=jobs.keyed.name, running_key=ACME, status=Status.REROUTED)
    head.cancel()
    assert Invocation.objects.get(pk=behind.pk).status == Status.REGISTERED


def test_a_finished_invocation_is_left_alone() -> None:
    done = InvocationFactory(status=Status.SUCCESS)
    assert not done.cancel()
    assert done.status == Status.SUCCESS and not done.cancel_requested


def test_a_cancelled_invocation_can_be_retried_by_hand_and_forgets_the_request() -> None:
    invocation = InvocationFactory(status=Status.CANCELLED, cancel_requested=True)
    assert retry([invocation]) == [invocation.pk]
    invocation.refresh_from_db()
    assert invocation.status == Status.REGISTERED and not invocation.cancel_requested


def test_outside_a_run_there_is_no_invocation_and_no_request() -> None:
    assert current().invocation is None and not current().cancel_requested


def test_a_claimed_invocation_is_asked_to_stop() -> None:
    jobs.keyed.delay("acme", "sync")
    [running] = claim(RunnerFactory(), using="default", thread=1, start=True)
    assert running.cancel(by="tests")
    assert running.status == Status.RUNNING and running.cancel_requested
    assert Event.objects.get(invocation=running, kind=Event.Kind.CANCEL_REQUESTED).note == (
        "cancelled by tests: asked to stop")
    assert not running.cancel(), "asked once"


# -- running invocations, on a real runner ----------------------------------------------------------


@pytest.fixture
def runner() -> Iterator[Worker]:
    with thread_worker(threads=2, poll_interval=0.05) as worker:
        yield worker


def started(marker: str) -> None:
    wait_for(lambda: os.path.exists(marker + ".started"), timeout=30, what="the run to start")


@pytest.mark.django_db(transaction=True)
def test_a_running_task_that_reads_the_request_ends_cancelled_and_the_key_goes_on(runner, tmp_path) -> None:
    marker = str(tmp_path / "run")
    running = jobs.stoppable.delay("acme", marker)
    following = jobs.stoppable.delay("acme", str(tmp_path / "next"), seconds=0.0)
    started(marker)

    assert running.cancel()

    assert running.wait(timeout=30) == Status.CANCELLED
    assert following.wait(timeout=30) == Status.SUCCESS
    assert Invocation.objects.get(pk=running.pk).error == "stopped as asked"


@pytest.mark.django_db(transaction=True)
def test_a_task_that_ignores_the_request_ends_as_it_ends(runner, tmp_path) -> None:
    marker = str(tmp_path / "run")
    running = jobs.stoppable.delay("acme", marker, obey=False)
    started(marker)
    running.cancel()
    assert running.wait(timeout=30) == Status.SUCCESS
    assert running.result == "asked, but finished anyway"


@pytest.mark.django_db(transaction=True)
def test_an_async_task_is_cancelled_outright(runner, tmp_path) -> None:
    marker = str(tmp_path / "run")
    running = jobs.stoppable_async.delay("acme", marker, seconds=60.0)
    started(marker)

    running.cancel()

    assert running.wait(timeout=30) == Status.CANCELLED
    stopped = Invocation.objects.get(pk=running.pk)
    assert "the coroutine was stopped" in stopped.error
    # The README's promise is a fifth of a second; seconds later would be a watcher that looks too seldom.
    requested = Event.objects.get(invocation=running, kind=Event.Kind.CANCEL_REQUESTED).at
    assert stopped.finished_at - requested < timedelta(seconds=2)
