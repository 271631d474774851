"""Waits on another invocation: the waiting run is PAUSED, lends its thread, and goes on; refused waits fail clearly."""

import asyncio
import signal
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connections
from django.utils import timezone

from keyjobs import Status
from keyjobs.exceptions import InvalidTransition
from keyjobs.models import Event, Invocation, Runner
from keyjobs.recovery import recover_lost_runners
from keyjobs.status import change
from keyjobs.transitions import apply
from keyjobs.worker import Worker
from tests import jobs
from tests.factories import InvocationFactory, RunnerFactory
from tests.waiting import wait_for

FAST_LEASE = {"KEYJOBS_HEARTBEAT_INTERVAL": "0.25", "KEYJOBS_LEASE": "1.5"}


def path_of(invocation: Invocation) -> list[str]:
    """Return the statuses the invocation went through, in order."""
    events = Event.objects.filter(invocation=invocation, kind=Event.Kind.TRANSITION).order_by("id")
    return [events[0].from_status, *(event.to_status for event in events)] if events else []


@pytest.mark.django_db(transaction=True)
def test_a_three_level_fan_out_completes_on_two_threads(worker_process: Any) -> None:
    root = jobs.fan_out.delay(3)
    worker_process("--threads", "2", "--burst", "-v0").wait(timeout=180)
    root.refresh_from_db()
    assert (root.status, root.return_value) == (Status.SUCCESS, 1 + 4 + 16 + 64)
    assert Invocation.objects.count() == 85
    assert not Invocation.objects.exclude(status=Status.SUCCESS).exists()
    assert Invocation.objects.filter(parent=root).count() == 4
    assert Invocation.objects.filter(parent__parent__parent=root).count() == 64
    assert Status.PAUSED in path_of(root)


@pytest.mark.django_db(transaction=True)
def test_a_paused_parent_resumes_when_its_child_is_final(worker_process: Any, tmp_path: Path) -> None:
    marker = str(tmp_path / "child")
    parent = jobs.wait_for_child.delay(1.0, marker)
    # One thread: the child can only run on the thread its paused parent lends.
    process = worker_process("--threads", "1", "--burst", "-v0")
    wait_for(lambda: Path(marker + ".started").exists(), timeout=30, what="the child to start")
    child = Invocation.objects.get(parent=parent)
    parent.refresh_from_db()
    assert (parent.status, parent.waiting_on_id) == (Status.PAUSED, child.pk)
    process.wait(timeout=60)
    parent.refresh_from_db()
    assert (parent.status, parent.return_value, parent.attempts) == (Status.SUCCESS, marker, 1)
    assert parent.waiting_on_id is None
    assert path_of(parent) == ["REGISTERED", "PENDING", "RUNNING", "PAUSED", "RUNNING", "SUCCESS"]
    paused, resumed = Event.objects.filter(invocation=parent, to_status__in=["PAUSED"]).get(), Event.objects.get(
        invocation=parent, from_status=Status.PAUSED)
    assert paused.note == f"waits for #{child.pk}"
    assert resumed.note == f"its wait for #{child.pk} ended SUCCESS"
    assert child.runner_thread != parent.runner_thread


@pytest.mark.django_db(transaction=True)
def test_a_wait_past_its_timeout_resumes_the_parent_and_raises_there(worker_process: Any, tmp_path: Path) -> None:
    parent = jobs.wait_for_child.delay(3.0, str(tmp_path / "child"), timeout=0.3)
    worker_process("--threads", "1", "--burst", "-v0").wait(timeout=60)
    parent.refresh_from_db()
    assert parent.status == Status.FAILED
    assert parent.error_type == "builtins.TimeoutError" and "after 0.3s" in parent.error
    assert path_of(parent)[-3:] == ["PAUSED", "RUNNING", "FAILED"]
    assert Event.objects.filter(invocation=parent, note__endswith="timed out after 0.3s").exists()
    assert Invocation.objects.get(parent=parent).status == Status.SUCCESS


@pytest.mark.django_db(transaction=True)
def test_a_run_that_waits_on_itself_fails_with_the_reason(worker_process: Any) -> None:
    invocation = jobs.wait_on_itself.delay()
    worker_process("--threads", "1", "--burst", "-v0").wait(timeout=60)
    invocation.refresh_from_db()
    assert invocation.status == Status.FAILED
    assert invocation.error == f"invocation #{invocation.pk} of {jobs.wait_on_itself.name} waits on itself: it would never end"
    assert Status.PAUSED not in path_of(invocation)


@pytest.mark.django_db(transaction=True)
def test_a_wait_cycle_fails_with_the_reason_instead_of_hanging(worker_process: Any) -> None:
    parent = jobs.wait_cycle_parent.delay()
    worker_process("--threads", "2", "--burst", "-v0").wait(timeout=60)
    child = Invocation.objects.get(parent=parent)
    parent.refresh_from_db()
    # Whichever closed the cycle finds it (both may, at the same moment); the other's wait then ends with it.
    refused = [inv for inv in (parent, child) if inv.error_type == "keyjobs.exceptions.WaitRefused"]
    assert refused, (parent.error, child.error)
    for waiter in refused:
        other = child if waiter == parent else parent
        assert waiter.status == Status.FAILED
        assert waiter.error == (f"wait cycle: #{waiter.pk} waits for #{other.pk}, #{other.pk} waits for #{waiter.pk}; "
                                f"#{waiter.pk} of {waiter.task_name} would wait for ever")
        assert Event.objects.filter(invocation=waiter, note=f"its wait for #{other.pk} was refused: a cycle").exists()
    assert parent.is_final and child.is_final


