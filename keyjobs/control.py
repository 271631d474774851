"""Changing invocations by hand (the admin's actions), through the same checked transitions as the worker."""

from django.db import transaction

from .claim import wake_next
from .conf import conf
from .models import Invocation
from .status import Status
from .transitions import move

#: What retry() accepts: ended without success.
RETRYABLE = frozenset({Status.FAILED, Status.CONCURRENCY_CONTROLLED_FINAL})
#: What cancel() accepts: not started yet.
CANCELLABLE = frozenset({Status.REGISTERED, Status.REROUTED, Status.RETRY})


def retry(invocations: list[Invocation], *, by: str = "", using: str | None = None) -> list[int]:
    """Register FAILED or dropped invocations again; return the ids that moved (others are left alone)."""
    using = using or conf.DATABASE
    note = f"retried by {by}" if by else "retried by hand"
    return move([inv.pk for inv in invocations], Status.REGISTERED, using=using, only_from=RETRYABLE, note=note,
                values={"error": "", "traceback": "", "finished_at": None, "run_after": None})


def cancel(invocations: list[Invocation], *, by: str = "", using: str | None = None) -> list[int]:
    """End not-yet-started invocations as FAILED ("cancelled"); return the ids that moved."""
    using = using or conf.DATABASE
    reason = f"cancelled by {by}" if by else "cancelled by hand"
    with transaction.atomic(using=using):
        moved = move([inv.pk for inv in invocations], Status.FAILED, using=using, only_from=CANCELLABLE,
                     note=reason, values={"error": reason.capitalize()})
        # A cancelled head of a key may have had work parked behind it.
        for task_name, running_key in (
            Invocation.objects.using(using).filter(pk__in=moved, running_key__isnull=False)
            .values_list("task_name", "running_key").distinct()
        ):
            wake_next(task_name, running_key, using=using)
    return moved
