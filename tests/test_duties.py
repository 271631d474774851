"""The timed duties: each runs at its interval, on the database's clock, and one failing spares the others."""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
from django.db.models.functions import Now
from django.utils import timezone

from keyjobs import Status
from keyjobs.claim import releases
from keyjobs.current import Clock, Run
from keyjobs.duties import (
    Duties,
    Duty,
    GiveBackUnheld,
    duties_of,
    every_heartbeat,
    every_poll,
    release_deferred,
    until_release,
)
from keyjobs.execute import UNHELD
from keyjobs.models import Event, Invocation, Runner
from keyjobs.worker import Worker
from tests import jobs
from tests.factories import InvocationFactory, RunnerFactory
from tests.waiting import wait_for

# Transactional: the heartbeat closes obsolete connections, as it does in its own thread.
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def worker() -> Worker:
    """A worker with its runner row, as run() leaves it before its threads start."""
    worker = Worker(threads=1, poll_interval=0.05)
    worker.runner = RunnerFactory(heartbeat_at=timezone.now() - timedelta(seconds=3))
    return worker


@dataclass
class BareHost:
    """A host of duties that is not a Worker: the duties need only ``DutyHost``."""

    runner: Runner
    using: str = "default"
    lease: float = 6.0
    poll_interval: float = 0.05
    supervisor: int | None = None
    running: dict[int, Run] = field(default_factory=dict)
    lost: bool = False
    renewals: list[float] = field(default_factory=list)
    held: set[int] = field(default_factory=set)

    def renewed(self, at: float) -> None:
        self.renewals.append(at)

    @contextmanager
    def holding(self) -> Iterator[set[int]]:
        yield set(self.held)

    def declared_lost(self) -> None:
        self.lost = True


def test_the_duties_run_on_any_duty_host() -> None:
    host = BareHost(RunnerFactory())
    asked = time.monotonic()
    Duties(host).run_due()
    assert len(host.renewals) == 1 and host.renewals[0] >= asked and not host.lost
    Runner.objects.filter(pk=host.runner.pk).update(stopped_at=Now(), lost=True)
    Duties(host).run_due()
    assert host.lost


def test_a_runner_has_its_duties_each_with_an_interval(worker, settings):
    settings.KEYJOBS_HEARTBEAT_INTERVAL = 2.0
    duties = {duty.name: duty.interval(worker) for duty in duties_of(worker)}
    release = duties.pop("release deferred work")
    assert duties == {
        "heartbeat": 2.0,
        "recover lost runners": 2.0,
        "wake orphaned parked invocations": 2.0,
        "give back what no thread holds": 2.0,
        "promote due retries": 0.05,
        "flag overdue runs": 2.0,
        "roll up statistics": 2.0,
        # At once when the runner starts; then until the next schedule's tick (tests/test_schedules.py).
        "enqueue due schedule ticks": 0.0,
    }
    # As often as an idle runner polls, or sooner when deferred work is due (another test may have left some).
    assert release <= 0.05


def test_the_heartbeat_stamps_the_databases_clock(worker):
    before = worker.runner.heartbeat_at
    Duties(worker).run_due()
    worker.runner.refresh_from_db()
    assert worker.runner.heartbeat_at > before
    assert Runner.objects.filter(pk=worker.runner.pk, heartbeat_at__lte=Now()).exists()
    assert not worker.lost


def test_a_runner_declared_lost_stops_at_its_next_heartbeat(worker):
    Runner.objects.filter(pk=worker.runner.pk).update(stopped_at=Now(), lost=True)
    Duties(worker).run_due()
    assert worker.lost and worker.stopping.is_set()


def test_a_duty_runs_again_only_once_its_interval_has_passed(worker):
    runs: list[float] = []
    duties = Duties(worker)
    duties.duties = [Duty("count", lambda worker: 0.2, lambda worker: runs.append(time.monotonic()) or 0)]
    duties.run_due()
    duties.run_due()
    assert len(runs) == 1
    assert 0.15 < duties.tick() <= 0.2
    time.sleep(0.21)
    duties.run_due()
    assert len(runs) == 2


def test_a_failing_duty_spares_the_others(worker):
    ran: list[str] = []

    def fail(worker: Worker) -> int:
        raise RuntimeError("boom")

    duties = Duties(worker)
    duties.duties = [Duty("fails", every_heartbeat, fail),
                     Duty("goes on", every_heartbeat, lambda worker: ran.append("yes") or 0)]
    duties.run_due()
    assert ran == ["yes"]


def test_due_retries_are_promoted_by_the_databases_clock(worker):
    due = InvocationFactory(status=Status.RETRY, run_after=timezone.now() - timedelta(seconds=1))
    later = InvocationFactory(status=Status.RETRY, run_after=timezone.now() + timedelta(minutes=5))
    assert Duties(worker).run_due() >= 1
    assert Invocation.objects.get(pk=due.pk).status == Status.REGISTERED
    assert Invocation.objects.get(pk=later.pk).status == Status.RETRY


