"""Changing invocations by hand (the admin's actions, ``Invocation.cancel()``), through the same checked transitions as the worker.

And pausing and resuming schedules, the admin's and the Schedules page's.
"""

from datetime import datetime

from django.db import transaction
from django.db.models import QuerySet

from .claim import wake_next
from .conf import conf
from .models import Event, Invocation, Schedule
from .schedules import plan
from .status import OWNED, WAITING, Status
from .store import store
from .transitions import move

#: What retry() accepts: ended without success.
RETRYABLE = frozenset({Status.FAILED, Status.CONCURRENCY_CONTROLLED_FINAL, Status.CANCELLED})
#: What cancel() ends at once: not started yet (waiting, parked, deferred, or waiting for a retry).
CANCELLABLE = WAITING
#: What cancel() asks to stop: owned by a runner. The task reads ``keyjobs.current().cancel_requested``.
STOPPABLE = OWNED


def retry(invocations: list[Invocation], *, by: str = "", using: str | None = None) -> list[int]:
    """Register FAILED, dropped or cancelled invocations again; return the ids that moved (others are left alone)."""
    using = using or conf.DATABASE
    note = f"retried by {by}" if by else "retried by hand"
    return move([inv.pk for inv in invocations], Status.REGISTERED, using=using, only_from=RETRYABLE, note=note,
                values={"error": "", "traceback": "", "finished_at": None, "run_after": None,
                        "cancel_requested": False})


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
    with transaction.atomic(using=using):
        moved = move(ids, Status.CANCELLED, using=using, only_from=CANCELLABLE, note=reason,
                     values={"error": reason.capitalize()})
        # A cancelled head of a key may have had work parked behind it.
        for task_name, running_key in (
            Invocation.objects.using(using).filter(pk__in=moved, running_key__isnull=False)
            .values_list("task_name", "running_key").distinct()
        ):
            wake_next(task_name, running_key, using=using)
        running = list(
            Invocation.objects.using(using).filter(pk__in=ids, status__in=STOPPABLE, cancel_requested=False)
            .locked().values_list("pk", "status", "runner_id", "runner_thread")
        )
        Invocation.objects.using(using).filter(pk__in=[row[0] for row in running]).update(cancel_requested=True)
        store(using).insert_events([
            (pk, Event.Kind.CANCEL_REQUESTED, status, status, runner_id, thread, f"{reason}: asked to stop")
            for pk, status, runner_id, thread in running
        ])
    return [*moved, *(row[0] for row in running)]


def pause_schedules(schedules: QuerySet[Schedule]) -> int:
    """Pause schedules: no tick of theirs is enqueued from the next one on. Return how many were running."""
    return schedules.filter(enabled=True).update(enabled=False)


def resume_schedules(schedules: QuerySet[Schedule], now: datetime) -> int:
    """Resume paused schedules from their first tick after ``now`` (the ticks missed while paused do not run)."""
    resumed = 0
    for schedule in schedules.filter(enabled=False):
        schedule.enabled = True
        plan(schedule, now)
        schedule.save(update_fields=["enabled", "next_run", "problem"])
        resumed += 1
    return resumed
