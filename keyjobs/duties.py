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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from django.db import close_old_connections
from django.db.models.functions import Now

from . import faults, registry, schedules
from .claim import promote_due_retries, releases, wake_orphans
from .conf import conf
from .exceptions import TaskNotFound
from .models import Event, Runner
from .recovery import recover_lost_runners
from .store import store
from .transitions import record

if TYPE_CHECKING:
    from .worker import Worker

logger = logging.getLogger("keyjobs.worker")


@dataclass
class Duty:
    """One timed duty: ``run(worker)`` every ``interval()`` seconds; it returns how many invocations it made runnable."""

    name: str
    interval: Callable[["Worker"], float]
    run: Callable[["Worker"], int]
    #: When it last ran, by this process's monotonic clock.
    last: float = field(default=float("-inf"))


def heartbeat(worker: "Worker") -> int:
    """Renew the runner's lease; a runner another one declared lost stops (its work was recovered)."""
    assert worker.runner is not None
    # Once a heartbeat, not on every tick: with CONN_MAX_AGE = 0 (Django's default) it reconnects.
    close_old_connections()
    renewed = (
        Runner.objects.using(worker.using)
        .filter(pk=worker.runner.pk, stopped_at__isnull=True)
        .update(heartbeat_at=Now())
    )
    if not renewed:
        logger.error("keyjobs: %s was declared lost by another runner, which recovered its work; "
                     "stopping (outcomes of runs still in progress will be discarded)", worker.runner)
        worker.lost = True
        worker.stop()
        return 0
    worker.renewed()
    return 0


def recover(worker: "Worker") -> int:
    """Recover the work of runners whose lease ran out (``keyjobs.recovery``)."""
    return len(recover_lost_runners(using=worker.using, lease=worker.lease, by=worker.runner))


def wake_orphaned(worker: "Worker") -> int:
    """Wake parked invocations whose key nobody holds or waits to take (their waker died)."""
    return len(wake_orphans(using=worker.using, runner=worker.runner))


def promote_retries(worker: "Worker") -> int:
    """Register again the retries whose delay is over."""
    return len(promote_due_retries(using=worker.using, runner=worker.runner))


def flag_overdue(worker: "Worker") -> int:
    """Record an OVERDUE event, once, for each run of this runner past its task's time limit."""
    for number, run in list(worker.running.items()):
        if run.limit is None or time.monotonic() - run.began <= run.limit or run.flagged:
            continue
        run.flagged = True
        note = (f"past its time limit of {run.limit:g}s; a thread cannot be stopped from outside, "
                "so its key stays held until the run returns, and it then ends FAILED")
        if _kills_on_timeout(run.invocation.task_name):
            note = (f"past its time limit of {run.limit:g}s; its supervisor kills this process" if worker.supervisor
                    else f"past its time limit of {run.limit:g}s and kill_on_timeout, but NOT killed: only a runner "
                    "started with runworker --processes has a supervisor to kill it; its key stays held until the "
                    "run returns, and it then ends FAILED")
        logger.warning("keyjobs: invocation #%s on thread %d is %s", run.invocation.pk, number, note)
        record(run.invocation, Event.Kind.OVERDUE, using=worker.using, runner=worker.runner, note=note)
    return 0


def _kills_on_timeout(task_name: str) -> bool:
    try:
        return registry.get(task_name).kill_on_timeout
    except TaskNotFound:
        return False


def release_deferred(worker: "Worker") -> int:
    """Wake the pool when work this process deferred (its key's rate window was full) becomes due."""
    return releases.take_due()


def until_release(worker: "Worker") -> float:
    """Until the next deferred work is due; else as often as an idle runner looks for work anyway."""
    due = releases.next_in()
    return worker.poll_interval if due is None else due


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

    def interval(self, worker: "Worker") -> float:
        return self.next_at - self.began

    def run(self, worker: "Worker") -> int:
        self.began = now = time.monotonic()
        due = [(queue, tell) for start, queue, tell in self.starts if start <= now]
        if due:
            # A tick's time: wake this runner's idle threads first, then (the next run, at once) the others.
            self.starts = [start for start in self.starts if start[0] > now]
            self.to_notify.update(queue for queue, tell in due if tell)
            self.next_at = now
            return len(due)
        for queue in sorted(self.to_notify):
            store(worker.using).notify(queue)
        self.to_notify.clear()
        if not self.synced:
            schedules.sync_declared(using=worker.using)
            self.synced = True
        self.next_at = now + conf.HEARTBEAT_INTERVAL  # if the tick fails: try again a heartbeat later
        ticked = schedules.tick(using=worker.using, lead=self.LEAD)
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


def every_heartbeat(worker: "Worker") -> float:
    return conf.HEARTBEAT_INTERVAL


def every_poll(worker: "Worker") -> float:
    return worker.poll_interval


def duties_of(worker: "Worker") -> list[Duty]:
    """Return a runner's duties, in the order they run when several are due at once."""
    return [
        Duty("heartbeat", every_heartbeat, heartbeat),
        Duty("recover lost runners", every_heartbeat, recover),
        Duty("wake orphaned parked invocations", every_heartbeat, wake_orphaned),
        # As often as an idle runner looks for work: a retry is work like any other.
        Duty("promote due retries", every_poll, promote_retries),
        Duty("flag overdue runs", every_heartbeat, flag_overdue),
        # The moment a full rate window has room again (``Duties.wait`` wakes when a deferral is noted).
        Duty("release deferred work", until_release, release_deferred),
        # Last: at a tick's time nothing else is due, and the tick goes first anyway.
        Duty("enqueue due schedule ticks", (ticks := ScheduleTicks()).interval, ticks.run),
    ]


class Duties:
    """A runner's duties, and when each last ran."""

    def __init__(self, worker: "Worker") -> None:
        self.worker = worker
        self.duties = duties_of(worker)

    def wait(self) -> None:
        """Sleep until the next duty is due, or until this process defers work (a duty's interval shortens)."""
        releases.wait(self.tick())

    def tick(self) -> float:
        """Return how long the duty thread may sleep before the next duty is due."""
        now = time.monotonic()
        return max(0.0, min(duty.last + duty.interval(self.worker) - now for duty in self.duties))

    def run_due(self) -> int:
        """Run every duty that is due; return how many invocations they made runnable.

        A duty that fails on a transient database error is logged and runs
        again at its next interval; the others still run.
        """
        made_runnable = 0
        for duty in self.duties:
            now = time.monotonic()
            if now - duty.last < duty.interval(self.worker):
                continue
            duty.last = now
            try:
                made_runnable += duty.run(self.worker)
            except Exception as exc:
                if not faults.is_transient(exc):
                    logger.exception("keyjobs: the duty %r failed; it runs again in %.1fs", duty.name,
                                     duty.interval(self.worker))
                else:
                    logger.warning("keyjobs: the duty %r could not reach the database (%s); retrying", duty.name, exc)
                self.worker.close_connection()
            if self.worker.lost:
                break
        return made_runnable
