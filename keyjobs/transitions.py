"""The one place that writes an invocation's status.

Every change is checked against the lifecycle in ``keyjobs.status``, made under
``select_for_update`` inside a transaction, and recorded as an ``Event`` in
that same transaction, so that no change can go unrecorded and the history is
a plain ordered query.
"""

from collections.abc import Collection, Iterable
from typing import Any

from django.db import connections, transaction
from django.db.models.functions import Now

from .exceptions import InvalidTransition, NotOwner
from .models import Event, Invocation, Runner
from .status import Status, is_legal

#: Fields stamped with the database's clock when an invocation enters a status.
_STAMPS = {Status.RUNNING: "started_at", Status.SUCCESS: "finished_at", Status.FAILED: "finished_at",
           Status.CONCURRENCY_CONTROLLED_FINAL: "finished_at"}


def move(
    ids: Iterable[int],
    to: Status,
    *,
    using: str,
    only_from: Collection[str] | None = None,
    owner: Runner | None = None,
    runner: Runner | None = None,
    runner_thread: int | None = None,
    note: str = "",
    values: dict[str, Any] | None = None,
) -> list[int]:
    """Move the invocations ``ids`` to status ``to``; return the ids that moved.

    ``only_from`` names the statuses a caller expects: an invocation found in
    another one was moved by someone else first and is skipped, silently.
    Outside ``only_from``, a change the lifecycle forbids raises
    InvalidTransition. With ``owner``, an invocation that runner does not own
    raises NotOwner. ``runner`` (default ``owner``) and ``runner_thread`` are
    recorded on the event; ``values`` are written along with the status.
    """
    ids = list(ids)
    if not ids:
        return []
    runner = runner or owner
    # No savepoint: a caller that must survive a failed move (a lost race at a
    # constraint) wraps it in one of its own.
    with transaction.atomic(using=using, savepoint=False):
        rows = list(
            Invocation.objects.using(using)
            .select_for_update(of=("self",), no_key=connections[using].features.has_select_for_no_key_update)
            .filter(pk__in=ids)
            .order_by("pk")
            .values_list("pk", "status", "runner_id")
        )
        moving: list[tuple[int, str]] = []
        refusal: Exception | None = None
        for pk, status, runner_id in rows:
            if only_from is not None and status not in only_from:
                continue
            if not is_legal(status, to):
                refusal = InvalidTransition(f"invocation #{pk} cannot go from {status} to {to}")
            elif owner is not None and runner_id != owner.pk:
                refusal = NotOwner(f"invocation #{pk} is not owned by {owner} any more")
            moving.append((pk, status))
        if refusal is not None or not moving:
            moving = []
        else:
            values = dict(values or {})
            if to in _STAMPS:
                values.setdefault(_STAMPS[to], Now())
            Invocation.objects.using(using).filter(pk__in=[pk for pk, _ in moving]).update(status=to, **values)
            Event.objects.using(using).bulk_create(
                Event(
                    invocation_id=pk,
                    from_status=status,
                    to_status=to,
                    runner=runner,
                    runner_thread=runner_thread,
                    note=note,
                )
                for pk, status in moving
            )
    # Raised once the block is left with nothing written, so that the caller's transaction stays usable.
    if refusal is not None:
        raise refusal
    return [pk for pk, _ in moving]


def move_one(invocation: Invocation | int, to: Status, **kwargs: Any) -> bool:
    """Move one invocation (see ``move``); return whether it moved."""
    pk = invocation.pk if isinstance(invocation, Invocation) else invocation
    return bool(move([pk], to, **kwargs))


def record(invocation: Invocation, kind: str, *, using: str, runner: Runner | None = None, note: str = "") -> None:
    """Record an event that does not change the status (a reuse, a run past its time limit)."""
    Event.objects.using(using).create(
        invocation_id=invocation.pk,
        kind=kind,
        from_status=invocation.status,
        to_status=invocation.status,
        runner=runner,
        runner_thread=invocation.runner_thread,
        note=note,
    )