@pytest.mark.django_db(transaction=True)
def test_waiting_on_an_invocation_of_the_key_it_holds_is_a_cycle(worker_process: Any) -> None:
    parent = jobs.wait_on_own_key.delay("acme")
    worker_process("--threads", "2", "--burst", "-v0").wait(timeout=60)
    parent.refresh_from_db()
    child = Invocation.objects.get(parent=parent)
    assert parent.status == Status.FAILED
    assert f"#{child.pk} waits for its key, held by #{parent.pk}" in parent.error
    assert child.status == Status.SUCCESS  # it ran once its key was free


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_a_dead_runners_paused_invocation_is_recovered_and_runs_again(worker_process: Any, tmp_path: Path) -> None:
    marker = str(tmp_path / "child")
    parent = jobs.wait_for_child.delay(60.0, marker)
    doomed = worker_process("--threads", "1", env=FAST_LEASE)
    wait_for(lambda: Path(marker + ".started").exists(), timeout=30, what="the child to start")
    wait_for(lambda: Invocation.objects.get(pk=parent.pk).status == Status.PAUSED, what="the parent to pause")
    doomed.process.send_signal(signal.SIGKILL)
    doomed.kill()
    # The rerun and its new child are quick; the first child, also recovered, runs again quickly too.
    Invocation.objects.filter(task_name__in=[jobs.wait_for_child.name, jobs.sleep_then_return.name]).update(
        args=[0.0, marker])
    # Past its lease, for the next runner to find it lost when it starts: --burst stops once nothing waits.
    wait_for(lambda: Runner.objects.silent(float(FAST_LEASE["KEYJOBS_LEASE"])).exists(), what="the lease to lapse")
    worker_process("--threads", "1", "--burst", "-v0", env=FAST_LEASE).wait(timeout=60)
    parent.refresh_from_db()
    assert (parent.status, parent.attempts) == (Status.SUCCESS, 2)
    assert Event.objects.filter(invocation=parent, from_status=Status.PAUSED, to_status=Status.REGISTERED,
                                note__contains="while it was paused, waiting for #").exists()
    assert not Invocation.objects.exclude(status=Status.SUCCESS).exists()
    assert Runner.objects.filter(lost=True).count() == 1


@pytest.mark.django_db
def test_recovery_requeues_a_paused_invocation_and_forgets_what_it_waited_for() -> None:
    lost = RunnerFactory(heartbeat_at=timezone.now() - timedelta(minutes=5))
    child = InvocationFactory()
    paused = InvocationFactory(status=Status.PAUSED, runner=lost, runner_thread=0, waiting_on=child)
    assert recover_lost_runners(using="default", lease=60) == [paused.pk]
    paused.refresh_from_db()
    assert (paused.status, paused.waiting_on_id) == (Status.REGISTERED, None)
    assert Event.objects.get(invocation=paused).note.endswith(f"while it was paused, waiting for #{child.pk}; it runs again")


@pytest.mark.django_db
def test_recovery_cancels_a_paused_invocation_whose_cancel_was_requested() -> None:
    lost = RunnerFactory(heartbeat_at=timezone.now() - timedelta(minutes=5))
    child = InvocationFactory()
    paused = InvocationFactory(status=Status.PAUSED, runner=lost, runner_thread=0, waiting_on=child,
                               cancel_requested=True)
    recover_lost_runners(using="default", lease=60)
    paused.refresh_from_db()
    assert (paused.status, paused.waiting_on_id) == (Status.CANCELLED, None)


@pytest.mark.django_db
def test_a_wait_outside_a_task_polls_until_its_timeout_without_pausing_anything() -> None:
    invocation = jobs.add.delay(1, 2)
    with pytest.raises(TimeoutError, match=f"invocation #{invocation.pk} of tests.jobs.add is still REGISTERED"):
        invocation.wait(timeout=0.1)
    with pytest.raises(TimeoutError):
        invocation.get_result(timeout=0.05)
    assert not Event.objects.filter(to_status=Status.PAUSED).exists()


@pytest.mark.django_db(transaction=True)
def test_reading_a_childs_result_inside_a_task_does_not_wait_for_it(tmp_path: Path) -> None:
    parent = jobs.peek_at_child.delay(0.3, str(tmp_path / "child"))
    Worker(threads=1, burst=True).run()
    parent.refresh_from_db()
    assert parent.result == "not finished" and Status.PAUSED not in path_of(parent)


