"""Schedules: turning each due tick of a ``Schedule`` into exactly one invocation, with any number of runners.

Every runner runs the tick (``tick()``, a timed duty of ``keyjobs.duties``);
there is no leader and no lock that outlives a transaction. A runner takes
the due schedules with row locks that the others skip (``SKIP LOCKED``;
SQLite's write lock serializes the runners instead), enqueues each tick's
invocation through ``enqueue`` and advances its ``next_run``, all in one
transaction. The partial unique constraint ``keyjobs_one_run_per_tick`` on
(``cause_schedule``, ``cause_tick``) is the final arbiter. A runner killed
in the middle holds nothing: its transaction dies with its connection, and
the next runner to look takes the tick. Every time compared is the
database's ``NOW()``.

Missed ticks, those due while no runner ran, make one run, for the latest of
them (``catch_up``, the default); a schedule with ``catch_up`` off skips a
tick found more than ``KEYJOBS_SCHEDULE_GRACE`` seconds late. Either way the
next tick is the first one after now.

A schedule whose row cannot run (a task no runner can find, arguments its
function does not take, a rule cronsim refuses) is set aside with the reason
in ``problem`` and ``next_run`` emptied, logged, and never blocks the others;
saving it in the admin plans it again.
"""

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import IntegrityError, connections, transaction
from django.db.models.functions import Now

from . import registry
from .conf import conf
from .enqueue import build, enqueue, enqueue_built
from .exceptions import KeyjobsError
from .models import Invocation, Schedule
from .spec import Cause, Options, TaskSpec
from .store import store
from .timers import Timer, TimerError

logger = logging.getLogger(__name__)

#: Due schedules one transaction takes at most.
BATCH = 100
#: Transactions of due schedules one tick runs at most before letting the other duties run.
ROUNDS = 50


@dataclass(frozen=True)
class Ticked:
    """What a tick did."""

    #: Invocations it enqueued (or merged into a waiting one, under registration concurrency).
    enqueued: int
    #: Seconds until the next enabled schedule is due by the database's clock (0 or less: due now, held by
    #: another runner); None if no schedule is enabled.
    wait: float | None
    #: (when it is due by this process's monotonic clock, its queue) of each invocation it enqueued ahead
    #: of its tick. Early, if at all, by the time a statement takes to reach the database.
    ahead: tuple[tuple[float, str], ...] = ()


def tick(*, using: str, lead: float = 0.0) -> Ticked:
    """Enqueue the invocation of every tick due within ``lead`` seconds; return what it did and the next wait.

    An invocation enqueued ahead of its tick waits for it (``run_after``),
    so that a runner can start it at the tick's very time. With nothing due
    it is one indexed query, whatever the number of schedules and
    invocations.
    """
    enqueued = 0
    ahead: list[tuple[float, str]] = []
    wait = seconds_to_next(using)
    for _ in range(ROUNDS):
        if wait is None or wait > lead:
            break
        taken, made = _run_due(using, lead, ahead)
        enqueued += made
        wait = seconds_to_next(using)
        if not taken:
            break  # every due schedule is another runner's at the moment
    return Ticked(enqueued, wait, tuple(ahead))


def seconds_to_next(using: str) -> float | None:
    """Return the seconds until the next enabled schedule is due, on the database's clock; None if there is none."""
    row = (
        Schedule.objects.using(using)
        .filter(enabled=True, next_run__isnull=False)
        .annotate(now=Now())
        .order_by("next_run")
        .values_list("next_run", "now")
        .first()
    )
    if row is None:
        return None
    next_run, now = row
    assert next_run is not None and now is not None
    return (next_run - now).total_seconds()


def _run_due(using: str, lead: float, ahead: list[tuple[float, str]]) -> tuple[int, int]:
    """Take up to ``BATCH`` due schedules no other runner holds and run their ticks; return (taken, enqueued)."""
    skip_locked = connections[using].features.has_select_for_update_skip_locked
    with store(using).writing(), transaction.atomic(using=using):
        # The database reads its clock (the transaction's start) after this: ``now`` is no earlier than it.
        looked = time.monotonic()
        due = list(
            Schedule.objects.using(using)
            .filter(enabled=True, next_run__lte=Now() + timedelta(seconds=lead))
            .annotate(now=Now())
            .order_by("next_run")
            .select_for_update(skip_locked=skip_locked, of=("self",))[:BATCH]
        )
        ticks = [tick for schedule in due if (tick := _prepare(schedule, schedule.now)) is not None]  # type: ignore[attr-defined]
        try:
            with transaction.atomic(using=using):  # a savepoint: one tick refused, the others go one by one
                made: list[Invocation | None] = list(enqueue_built([(tick.built, tick.spec) for tick in ticks]))
        except (IntegrityError, KeyjobsError):
            made = [_enqueue_alone(tick) for tick in ticks]
        for tick, invocation in zip(ticks, made, strict=True):
            if invocation is None:
                continue
            tick.schedule.last_run, tick.schedule.last_invocation = tick.at, invocation
            if tick.early:
                ahead.append((looked + (tick.at - tick.now).total_seconds(), invocation.queue))
        _move_on(due, using)
    return len(due), sum(invocation is not None for invocation in made)


#: What a tick writes on its schedule.
_MOVED = ("next_run", "last_run", "last_invocation", "problem")


