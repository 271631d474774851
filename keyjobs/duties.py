"""Timed duties: everything a runner does on a timer, each with its interval, in one list.

The runner's duty thread runs the list (``Duties.run_due``); the runner
threads never do timed work themselves, and no duty runs while the pool's
lock is held. Intervals are kept by this process's monotonic clock, but every
condition a duty checks (a lease run out, a retry due, a parked invocation
orphaned) is read on the database's clock (``Now()``), so that runners on
hosts with skewed clocks agree.

A duty returns how many invocations it made runnable, so that idle threads
are woken to claim them. A new duty (a schedule's tick, a rate window's
release) joins ``duties_of()``; the schedules' tick is one (``ScheduleTicks``).
"""

import logging
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

from django.db import close_old_connections, connections
from django.db.models.functions import Now

from . import faults, registry, rollup, schedules
from .claim import promote_due_retries, releases, wake_orphans
from .conf import conf
from .current import Run
from .exceptions import TaskNotFound
from .execute import give_back_unheld
from .models import Event, Invocation, Runner
from .recovery import recover_lost_runners
from .spec import TaskSpec
from .status import OWNED
from .store import store
from .transitions import record

logger = logging.getLogger(__name__)


class DutyHost(Protocol):
    """What the duties need of the runner that runs them (``keyjobs.worker.Worker``), and nothing more."""

    @property
    def runner(self) -> Runner | None:
        """The runner's row; set before the duties first run."""

    @property
    def using(self) -> str:
        """The database alias of the runner's invocations."""

    @property
    def lease(self) -> float:
        """Seconds without a heartbeat after which a runner is declared lost."""

    @property
    def poll_interval(self) -> float:
        """Seconds between an idle runner's looks for work."""

    @property
    def supervisor(self) -> int | None:
        """The runner id of the supervisor that can kill this process (``runworker --processes``), if any."""

    @property
    def running(self) -> Mapping[int, Run]:
        """The run in progress on each runner thread, by thread number."""

    @property
    def lost(self) -> bool:
        """Whether another runner declared this one lost (its work was recovered)."""

    def renewed(self, at: float) -> None:
        """Note that the lease was renewed at ``at``, by this process's monotonic clock."""

    def declared_lost(self) -> None:
        """Stop: another runner declared this one lost and recovered its work."""

    def holding(self) -> AbstractContextManager[set[int]]:
        """While the block runs, no thread takes back work it did not hear of; yield what the threads hold."""


@dataclass
class Duty:
    """One timed duty: ``run(host)`` every ``interval()`` seconds; it returns how many invocations it made runnable."""

    name: str
    interval: Callable[[DutyHost], float]
    run: Callable[[DutyHost], int]
    #: When it last ran, by this process's monotonic clock.
    last: float = field(default=float("-inf"))


def heartbeat(host: DutyHost) -> int:
    """Renew the runner's lease; a runner another one declared lost stops (its work was recovered)."""
    assert host.runner is not None
    # Once a heartbeat, not on every tick: with CONN_MAX_AGE = 0 (Django's default) it reconnects.
    close_old_connections()
    # The lease runs from before the UPDATE was sent: its stamp may have landed any time after that.
    asked = time.monotonic()
    renewed = (
        Runner.objects.using(host.using)
        .filter(pk=host.runner.pk, stopped_at__isnull=True)
        .update(heartbeat_at=Now())
    )
    if not renewed:
        logger.error("%s was declared lost by another runner, which recovered its work; "
                     "stopping (outcomes of runs still in progress will be discarded)", host.runner,
                     extra={"runner_id": host.runner.pk})
        host.declared_lost()
        return 0
    host.renewed(asked)
    return 0


def recover(host: DutyHost) -> int:
    """Recover the work of runners whose lease ran out (``keyjobs.recovery``)."""
    return len(recover_lost_runners(using=host.using, lease=host.lease, by=host.runner))


def wake_orphaned(host: DutyHost) -> int:
    """Wake parked invocations whose key nobody holds or waits to take (their waker died)."""
    return len(wake_orphans(using=host.using, runner=host.runner))


def promote_retries(host: DutyHost) -> int:
    """Register again the retries whose delay is over."""
    return len(promote_due_retries(using=host.using, runner=host.runner))


