"""The run in progress: one ``Run``, set by ``execute`` around start, call and finish, read by all that needs it."""

from typing import Any

import pytest

from keyjobs import Status, current, signals, task
from keyjobs.claim import claim
from keyjobs.current import Run, this_run
from keyjobs.execute import execute
from keyjobs.models import Invocation
from keyjobs.worker import Worker
from tests import jobs
from tests.factories import RunnerFactory

pytestmark = pytest.mark.django_db

#: The worker of a test that runs ``run_is_the_workers``.
hosting: list[Worker] = []


@task
def look_around() -> dict[str, Any]:
    run = this_run()
    assert run is not None
    child = jobs.add.delay(1)
    return {"current": current().invocation.pk if current().invocation else None, "run": run.invocation.pk,
            "child's parent": child.parent_id, "status": run.invocation.status}


@task
def run_is_the_workers() -> bool:
    run = this_run()
    return run is not None and run.thread is not None and hosting[0].running[run.thread] is run


def run_here(invocation: Invocation) -> tuple[Status | None, Invocation]:
    runner = RunnerFactory()
    [claimed] = claim(runner, using="default")
    status = execute(claimed, runner, using="default", thread=0)
    return status, Invocation.objects.get(pk=invocation.pk)


def test_the_task_its_children_and_its_waits_see_the_same_run() -> None:
    status, invocation = run_here(look_around.delay())
    assert status == Status.SUCCESS
    assert invocation.return_value == {"current": invocation.pk, "run": invocation.pk,
                                       "child's parent": invocation.pk, "status": Status.RUNNING}


def test_the_run_spans_its_outcome_so_that_a_receiver_of_the_outcome_sees_it() -> None:
    seen: list[int | None] = []

    def finished(sender: Any, invocation: Invocation, **kwargs: Any) -> None:
        run = this_run()
        seen.append(run.invocation.pk if run is not None else None)

    signals.invocation_finished.connect(finished)
    try:
        _, invocation = run_here(jobs.add.delay(1))
    finally:
        signals.invocation_finished.disconnect(finished)
    assert seen == [invocation.pk]


def test_what_a_trigger_enqueues_has_its_cause_and_no_parent() -> None:
    _, source = run_here(jobs.sync_account.delay("acme"))
    [triggered] = Invocation.objects.filter(task_name=jobs.reindex_account.name)
    assert (triggered.cause_invocation_id, triggered.parent_id) == (source.pk, None)


@pytest.mark.django_db(transaction=True)
def test_the_workers_bookkeeping_holds_the_run_in_progress_itself() -> None:
    invocation = run_is_the_workers.delay()
    worker = Worker(threads=1, burst=True)
    hosting[:] = [worker]
    try:
        worker.run()
    finally:
        hosting.clear()
    invocation.refresh_from_db()
    assert (invocation.status, invocation.return_value) == (Status.SUCCESS, True)
    assert worker.running == {}, "nothing of the run is left in the bookkeeping"


def test_outside_a_run_there_is_no_run() -> None:
    assert this_run() is None
    assert current().run is None and current().invocation is None and not current().cancel_requested
    assert jobs.add.delay(1).parent_id is None


def test_nothing_of_a_run_is_left_to_the_thread_once_it_ends() -> None:
    run_here(look_around.delay())
    assert this_run() is None and current().invocation is None
    assert jobs.add.delay(1).parent_id is None


def test_a_run_is_frozen_and_is_only_ever_equal_to_itself() -> None:
    runner = RunnerFactory()
    invocation = jobs.add.delay(1)
    one, other = Run(invocation, runner, "default", 0), Run(invocation, runner, "default", 0)
    assert one == one and one != other and len({one, other}) == 2
    with pytest.raises(AttributeError):
        one.thread = 1  # type: ignore[misc]


@pytest.mark.django_tasks
def test_the_django_task_context_is_the_run_in_progress() -> None:
    from tests import django_jobs  # django.tasks: Django 6.1 only, where this test is selected

    result = django_jobs.context_id.enqueue()
    status, invocation = run_here(Invocation.objects.get(pk=result.id))
    assert (status, invocation.return_value) == (Status.SUCCESS, result.id)
    with pytest.raises(RuntimeError, match="runs on a keyjobs worker"):
        django_jobs.context_id.keyjobs_spec.func()


@pytest.mark.django_tasks
def test_nothing_of_a_run_is_left_to_the_thread_after_its_outcome_is_discarded() -> None:
    from tests import django_jobs  # django.tasks: Django 6.1 only, where this test is selected

    runner, thief = RunnerFactory(), RunnerFactory()
    result = django_jobs.taken_from_its_runner.enqueue(thief.pk)
    [claimed] = claim(runner, using="default")

    assert execute(claimed, runner, using="default", thread=0) is None, "the outcome is discarded"

    assert Invocation.objects.get(pk=result.id).status == Status.RUNNING
    assert this_run() is None
    with pytest.raises(RuntimeError, match="runs on a keyjobs worker"):
        django_jobs.context_id.keyjobs_spec.func()
