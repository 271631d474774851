"""Changing invocations by hand (the admin's actions, ``Invocation.cancel()``), through the same checked transitions as the worker.

And pausing and resuming schedules, the admin's and the Schedules page's;
and an operator's hold on a key (``KeyControl``): pause and resume it,
override its running limit or rate until a time, cancel what waits for it.
What a control means to the work is admission's (``admission.Control``);
here it is written, with a history row naming who did it (``KeyAction``).
Each is safe to repeat (a reply lost after its commit): asked again, a key
already as asked is left alone and no second history row is written.
"""

from datetime import datetime

from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from django.utils import timezone

from .admission import MAX_LIMIT, Rate, is_limit
from .claim import wake_next
from .conf import conf
from .exceptions import ArgumentError
from .models import Event, Invocation, KeyAction, KeyControl, Schedule, Step
from .schedules import plan
from .status import OWNED, WAITING, Status, change, mark
from .store import LockedRow, store
from .transitions import apply, apply_locked, move

#: What retry() accepts: ended without success.
RETRYABLE = frozenset({Status.FAILED, Status.CONCURRENCY_CONTROLLED_FINAL, Status.CANCELLED})
#: What cancel() ends at once: not started yet (waiting, parked, deferred, or waiting for a retry).
CANCELLABLE = WAITING
#: What cancel() asks to stop: owned by a runner. The task reads ``keyjobs.current().cancel_requested``.
STOPPABLE = OWNED


class Retried(list[int]):
    """The ids ``retry()`` registered again; and, in ``duplicates``, those it left alone because a call of their
    registration key is already waiting (``keyjobs_one_waiting_per_registration_key``)."""

    def __init__(self, moved: list[int], duplicates: list[int]) -> None:
        super().__init__(moved)
        self.duplicates = duplicates


def retry(invocations: list[Invocation], *, by: str = "", using: str | None = None) -> Retried:
    """Register FAILED, dropped or cancelled invocations again; return the ids that moved (others are left alone).

    One whose registration key has a call waiting already stays as it is
    (``Retried.duplicates``): the waiting call is the one that will run.
    """
    using = using or conf.DATABASE
    made = change(Status.REGISTERED, again=True, note=f"retried by {by}" if by else "retried by hand")
    ids = [inv.pk for inv in invocations]
    try:
        with transaction.atomic(using=using):  # a savepoint: a refused retry leaves the caller's transaction usable
            return Retried(apply(ids, made, using=using, only_from=RETRYABLE), [])
    except IntegrityError:
        pass
    # One of them has a call of its registration key waiting: one at a time, so that the others go on.
    moved, duplicates = [], []
    for pk in ids:
        try:
            with transaction.atomic(using=using):
                moved += apply([pk], made, using=using, only_from=RETRYABLE)
        except IntegrityError:
            duplicates.append(pk)
    return Retried(moved, duplicates)


def restart(workflow: Invocation, position: int, *, by: str = "", using: str | None = None) -> Retried:
    """Retry a failed or cancelled workflow from its step ``position``: the records from there on are forgotten.

    Its run replays the steps before ``position`` and runs the others anew
    (children included: new ones are created). Nothing moves, and nothing is
    forgotten, if it is not in a status ``retry()`` accepts.
    """
    using = using or conf.DATABASE
    note = f"restarted from step {position} by {by}" if by else f"restarted from step {position} by hand"
    made = change(Status.REGISTERED, again=True, note=note)
    try:
        with transaction.atomic(using=using):
            rows = store(using).lock_rows([workflow.pk])
            moved = apply_locked(rows, made, using=using, only_from=RETRYABLE)
            if moved:
                Step.objects.using(using).filter(workflow_id=workflow.pk, position__gte=position).delete()
            return Retried(moved, [])
    except IntegrityError:
        return Retried([], [workflow.pk])


