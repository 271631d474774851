"""Waited-on work goes first: each run waiting on an invocation raises its effective priority by one, for as long as
it waits, and the claim and a key's wake-up take the queue in that order."""

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db.models import Count
from django.utils import timezone

from keyjobs import Status
from keyjobs.claim import claim
from keyjobs.execute import execute
from keyjobs.models import Event, Invocation, Runner
from keyjobs.recovery import recover_lost_runners
from keyjobs.status import change
from keyjobs.transitions import apply
from tests import flows, jobs
from tests.factories import InvocationFactory, RunnerFactory
from tests.waiting import thread_worker as worker
from tests.waiting import wait_for


def pause(waiter: Invocation, waited: Invocation, runner: Runner) -> None:
    """Pause ``waiter``'s run on ``waited`` through the status writer, as ``child.wait()`` does."""
    assert apply([waiter.pk], change(Status.PAUSED, runner_id=runner.pk, values={"waiting_on": waited.pk}),
                 using="default", only_from={Status.RUNNING}, owner=runner) == [waiter.pk]


def go_on(waiter: Invocation, runner: Runner) -> None:
    """Take ``waiter``'s paused run up again, as a wait that ends does."""
    assert apply([waiter.pk], change(Status.RUNNING, resumed=True, runner_id=runner.pk, values={"waiting_on": None}),
                 using="default", only_from={Status.PAUSED}, owner=runner) == [waiter.pk]


def running(runner: Runner) -> Invocation:
    return InvocationFactory(status=Status.RUNNING, runner=runner, runner_thread=0, attempts=1)


def boost_of(invocation: Invocation) -> tuple[int, int]:
    """Return (waiters, effective priority) as the database has them now."""
    fresh = Invocation.objects.get(pk=invocation.pk)
    return fresh.waiters, fresh.effective_priority


def miscounted() -> list[str]:
    """Each invocation whose count of waiters is not the number of runs that wait on it, as a sentence."""
    waiting = dict(Invocation.objects.filter(waiting_on__isnull=False).values_list("waiting_on")
                   .annotate(n=Count("pk")).order_by())
    counted = dict(Invocation.objects.filter(waiters__gt=0).values_list("pk", "waiters"))
    return [f"#{pk} counts {counted.get(pk, 0)} waiters, {waiting.get(pk, 0)} wait on it"
            for pk in sorted(waiting.keys() | counted.keys()) if waiting.get(pk, 0) != counted.get(pk, 0)]


@pytest.fixture
def runner() -> Runner:
    return RunnerFactory()


# -- the order --------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_call_a_paused_run_waits_on_is_claimed_before_the_backlog_ahead_of_it(runner: Runner) -> None:
    backlog = [jobs.add.delay(n) for n in range(5)]
    child = jobs.add.delay(99)
    pause(running(runner), child, runner)
    assert boost_of(child) == (1, 1)
    assert [one.pk for one in claim(runner, using="default", limit=2)] == [child.pk, backlog[0].pk]


@pytest.mark.django_db
def test_each_waiter_raises_the_effective_priority_by_one(runner: Runner) -> None:
    preferred = jobs.add.using(priority=1).delay(1)
    child = jobs.add.delay(2)
    first, second = running(runner), running(runner)
    pause(first, child, runner)
    assert boost_of(child) == (1, 1)  # level with the call of priority 1, and behind it: registered later
    assert claim(runner, using="default")[0].pk == preferred.pk
    pause(second, child, runner)
    assert boost_of(child) == (2, 2)
    other = jobs.add.using(priority=1).delay(3)
    assert claim(runner, using="default")[0].pk == child.pk
    assert claim(runner, using="default")[0].pk == other.pk


@pytest.mark.django_db
def test_a_wait_that_ends_takes_its_boost_back(runner: Runner) -> None:
    first = jobs.add.delay(1)
    child = jobs.add.delay(2)
    waiter = running(runner)
    pause(waiter, child, runner)
    go_on(waiter, runner)
    assert boost_of(child) == (0, 0)
    assert claim(runner, using="default")[0].pk == first.pk