def _move_on(schedules: list[Schedule], using: str) -> None:
    """Write each taken schedule's next run, last run and invocation, and problem: one statement for the batch.

    One UPDATE executed for every row (a pipeline on PostgreSQL), each value
    prepared by its field as ``save()`` prepares it: ``bulk_update()``'s
    CASE per row costs far more to compile than the statement to run.
    """
    if not schedules:
        return
    connection = connections[using]
    quote = connection.ops.quote_name
    fields = [field for field in Schedule._meta.concrete_fields if field.name in _MOVED]
    sql = (f"UPDATE {quote(Schedule._meta.db_table)} SET "
           f"{', '.join(f'{quote(field.column or field.name)} = %s' for field in fields)} WHERE {quote('id')} = %s")
    rows = [[field.get_db_prep_save(getattr(schedule, field.attname), connection) for field in fields] + [schedule.pk]
            for schedule in schedules]
    with connection.cursor() as cursor:
        cursor.executemany(sql, rows)


@dataclass
class _Tick:
    """A tick about to be enqueued: its schedule, its time, and its call, built and checked."""

    schedule: Schedule
    at: datetime
    now: datetime
    early: bool
    spec: "TaskSpec"
    options: Options
    built: Invocation


def _prepare(schedule: Schedule, now: datetime) -> _Tick | None:
    """Set a locked schedule's next run (saved by the caller) and return its tick's call, if the tick runs."""
    assert schedule.next_run is not None
    early = schedule.next_run > now
    try:
        timer = Timer(cron=schedule.cron, interval=schedule.interval)
        spec = registry.get(schedule.task_name)
        if not isinstance(schedule.kwargs, dict):
            raise KeyjobsError(f"its arguments are a JSON {type(schedule.kwargs).__name__}, not an object")
        tick_at = schedule.next_run if early else timer.last_at_or_before(now, since=schedule.next_run)
        following = timer.next_after(max(now, tick_at), anchor=tick_at)
    except (TimerError, KeyjobsError, ValueError, OverflowError) as exc:
        _set_aside(schedule, str(exc))
        return None
    schedule.next_run = following
    if schedule.last_run is not None and tick_at <= schedule.last_run:
        return None  # already ran (its next run was set back by hand)
    if not schedule.catch_up and now - tick_at > timedelta(seconds=conf.SCHEDULE_GRACE):
        logger.info("schedule %r skipped the tick of %s, missed while no runner ran", schedule.name,
                    tick_at.isoformat(), extra={"schedule": schedule.name, "task": schedule.task_name})
        return None
    options = Options(spec, run_after=tick_at if early else None, cause=Cause(schedule_id=schedule.pk, tick=tick_at))
    try:
        built = build(options, (), dict(schedule.kwargs))
    except KeyjobsError as exc:  # the arguments do not fit the function, or cannot be stored
        _set_aside(schedule, str(exc))
        return None
    return _Tick(schedule, tick_at, now, early, spec, options, built)


def _enqueue_alone(tick: _Tick) -> "Invocation | None":
    """Enqueue one tick by itself (``enqueue`` takes a savepoint of its own); None if it is refused."""
    try:
        return enqueue(tick.options, (), dict(tick.schedule.kwargs))
    except IntegrityError:
        return None  # the tick has its invocation already (the constraint said so): only move on
    except KeyjobsError as exc:
        _set_aside(tick.schedule, str(exc))
        return None


def _set_aside(schedule: Schedule, reason: str) -> None:
    logger.error("schedule %r cannot run and is set aside until it is saved again: %s", schedule.name, reason,
                 extra={"schedule": schedule.name, "task": schedule.task_name})
    schedule.next_run, schedule.problem = None, reason[:2000]


def plan(schedule: Schedule, now: datetime) -> None:
    """Set a schedule's next run from its rule, the first tick after ``now`` (on a save, a resume, a sync)."""
    schedule.problem = ""
    try:
        schedule.next_run = Timer(cron=schedule.cron, interval=schedule.interval).next_after(now)
    except TimerError as exc:
        schedule.next_run, schedule.problem = None, str(exc)


def sync_declared(*, using: str) -> None:
    """Create or update the rows of the schedules declared in code (``@task(schedule=...)``) that this process knows.

    The admin's pause is kept. A declared schedule whose task this process
    knows but no longer declares a schedule is deleted. Runners of the same
    code write the same rows: a race lost at the unique name is harmless.
    """
    declared = {name: spec for name, spec in registry.all_tasks().items() if spec.schedule is not None}
    rows = Schedule.objects.using(using)
    gone = [name for name in registry.all_tasks() if name not in declared]
    if gone:
        rows.filter(origin=Schedule.Origin.CODE, name__in=gone).delete()
    existing = {row.name: row for row in rows.filter(name__in=list(declared))}
    now = None
    for name, spec in declared.items():
        assert spec.schedule is not None
        wanted = {"task_name": name, "kwargs": dict(spec.schedule_kwargs), "cron": spec.schedule.cron,
                  "interval": spec.schedule.interval, "catch_up": spec.schedule_catch_up}
        row = existing.get(name)
        if row is not None and row.origin != Schedule.Origin.CODE:
            logger.warning("the schedule declared on %s is not synced: a schedule of the admin has its name",
                           name)
            continue
        if row is not None and not row.problem and all(getattr(row, field) == value for field, value in wanted.items()):
            continue
        if now is None:
            now = store(using).clock()
        row = row or Schedule(name=name, origin=Schedule.Origin.CODE)
        for field, value in wanted.items():
            setattr(row, field, value)
        plan(row, now)
        try:
            with transaction.atomic(using=using):
                row.save(using=using)
        except IntegrityError:
            pass  # another runner created it at the same moment