def cancel(invocations: list[Invocation], *, by: str = "", using: str | None = None) -> list[int]:
    """End waiting invocations CANCELLED and ask running ones to stop; return the ids of both (others are left alone).

    A cancelled invocation that held its key's place wakes the key's next
    invocation. A running one keeps its key until its run ends: CANCELLED if
    it stops for the request (an ``async def`` task is stopped outright; a
    plain one raises ``keyjobs.Cancelled``), else as the run ends.
    """
    using = using or conf.DATABASE
    reason = f"cancelled by {by}" if by else "cancelled by hand"
    ids = [inv.pk for inv in invocations]
    invocations_ = Invocation.objects.using(using)
    with transaction.atomic(using=using):
        moved = move(ids, Status.CANCELLED, using=using, only_from=CANCELLABLE, note=reason,
                     values={"error": reason.capitalize()})
        # A suspended workflow (PAUSED, no runner's: keyjobs.workflows) has no run to stop: it ends at once.
        moved += move(invocations_.filter(pk__in=ids, status=Status.PAUSED, runner__isnull=True)
                      .values_list("pk", flat=True), Status.CANCELLED, using=using, only_from={Status.PAUSED},
                      note=reason, values={"error": reason.capitalize(), "waiting_on": None, "resume_at": None})
        # A workflow's children that have not started go with it.
        children = Step.objects.using(using).filter(workflow_id__in=ids, kind=Step.Kind.CHILD, child__isnull=False)
        moved += move(invocations_.filter(pk__in=children.values("child_id"), status__in=CANCELLABLE)
                      .values_list("pk", flat=True), Status.CANCELLED, using=using, only_from=CANCELLABLE,
                      note=f"{reason}: its workflow was cancelled", values={"error": reason.capitalize()})
        _wake_freed(moved, using)
        running = list(
            Invocation.objects.using(using).filter(pk__in=ids, status__in=STOPPABLE, cancel_requested=False)
            .locked().values_list("pk", "status", "runner_id", "runner_thread")
        )
        for pk, status, runner_id, thread in running:  # each request recorded with the run it asks to stop
            apply_locked([LockedRow(pk, status, runner_id)],
                         mark(Event.Kind.CANCEL_REQUESTED, {"cancel_requested": True}, runner_id=runner_id,
                              thread=thread, note=f"{reason}: asked to stop"), using=using, only_from=STOPPABLE)
    return [*moved, *(row[0] for row in running)]


def _end_waiting(ids: list[int], reason: str, using: str) -> list[int]:
    """End those of ``ids`` still waiting CANCELLED; wake what their keys had parked behind them. Return their ids."""
    moved = move(ids, Status.CANCELLED, using=using, only_from=CANCELLABLE, note=reason,
                 values={"error": reason.capitalize()})
    _wake_freed(moved, using)
    return moved


def _wake_freed(cancelled: list[int], using: str) -> None:
    """Wake the keys of cancelled invocations: a cancelled head of a key may have had work parked behind it."""
    for task_name, running_key in (
        Invocation.objects.using(using).filter(pk__in=cancelled, running_key__isnull=False)
        .values_list("task_name", "running_key").distinct()
    ):
        wake_next(task_name, running_key, using=using)


def pause_schedules(schedules: QuerySet[Schedule]) -> int:
    """Pause schedules: no tick of theirs is enqueued from the next one on. Return how many were running."""
    return schedules.filter(enabled=True).update(enabled=False)


def resume_schedules(schedules: QuerySet[Schedule]) -> int:
    """Resume paused schedules from their first tick after now, by the database's clock (the ticks missed while
    paused do not run)."""
    resumed = 0
    now = None
    for schedule in schedules.filter(enabled=False):
        schedule.enabled = True
        if now is None:
            now = store(schedules.db).clock()
        plan(schedule, now)
        schedule.save(update_fields=["enabled", "next_run", "problem"])
        resumed += 1
    return resumed


def _control(task_name: str, running_key: str, using: str) -> KeyControl:
    """Return the key's control row, locked (made if it has none: two operators at once meet at its unique constraint)."""
    control, _ = KeyControl.objects.using(using).select_for_update().get_or_create(
        task_name=task_name, running_key=running_key)
    return control


def _acted(control: KeyControl, kind: str, *, by: str, using: str, note: str = "", wake: bool = True) -> None:
    """Keep what an operator changed of ``control`` (locked), and its history row naming them; then wake the key
    into what its control now lets run (not after a pause, which lets nothing more run).

    The control row is deleted once it holds nothing (no pause, no override): a key without one costs nothing.
    """
    control.changed_by, control.changed_at = by, store(using).clock()
    if not control.paused and control.until is None:
        control.delete(using=using)
    else:
        control.save(using=using)
    KeyAction.objects.using(using).create(task_name=control.task_name, running_key=control.running_key, kind=kind,
                                          by=by, note=note)
    if wake:
        wake_next(control.task_name, control.running_key, using=using)