@pytest.mark.django_db
def test_within_a_key_the_call_waited_on_goes_on_first(runner: Runner) -> None:
    calls = [jobs.keyed.delay("acme", str(n)) for n in range(3)]
    [claimed] = claim(runner, using="default")
    assert claimed.pk == calls[0].pk
    pause(running(runner), calls[2], runner)
    while claimed is not None:  # each run frees the key, and its next call goes on
        execute(claimed, runner, using="default")
        claimed = next(iter(claim(runner, using="default")), None)
    started = (Event.objects.filter(invocation__in=calls, to_status=Status.RUNNING).order_by("pk")
               .values_list("invocation_id", flat=True))
    assert list(started) == [calls[0].pk, calls[2].pk, calls[1].pk]


# -- no boost outlives its wait -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_recovered_waiter_leaves_no_boost_behind(runner: Runner) -> None:
    child = jobs.add.delay(1)
    waiter = running(runner)
    pause(waiter, child, runner)
    Runner.objects.filter(pk=runner.pk).update(heartbeat_at=timezone.now() - timedelta(minutes=5))
    assert recover_lost_runners(using="default", lease=60) == [waiter.pk]
    assert boost_of(child) == (0, 0)
    assert miscounted() == []


@pytest.mark.django_db(transaction=True)
def test_a_paused_parent_raises_its_child_until_its_wait_ends(worker_process: Any, tmp_path: Path) -> None:
    marker = str(tmp_path / "child")
    parent = jobs.wait_for_child.delay(1.0, marker)
    process = worker_process("--threads", "1", "--burst", "-v0")
    wait_for(lambda: Path(marker + ".started").exists(), timeout=30, what="the child to start")
    child = Invocation.objects.get(parent=parent)
    assert boost_of(child) == (1, 1)
    process.wait(timeout=60)
    assert Invocation.objects.get(pk=parent.pk).status == Status.SUCCESS
    assert boost_of(child) == (0, 0)


@pytest.mark.django_db(transaction=True)
def test_waits_that_start_and_end_at_once_are_all_counted() -> None:
    waited = jobs.add.using(queue="elsewhere").delay(1)  # no runner of this test serves it: waited on till timeout
    waiters = [jobs.wait_on.delay(waited.pk, 2.0) for _ in range(4)]
    with worker(threads=4, queues=["default"]):
        wait_for(lambda: boost_of(waited) == (4, 4), timeout=30, what="four waits on one invocation to count")
        wait_for(lambda: all(Invocation.objects.get(pk=one.pk).is_final for one in waiters), timeout=30,
                 what="the waits to time out")
    assert {Invocation.objects.get(pk=one.pk).return_value for one in waiters} == {"timed out"}
    assert boost_of(waited) == (0, 0)
    assert miscounted() == []


@pytest.mark.django_db(transaction=True)
def test_a_suspended_workflow_raises_its_child_and_its_cancel_takes_it_back(tmp_path: Path) -> None:
    flow = flows.waits_elsewhere.delay(str(tmp_path / "log"))
    with worker(threads=2, queues=["default"]):
        wait_for(lambda: Invocation.objects.get(pk=flow.pk).status == Status.PAUSED,
                 what="the workflow to wait on its child")
        child = Invocation.objects.get(parent=flow)
        assert boost_of(child) == (1, 1)
        assert flow.cancel(by="test")
    assert boost_of(child) == (0, 0)
    assert miscounted() == []


@pytest.mark.django_db(transaction=True)
def test_the_migration_counts_the_runs_already_waiting() -> None:
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    before, after = [("keyjobs", "0016_message_idempotency")], [("keyjobs", "0017_waited_on_first")]
    executor = MigrationExecutor(connection)
    executor.migrate(before)
    try:
        old = executor.loader.project_state(before).apps.get_model("keyjobs", "Invocation")
        waited = old.objects.create(task_name="tests.jobs.add", queue="default")
        alone = old.objects.create(task_name="tests.jobs.add", queue="default")
        for _ in range(2):
            old.objects.create(task_name="tests.jobs.add", queue="default", status=Status.PAUSED, waiting_on=waited)
        executor = MigrationExecutor(connection)
        executor.migrate(after)
    finally:
        executor = MigrationExecutor(connection)
        executor.migrate(executor.loader.graph.leaf_nodes("keyjobs"))
    assert boost_of(waited) == (2, 2)
    assert boost_of(alone) == (0, 0)