def test_a_silent_runners_work_is_recovered(worker, settings):
    silent = RunnerFactory()
    Runner.objects.filter(pk=silent.pk).update(heartbeat_at=Now() - timedelta(seconds=600))
    owned = InvocationFactory(status=Status.RUNNING, runner=silent, running_key='{"account_id":"acme"}',
                              task_name=jobs.keyed.name)
    Duties(worker).run_due()
    assert Invocation.objects.get(pk=owned.pk).status == Status.REGISTERED
    assert Runner.objects.get(pk=silent.pk).lost


def test_an_orphaned_parked_invocation_is_woken(worker):
    parked = InvocationFactory(status=Status.REROUTED, running_key='{"account_id":"acme"}', task_name=jobs.keyed.name)
    Duties(worker).run_due()
    assert Invocation.objects.get(pk=parked.pk).status == Status.REGISTERED


def test_a_run_past_its_limit_is_flagged_once(worker):
    running = InvocationFactory(status=Status.RUNNING, runner=worker.runner, task_name=jobs.too_slow.name)
    worker.running[0] = Run(running, worker.runner, "default", 0, clock=Clock(began=time.monotonic() - 10))
    every = Duties(worker)
    every.run_due()
    for duty in every.duties:
        duty.last = float("-inf")
    every.run_due()
    assert Event.objects.filter(invocation=running, kind=Event.Kind.OVERDUE).count() == 1


def test_a_run_past_its_limit_only_by_the_time_it_was_paused_is_not_flagged(worker):
    running = InvocationFactory(status=Status.RUNNING, runner=worker.runner, task_name=jobs.too_slow.name)
    clock = Clock(began=time.monotonic() - 10)
    clock.pause(at=clock.began)  # paused as it began, 10 s ago, and still: it has worked no time at all
    worker.running[0] = Run(running, worker.runner, "default", 0, clock=clock)
    Duties(worker).run_due()
    assert not Event.objects.filter(invocation=running, kind=Event.Kind.OVERDUE).exists()


def test_retries_are_looked_for_as_often_as_an_idle_runner_polls(worker):
    assert every_poll(worker) == worker.poll_interval


def test_deferred_work_brings_the_release_duty_forward_and_wakes_the_pool_when_due(worker) -> None:
    releases.take_due()
    releases.note(timezone.now() + timedelta(seconds=0.3), timezone.now())
    assert until_release(worker) <= 0.31
    wait_for(lambda: release_deferred(worker) >= 1, timeout=5, what="the deferred work due")
def test_a_hard_limited_run_of_an_unsupervised_runner_is_flagged_as_not_killed(worker):
    # Without runworker --processes nothing can kill it: the flag says so, rather than nothing happening.
    running = InvocationFactory(status=Status.RUNNING, runner=worker.runner, task_name=jobs.hard_limited.name)
    worker.running[0] = Run(running, worker.runner, "default", 0, clock=Clock(began=time.monotonic() - 10))
    Duties(worker).run_due()
    overdue = Event.objects.get(invocation=running, kind=Event.Kind.OVERDUE)
    assert "NOT killed: only a runner started with runworker --processes" in overdue.note


def test_what_a_runner_owns_and_no_thread_of_it_holds_goes_back_after_a_lease(settings):
    # A claim whose reply was lost: owned by a live runner, RUNNING, and no thread of it runs it.
    host = BareHost(RunnerFactory(), lease=0.3)
    held = InvocationFactory(status=Status.RUNNING, runner=host.runner, runner_thread=0, task_name=jobs.add.name)
    forgotten = InvocationFactory(status=Status.RUNNING, runner=host.runner, runner_thread=1, task_name=jobs.add.name)
    host.held = {held.pk}
    sweep = GiveBackUnheld()
    assert sweep.run(host) == 0  # seen once: its thread may be about to hear of it
    time.sleep(0.35)
    assert sweep.run(host) == 1
    forgotten.refresh_from_db()
    assert forgotten.status == Status.REGISTERED
    assert Event.objects.filter(invocation=forgotten, to_status=Status.REGISTERED, note=UNHELD).exists()
    held.refresh_from_db()
    assert held.status == Status.RUNNING


def test_what_a_thread_holds_again_is_not_given_back(settings):
    host = BareHost(RunnerFactory(), lease=0.3)
    taken_back = InvocationFactory(status=Status.PENDING, runner=host.runner, runner_thread=0, task_name=jobs.add.name)
    sweep = GiveBackUnheld()
    assert sweep.run(host) == 0
    host.held = {taken_back.pk}  # its thread took it back (claim.adopt) before the lease passed
    time.sleep(0.35)
    assert sweep.run(host) == 0
    host.held = set()
    assert sweep.run(host) == 0  # unheld again: a new lease begins
    taken_back.refresh_from_db()
    assert taken_back.status == Status.PENDING
