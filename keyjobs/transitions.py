"""The status writer: the one place that applies a change of status to invocations.

What a change writes is defined once, by ``status.change()``: the status, its
stamps, the attempt count, the owner and slot, and its history rows. This
module checks it against the lifecycle, holds the row locks, and hands it to
the store, which writes the row and its history in the same transaction
(on PostgreSQL, where the caller expects given statuses, in one statement
that locks, checks the status and owner, and writes: ``Steps.move_checked``).
Claims, hand-offs and wake-ups apply their changes through the store's steps
too; the changes themselves always come from ``status.change()``.
"""

from collections.abc import Collection, Iterable, Sequence
from typing import Any

from django.db import transaction

from .exceptions import InvalidTransition, NotOwner
from .models import Event, Invocation, Runner
from .status import Change, Status, change
from .store import LockedRow, store


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
    via: Sequence[Status] = (),
) -> list[int]:
    """Lock the invocations ``ids`` and move them to status ``to``; return the ids that moved.

    ``only_from`` names the statuses a caller expects: an invocation found in
    another one was moved by someone else first and is skipped, silently.
    Outside ``only_from``, a change the lifecycle forbids raises
    InvalidTransition. With ``owner``, an invocation that runner does not own
    raises NotOwner. ``runner`` (default ``owner``) and ``runner_thread`` are
    recorded on the events; ``values`` are written along with the status.
    ``via`` lists statuses passed through on the way, each checked and
    recorded as an event of its own.
    """
    recorder = runner or owner
    return apply(ids, change(to, via=via, values=values, runner_id=recorder.pk if recorder is not None else None,
                             thread=runner_thread, note=note),
                 using=using, only_from=only_from, owner=owner)


def apply(
    ids: Iterable[int], change: Change, *, using: str, only_from: Collection[str] | None = None,
    owner: Runner | None = None,
) -> list[int]:
    """Lock the invocations ``ids`` and apply ``change``; return the ids that changed (see ``move``)."""
    ids = list(ids)
    if not ids:
        return []
    steps = store(using).steps
    if only_from is not None and steps is not None and all(change.legal_from(status) for status in only_from):
        # Every expected status may take the path: the statement needs to check nothing but status and owner.
        rows = steps.move_checked(ids, change, only_from=only_from, owner_id=owner.pk if owner is not None else None)
        return moved_rows(rows, only_from=only_from, owner=owner)
    refusal: InvalidTransition | NotOwner | None = None
    with transaction.atomic(using=using, savepoint=False):
        rows = store(using).lock_rows(ids)
        try:
            return apply_locked(rows, change, using=using, only_from=only_from, owner=owner)
        except (InvalidTransition, NotOwner) as exc:
            refusal = exc
    # Raised once the block is left with nothing written: leaving it by an
    # exception would mark the caller's transaction for rollback.
    raise refusal


def apply_locked(
    rows: Sequence[LockedRow], change: Change, *, using: str, only_from: Collection[str] | None = None,
    owner: Runner | None = None,
) -> list[int]:
    """Apply ``change`` to rows whose locks the caller holds in the current transaction (see ``move``)."""
    moving: list[LockedRow] = []
    for row in rows:
        if only_from is not None and row.status not in only_from:
            continue
        illegal = change.illegal_step(row.status)
        if illegal is not None:
            raise InvalidTransition(f"invocation #{row.id} cannot go from {illegal[0]} to {illegal[1]}")
        if owner is not None and row.runner_id != owner.pk:
            raise NotOwner(f"invocation #{row.id} is not owned by {owner} any more")
        moving.append(row)
    if not moving:
        return []
    # No savepoint: a caller that must survive a failed move (a lost race at a
    # constraint) wraps it in one of its own.
    with transaction.atomic(using=using, savepoint=False):
        store(using).move(moving, change)
    return [row.id for row in moving]


def moved_rows(rows: Sequence[LockedRow], *, only_from: Collection[str], owner: Runner | None) -> list[int]:
    """Return the ids a one-statement move wrote, given every row as it was; NotOwner if it refused them."""
    expected = [row for row in rows if row.status in only_from]
    if owner is not None:
        for row in expected:
            if row.runner_id != owner.pk:
                # The statement wrote nothing: it refuses a move that includes another runner's row.
                raise NotOwner(f"invocation #{row.id} is not owned by {owner} any more")
    return [row.id for row in expected]


def row_of(invocation: Invocation) -> LockedRow:
    """Return what a caller holding ``invocation``'s row lock knows of it."""
    return LockedRow(invocation.pk, invocation.status, invocation.runner_id)


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