class FlagOverdue:
    """The duty that records an OVERDUE event, once, for each run of this runner past its task's time limit."""

    def __init__(self) -> None:
        #: The runs flagged already, among those still running.
        self.flagged: set[Run] = set()

    def run(self, host: DutyHost) -> int:
        running = dict(host.running)
        self.flagged &= set(running.values())
        for number, run in running.items():
            task = _spec(run.invocation.task_name)
            limit = None if task is None else task.timeout
            if task is None or limit is None or run.clock.worked() <= limit or run in self.flagged:
                continue
            self.flagged.add(run)
            note = (f"past its time limit of {limit:g}s; a thread cannot be stopped from outside, "
                    "so its key stays held until the run returns, and it then ends FAILED")
            if task.kill_on_timeout:
                note = (f"past its time limit of {limit:g}s; its supervisor kills this process" if host.supervisor
                        else f"past its time limit of {limit:g}s and kill_on_timeout, but NOT killed: only a runner "
                        "started with runworker --processes has a supervisor to kill it; its key stays held until "
                        "the run returns, and it then ends FAILED")
            logger.warning("invocation #%s on thread %d is %s", run.invocation.pk, number, note,
                           extra=run.invocation.log_extra())
            record(run.invocation, Event.Kind.OVERDUE, using=host.using, runner=host.runner, note=note)
        return 0


def _spec(task_name: str) -> TaskSpec | None:
    try:
        return registry.get(task_name)
    except TaskNotFound:
        return None


class GiveBackUnheld:
    """The in-doubt sweep: give back what this runner owns and none of its threads holds, once that has lasted.

    A claim, a start, a hand-off or a record-and-claim whose reply was lost
    committed all the same; its thread takes back what it took as soon as it
    tries again (``claim.adopt``). This is the net under that: an invocation
    seen owned by this runner and held by no thread of it, on two looks at
    least a lease apart (by this process's clock), goes back to the queue
    (``execute.give_back_unheld``), so that no key stays held by a runner that
    is alive but will never run it. A lease: as long as recovery would leave
    a silent runner's work, and far longer than a claim's reply takes.
    """

    def __init__(self) -> None:
        #: Each invocation seen unheld, and when it was first seen so (this process's monotonic clock).
        self.unheld: dict[int, float] = {}

    def run(self, host: DutyHost) -> int:
        assert host.runner is not None
        owned = dict(Invocation.objects.using(host.using).filter(status__in=OWNED, runner=host.runner)
                     .values_list("pk", "status"))
        now = time.monotonic()
        with host.holding() as held:  # read after the rows: what a thread held when they were read, it holds now
            self.unheld = {pk: self.unheld.get(pk, now) for pk in owned if pk not in held}
            due = {pk: owned[pk] for pk, since in self.unheld.items() if now - since >= host.lease}
            given = give_back_unheld(due, host.runner, using=host.using) if due else []
        for pk in due:
            del self.unheld[pk]
        return len(given)


def release_deferred(host: DutyHost) -> int:
    """Wake the pool when work this process deferred (its key's rate window was full) becomes due."""
    return releases.take_due()


def until_release(host: DutyHost) -> float:
    """Until the next deferred work is due; else as often as an idle runner looks for work anyway."""
    due = releases.next_in()
    return host.poll_interval if due is None else due


class ScheduleTicks:
    """The scheduling duty: enqueue each tick of the schedules (``keyjobs.schedules``), and start it on time.

    Its interval follows the schedules. A little before a tick
    (``LEAD``) it enqueues the tick's invocation, due at the tick
    (``run_after``); at the tick itself it only wakes the pool, so that an
    idle thread claims the invocation at once, and then tells the other
    runners (NOTIFY). Every runner runs it; the row locks and the unique tick
    constraint make each tick run once. It looks at least once a heartbeat
    interval, so that a schedule added or edited in the admin is seen soon.
    """

    #: How long before its tick an invocation is enqueued, in seconds: a pause within this of a tick
    #: no longer stops that tick.
    LEAD = 0.2
    #: How long after its tick the pool is woken: the time the runner's clock may be early by.
    MARGIN = 0.001
    #: A second, local wake-up after the tick, in case the first came too early for the database.
    AGAIN = 0.005
    #: How soon to look again when the due schedules are all being run by other runners.
    HELD_ELSEWHERE = 0.05

    def __init__(self) -> None:
        self.synced = False
        #: When it next runs, and when it began its last run, by this process's monotonic clock.
        self.next_at = 0.0
        self.began = 0.0
        #: (when, by this process's monotonic clock; queue; whether to tell the other runners): wake-ups for
        #: invocations enqueued ahead of their tick.
        self.starts: list[tuple[float, str, bool]] = []
        #: The queues whose tick came: their runners elsewhere are told on the next run, at once.
        self.to_notify: set[str] = set()

    def interval(self, host: DutyHost) -> float:
        return self.next_at - self.began

    def run(self, host: DutyHost) -> int:
        self.began = now = time.monotonic()
        due = [(queue, tell) for start, queue, tell in self.starts if start <= now]
        if due:
            # A tick's time: wake this runner's idle threads first, then (the next run, at once) the others.
            self.starts = [start for start in self.starts if start[0] > now]
            self.to_notify.update(queue for queue, tell in due if tell)
            self.next_at = now
            return len(due)
        for queue in sorted(self.to_notify):
            store(host.using).notify(queue)
        self.to_notify.clear()
        if not self.synced:
            schedules.sync_declared(using=host.using)
            self.synced = True
        self.next_at = now + conf.HEARTBEAT_INTERVAL  # if the tick fails: try again a heartbeat later
        ticked = schedules.tick(using=host.using, lead=self.LEAD)
        looked = time.monotonic()
        for due_at, queue in ticked.ahead:
            self.starts += [(due_at + self.MARGIN, queue, True), (due_at + self.AGAIN, queue, False)]
        if ticked.wait is None:
            wait = conf.HEARTBEAT_INTERVAL
        elif ticked.wait <= self.LEAD:
            wait = self.HELD_ELSEWHERE
        else:
            wait = min(ticked.wait - self.LEAD, conf.HEARTBEAT_INTERVAL)
        self.next_at = min([looked + wait, *(start for start, _, _ in self.starts)])
        return ticked.enqueued


