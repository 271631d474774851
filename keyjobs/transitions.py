"""The one place that writes an invocation's status.

Every change is checked against the lifecycle in ``keyjobs.status``, made under
``select_for_update`` inside a transaction, and recorded as an ``Event`` in
that same transaction, so that no change can go unrecorded and the history is
a plain ordered query.
"""

from collections.abc import Collection, Iterable, Sequence
from typing import Any

from django.db import transaction
from django.db.models.functions import Now

from .exceptions import InvalidTransition, NotOwner
from .models import Event, Invocation, Runner
from .status import Status, is_legal

#: Fields stamped with the database's clock when an invocation enters a status.
_STAMPS = {Status.RUNNING: "started_at", Status.SUCCESS: "finished_at", Status.FAILED: "finished_at",
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
    refusal: InvalidTransition | NotOwner | None = None
    with transaction.atomic(using=using, savepoint=False):
        rows: list[Locked] = list(
            Invocation.objects.using(using)
            .locked()
            .filter(pk__in=ids)
            .order_by("pk")
            .values_list("pk", "status", "runner_id")
        )
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
    values = dict(values or {})
    for entered in (*via, to):
        if entered in _STAMPS:
            values.setdefault(_STAMPS[entered], Now())
    # No savepoint: a caller that must survive a failed move (a lost race at a
    # constraint) wraps it in one of its own.
    with transaction.atomic(using=using, savepoint=False):
        Invocation.objects.using(using).filter(pk__in=[pk for pk, _ in moving]).update(status=to, **values)
        Event.objects.using(using).bulk_create(
            Event(invocation_id=pk, from_status=here, to_status=there, runner=runner, runner_thread=runner_thread,
                  note=note)
            for pk, status in moving
            for here, there in zip([status, *via], [*via, to])
        )
    return [pk for pk, _ in moving]


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