@pytest.mark.django_db(transaction=True)
def test_an_async_task_awaiting_its_childs_result_is_paused_meanwhile(tmp_path: Path) -> None:
    marker = str(tmp_path / "child")
    parent = jobs.await_child.delay(0.2, marker)
    Worker(threads=1, burst=True).run()  # one thread: the child runs on the thread the paused parent lends
    parent.refresh_from_db()
    child = Invocation.objects.get(parent=parent)
    assert (parent.result, child.result) == (marker, marker)
    assert path_of(parent) == [Status.REGISTERED, Status.PENDING, Status.RUNNING, Status.PAUSED, Status.RUNNING,
                               Status.SUCCESS]


@pytest.mark.django_db(transaction=True)
def test_async_code_awaits_a_result_without_holding_a_thread() -> None:
    async def go() -> tuple[list[str], Any]:
        invocation = await jobs.add.adelay(2, b=3)
        done: list[str] = []

        async def waiter() -> Any:
            try:
                return await invocation.aget_result(timeout=0.6)
            except TimeoutError:
                done.append("waiter timed out")
                raise

        async def other() -> None:
            # Django's one thread for sync code is free while the waiter waits: this query is not queued behind it.
            await sync_to_async(Invocation.objects.count)()
            done.append("other query")

        waiting = asyncio.ensure_future(waiter())
        await asyncio.sleep(0.1)
        await other()
        with pytest.raises(TimeoutError, match=f"#{invocation.pk} of tests.jobs.add is still REGISTERED"):
            await waiting
        runner = threading.Thread(target=Worker(threads=1, burst=True).run)
        runner.start()
        value = await invocation.aget_result(timeout=30)
        await sync_to_async(runner.join)(30)
        await invocation.arefresh_from_db()
        await sync_to_async(connections.close_all)()  # the thread that ran the queries
        return done, (value, invocation.status)

    assert asyncio.run(go()) == (["other query", "waiter timed out"], (5, Status.SUCCESS))


@pytest.mark.django_db
def test_delay_outside_a_run_has_no_parent() -> None:
    assert jobs.add.delay(1, 2).parent_id is None


@pytest.mark.django_db
def test_only_a_paused_run_is_resumed() -> None:
    runner = RunnerFactory()
    pending = InvocationFactory(status=Status.PENDING, runner=runner)
    with pytest.raises(InvalidTransition, match="cannot go from PENDING to RUNNING"):
        apply([pending.pk], change(Status.RUNNING, resumed=True), using="default")
    with pytest.raises(ValueError, match="only RUNNING is resumed"):
        change(Status.SUCCESS, resumed=True)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("prefetch", [1, 4])
def test_a_stopping_worker_runs_what_its_paused_run_waits_for_then_stops(tmp_path: Path, prefetch: int) -> None:
    marker = str(tmp_path / "child")
    parent = jobs.wait_for_child.delay(0.5, marker)
    worker = Worker(threads=1, poll_interval=0.02, prefetch=prefetch)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_for(lambda: Invocation.objects.get(pk=parent.pk).status == Status.PAUSED, what="the parent to pause")
        worker.stop()
        thread.join(30)
        assert not thread.is_alive()
    finally:
        worker.stop()
        thread.join(30)
    parent.refresh_from_db()
    assert (parent.status, parent.return_value) == (Status.SUCCESS, marker)
    assert Runner.objects.get(pk=worker.runner.pk).stopped_at is not None


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("parent_task", [jobs.patient_parent, jobs.patient_parent_async], ids=["sync", "async"])
def test_paused_time_counts_toward_no_time_limit(tmp_path: Path, parent_task: Any) -> None:
    # 0.6 s of work and a wait of 2.5 s under limits of 1 s: neither the soft limit, nor OVERDUE, nor (async) the
    # cancel at the limit counts the wait.
    parent = parent_task.delay(2.5, str(tmp_path / "child"))
    Worker(threads=1, burst=True).run()  # one thread: the child runs on the thread the paused parent lends
    parent.refresh_from_db()
    assert parent.status == Status.SUCCESS, parent.error
    assert Status.PAUSED in path_of(parent)
    assert not Event.objects.filter(invocation=parent, kind=Event.Kind.OVERDUE).exists()


@pytest.mark.django_db(transaction=True)
def test_a_pause_that_cannot_be_recorded_gives_up_after_a_lease(settings):
    # While the database is away for longer than its lease, the runner's work is recovered by others: the run
    # ends (NotOwner) instead of retrying for ever.
    from keyjobs.current import Run
    from keyjobs.exceptions import NotOwner
    from keyjobs.waits import _move
    from tests.fault_injection import while_the_database_is_away

    settings.KEYJOBS_LEASE = 0.5
    runner = RunnerFactory()
    invocation = jobs.add.delay(1)
    Invocation.objects.filter(pk=invocation.pk).update(status=Status.RUNNING, runner=runner, runner_thread=0)
    run = Run(invocation, runner, "default", 0)
    pause = change(Status.PAUSED, runner_id=runner.pk, thread=0, note="waits")
    how, what = while_the_database_is_away(lambda: _move(run, pause, Status.RUNNING), within=5)
    assert how == "raised" and isinstance(what, NotOwner), (how, what)
    assert "for over a lease" in str(what)