class RollUp:
    """The statistics duty: add what the history gained to the rollup per task and key per minute (``keyjobs.rollup``),
    and sample each task's queue depth every ``rollup.DEPTH_EVERY`` seconds. Every runner runs it; one at a time
    does the work (the others find its marks locked and skip)."""

    def __init__(self) -> None:
        self.sampled = float("-inf")
        self.pruned = float("-inf")

    def run(self, host: DutyHost) -> int:
        rollup.roll_up(using=host.using)
        if time.monotonic() - self.sampled >= rollup.DEPTH_EVERY:
            self.sampled = time.monotonic()
            rollup.sample_depth(using=host.using)
        # A batch of the minutes past their keeping, now and then: the rollup grows by a row per key and minute.
        if time.monotonic() - self.pruned >= rollup.PRUNE_EVERY:
            self.pruned = time.monotonic()
            rollup.prune(using=host.using)
        return 0


def every_heartbeat(host: DutyHost) -> float:
    return conf.HEARTBEAT_INTERVAL


def every_poll(host: DutyHost) -> float:
    return host.poll_interval


def duties_of(host: DutyHost) -> list[Duty]:
    """Return a runner's duties, in the order they run when several are due at once."""
    return [
        Duty("heartbeat", every_heartbeat, heartbeat),
        Duty("recover lost runners", every_heartbeat, recover),
        Duty("wake orphaned parked invocations", every_heartbeat, wake_orphaned),
        Duty("give back what no thread holds", every_heartbeat, GiveBackUnheld().run),
        # As often as an idle runner looks for work: a retry is work like any other.
        Duty("promote due retries", every_poll, promote_retries),
        Duty("flag overdue runs", every_heartbeat, FlagOverdue().run),
        # The moment a full rate window has room again (``Duties.wait`` wakes when a deferral is noted).
        Duty("release deferred work", until_release, release_deferred),
        # Off the hot path: an outcome adds nothing to the statistics; this reads the history later.
        Duty("roll up statistics", every_heartbeat, RollUp().run),
        # Last: at a tick's time nothing else is due, and the tick goes first anyway.
        Duty("enqueue due schedule ticks", (ticks := ScheduleTicks()).interval, ticks.run),
    ]


class Duties:
    """A runner's duties, and when each last ran."""

    def __init__(self, host: DutyHost) -> None:
        self.host = host
        self.duties = duties_of(host)

    def wait(self) -> None:
        """Sleep until the next duty is due, or until this process defers work (a duty's interval shortens)."""
        releases.wait(self.tick())

    def tick(self) -> float:
        """Return how long the duty thread may sleep before the next duty is due."""
        now = time.monotonic()
        return max(0.0, min(duty.last + duty.interval(self.host) - now for duty in self.duties))

    def run_due(self) -> int:
        """Run every duty that is due; return how many invocations they made runnable.

        A duty that fails on a transient database error is logged and runs
        again at its next interval; the others still run.
        """
        made_runnable = 0
        for duty in self.duties:
            now = time.monotonic()
            if now - duty.last < duty.interval(self.host):
                continue
            duty.last = now
            try:
                made_runnable += duty.run(self.host)
            except Exception as exc:
                if not faults.is_transient(exc):
                    logger.exception("the duty %r failed; it runs again in %.1fs", duty.name,
                                     duty.interval(self.host))
                else:
                    logger.warning("the duty %r could not reach the database (%s); retrying", duty.name, exc)
                connections[self.host.using].close()  # whatever state the error left it in
            if self.host.lost:
                break
        return made_runnable