def pause_key(task_name: str, running_key: str, *, by: str, using: str | None = None) -> bool:
    """Pause a key: none of its work starts, and what waits stays waiting, until ``resume_key()``.

    Return False if it was paused already (nothing written).
    """
    using = using or conf.DATABASE
    with transaction.atomic(using=using):
        control = _control(task_name, running_key, using)
        if control.paused:
            return False
        control.paused = True
        _acted(control, KeyAction.Kind.PAUSED, by=by, using=using, wake=False)
    return True


def resume_key(task_name: str, running_key: str, *, by: str, using: str | None = None) -> bool:
    """Resume a paused key: the work that waited is woken into its free slots, in key order.

    Return False if it was not paused (nothing written).
    """
    using = using or conf.DATABASE
    with transaction.atomic(using=using):
        control = KeyControl.objects.using(using).select_for_update().filter(
            task_name=task_name, running_key=running_key, paused=True).first()
        if control is None:
            return False
        control.paused = False
        _acted(control, KeyAction.Kind.RESUMED, by=by, using=using)
    return True


def override_key(
    task_name: str, running_key: str, *, until: datetime, by: str, limit: int | None = None,
    rate: Rate | None = None, using: str | None = None,
) -> bool:
    """Give a key a running limit, a rate, or both, in place of its task's until ``until``; then the declared return.

    Waiting work is woken into the slots a higher limit frees. ArgumentError
    for a limit out of range, nothing to override, or a time already past.
    Return False if the key had that very override already (nothing written).
    """
    using = using or conf.DATABASE
    if limit is None and rate is None:
        raise ArgumentError("an override needs a running limit, a rate, or both")
    if limit is not None and not is_limit(limit):
        raise ArgumentError(f"the running limit must be a whole number from 1 to {MAX_LIMIT}, not {limit!r}")
    if until <= timezone.now():  # bad input is refused before the database is asked
        raise ArgumentError(f"the override must end in the future, not at {until.isoformat()}")
    with transaction.atomic(using=using):
        control = _control(task_name, running_key, using)
        count, window = (rate.count, rate.window) if rate is not None else (None, None)
        if (control.running_limit, control.rate_count, control.rate_window, control.until) == (
                limit, count, window, until):
            return False
        control.running_limit, control.rate_count, control.rate_window, control.until = limit, count, window, until
        what = ", ".join([*([f"running limit {limit}"] if limit is not None else []),
                          *([f"rate {rate}"] if rate is not None else [])])
        _acted(control, KeyAction.Kind.OVERRIDDEN, by=by, using=using,
               note=f"{what} until {until.isoformat(timespec='seconds')}")
    return True


def restore_key(task_name: str, running_key: str, *, by: str, using: str | None = None) -> bool:
    """End a key's override now: its task's declared limit and rate return. False if it had none in force."""
    using = using or conf.DATABASE
    with transaction.atomic(using=using):
        control = KeyControl.objects.using(using).select_for_update().filter(
            task_name=task_name, running_key=running_key, until__isnull=False).first()
        if control is None:
            return False
        control.running_limit = control.rate_count = control.rate_window = control.until = None
        _acted(control, KeyAction.Kind.RESTORED, by=by, using=using)
    return True


def cancel_waiting(task_name: str, running_key: str, *, by: str, using: str | None = None) -> list[int]:
    """Cancel everything waiting for a key (registered, parked, deferred, waiting for a retry); return their ids.

    What runs is left to finish. Asked again, nothing is left to cancel and nothing is written.
    """
    using = using or conf.DATABASE
    with transaction.atomic(using=using):
        waiting = list(Invocation.objects.using(using).filter(
            task_name=task_name, running_key=running_key, status__in=CANCELLABLE).order_by("pk")
            .values_list("pk", flat=True))
        # Only those still waiting when they are locked: one a runner claimed meanwhile runs on.
        cancelled = _end_waiting(waiting, f"cancelled by {by} with all that waited for its key", using)
        if cancelled:
            KeyAction.objects.using(using).create(task_name=task_name, running_key=running_key,
                                                  kind=KeyAction.Kind.CANCELLED, by=by,
                                                  note=f"{len(cancelled)} waiting invocation(s) cancelled")
    return cancelled
