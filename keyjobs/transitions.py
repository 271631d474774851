"""The one place that writes an invocation's status.

Every change is checked against the lifecycle in ``keyjobs.status``, made under
``select_for_update`` inside a transaction, and recorded as an ``Event`` in
that same transaction, so that no change can go unrecorded and the history is
a plain ordered query.

The claim and the hand-off (``keyjobs.claim``) write through the same
statements (``keyjobs.sql``). Where PostgreSQL makes a whole step one
statement, the path it may take is checked here first (``checked_path``),
the status and owner are checked by the statement itself, and its history
rows are written by that same statement.
"""

from collections.abc import Collection, Iterable, Sequence
from typing import Any

from django.db import transaction
from django.db.models.functions import Now

from .exceptions import InvalidTransition, NotOwner
from .models import Event, Invocation, Runner
from .sql import statements
from .status import Status, is_legal

#: Fields stamped with the database's clock when an invocation enters a status.
_STAMPS = {Status.REGISTERED: "registered_at", Status.RUNNING: "started_at", Status.SUCCESS: "finished_at", Status.FAILED: "finished_at",
           Status.CONCURRENCY_CONTROLLED_FINAL: "finished_at"}

#: What a caller holding row locks knows of each row: (id, status, runner id).
Locked = tuple[int, str, int | None]


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
    recorded as an event of its own (a claim that starts at once goes
    REGISTERED, PENDING, RUNNING).
    """
    ids = list(ids)
    if not ids:
        return []
    if only_from is not None and statements(using).one_statement_steps:
        moved = _move_in_one_statement(ids, to, using=using, only_from=only_from, owner=owner, runner=runner or owner,
                                       runner_thread=runner_thread, note=note, values=values, via=via)
        if moved is not None:
            return moved
    refusal: InvalidTransition | NotOwner | None = None
    with transaction.atomic(using=using, savepoint=False):
        rows = statements(using).lock_rows(ids)
        try:
            return move_locked(rows, to, using=using, only_from=only_from, owner=owner, runner=runner,
                               runner_thread=runner_thread, note=note, values=values, via=via)
        except (InvalidTransition, NotOwner) as exc:
            refusal = exc
    # Raised once the block is left with nothing written: leaving it by an
    # exception would mark the caller's transaction for rollback.
    raise refusal


def move_locked(
    rows: list[Locked],
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
    """Move rows whose locks the caller holds in the current transaction (see ``move``)."""
    runner = runner or owner
    moving: list[tuple[int, str]] = []
    for pk, status, runner_id in rows:
        if only_from is not None and status not in only_from:
            continue
        path = [status, *via, to]
        for here, there in zip(path, path[1:]):
            if not is_legal(here, there):
                raise InvalidTransition(f"invocation #{pk} cannot go from {here} to {there}")
        if owner is not None and runner_id != owner.pk:
            raise NotOwner(f"invocation #{pk} is not owned by {owner} any more")
        moving.append((pk, status))
    if not moving:
        return []
    # No savepoint: a caller that must survive a failed move (a lost race at a
    # constraint) wraps it in one of its own.
    runner_id = runner.pk if runner is not None else None
    with transaction.atomic(using=using, savepoint=False):
        statements(using).move([pk for pk, _ in moving], written(to, via, values), [
            (pk, Event.Kind.TRANSITION, here, there, runner_id, runner_thread, note)
            for pk, status in moving
            for here, there in zip([status, *via], [*via, to])
        ])
    return [pk for pk, _ in moving]


def _move_in_one_statement(
    ids: list[int],
    to: Status,
    *,
    using: str,
    only_from: Collection[str],
    owner: Runner | None,
    runner: Runner | None,
    runner_thread: int | None,
    note: str,
    values: dict[str, Any] | None,
    via: Sequence[Status],
) -> list[int] | None:
    """``move`` as one statement, where the database has it: lock, check and write at once.

    Only for a move whose every expected status may take the path: the
    database then needs to check nothing but the status and the owner.
    Return None to take the general path.
    """
    steps = checked_path(to, only_from=only_from, via=via)
    if steps is None:
        return None
    rows = statements(using).move_checked(
        ids, to, steps, only_from=only_from, owner_id=owner.pk if owner is not None else None,
        values=written(to, via, values), runner_id=runner.pk if runner is not None else None,
        runner_thread=runner_thread, note=note,
    )
    if rows is None:
        return None
    return moved_rows(rows, only_from=only_from, owner=owner)


def checked_path(
    to: Status, *, only_from: Collection[str], via: Sequence[Status] = ()
) -> list[tuple[str | None, str]] | None:
    """Return the steps a one-statement move records, or None if a status in ``only_from`` may not take the path.

    Each step is (from, to); the first step's from is None: the row's own status, one of ``only_from``.
    """
    path = [*via, to]
    if not all(is_legal(here, there) for status in only_from for here, there in zip([status, *via], path)):
        return None
    return [(None, path[0]), *zip(path, path[1:])]


def moved_rows(rows: Sequence[Locked], *, only_from: Collection[str], owner: Runner | None) -> list[int]:
    """Return the ids a one-statement move wrote, given every row as it was; NotOwner if it refused them."""
    expected = [(pk, runner_id) for pk, status, runner_id in rows if status in only_from]
    if owner is not None:
        for pk, runner_id in expected:
            if runner_id != owner.pk:
                # The statement wrote nothing: it refuses a move that includes another runner's row.
                raise NotOwner(f"invocation #{pk} is not owned by {owner} any more")
    return [pk for pk, _ in expected]


def written(to: Status, via: Sequence[Status], values: dict[str, Any] | None) -> dict[str, Any]:
    """Return what a move writes: the status, ``values``, and the stamps of the statuses it enters."""
    written: dict[str, Any] = {"status": to, **(values or {})}
    for entered in (*via, to):
        if entered in _STAMPS:
            written.setdefault(_STAMPS[entered], Now())
    return written


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
