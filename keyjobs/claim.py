"""Claiming: a runner takes registered invocations whose key is free, in key order.

Blocked work is examined once, then parked (REROUTED) or dropped
(CONCURRENCY_CONTROLLED_FINAL), never cycled through the queue: a parked
invocation stays out of every claim until the invocation holding its key
leaves the owned states, and ``wake_next`` registers it again in that same
transaction.

Why parking cannot lose a wake-up: a runner parks an invocation only while
holding row locks on the owners of its key. The owner's final transition
locks the owner's own row first, so either it commits before the parker looks
(and the parker sees the key free), or it waits for the parker's commit and
then sees the parked row when it wakes the next one. ``wake_orphans`` is the
safety net for a runner that died in between.
"""

import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from django.db import IntegrityError, connections, transaction
from django.db.models import Exists, F, OuterRef

from . import registry, wakeups
from .exceptions import TaskNotFound
from .models import Invocation, Runner
from .sql import statements
from .status import OWNED, Status
from .transitions import Locked, checked_path, move, move_locked, moved_rows, written

logger = logging.getLogger("keyjobs.worker")

#: How many registered invocations one claim decides at most, blocked ones included.
SCAN = 16
#: How many blocked invocations of one key one transaction parks at most.
PARK_BATCH = 2000
#: The history's notes for the two ways a freed key's next invocation goes on.
WOKEN = "its key freed: its turn"
HANDED = "handed over by the invocation that freed its key"


def claim(
    runner: Runner,
    *,
    using: str,
    queues: list[str] | None = None,
    limit: int = 1,
    thread: int | None = None,
    start: bool = False,
) -> list[Invocation]:
    """Claim up to ``limit`` runnable invocations for ``runner``; park or drop blocked ones.

    Claimed invocations are PENDING, or RUNNING with ``start`` (for a thread
    that runs them at once: both changes are recorded, in one transaction).
    Each candidate is decided in a transaction of its own, so that a claim
    holds the owner locks of one key at a time, briefly: a claim that held many
    would make the owners' final transitions queue behind it.
    """
    claimed: list[Invocation] = []
    for _ in range(SCAN):
        if len(claimed) >= limit:
            break
        with statements(using).writing():
            taken = _claim_next(runner, using=using, queues=queues, thread=thread, start=start,
                                room=limit - len(claimed))
        if taken is None:
            break
        claimed += taken
    return claimed


def _claim_next(
    runner: Runner, *, using: str, queues: list[str] | None, thread: int | None, start: bool, room: int
) -> list[Invocation] | None:
    """Decide the next registered invocations: return those claimed, None if there were none.

    Up to ``room`` invocations without a running key at the head of the queue
    are claimed together; one with a running key is decided alone, under its
    key's owner locks.
    """
    taken = _take_free(runner, using=using, queues=queues, thread=thread, start=start, room=room)
    if taken is not None:
        return taken or None
    # No savepoint inside a caller's transaction (record_and_take's): a failure undoes both.
    with transaction.atomic(using=using, savepoint=False):
        candidates = statements(using).claimable(queues, room)
        if not candidates:
            return None
        head = candidates[0]
        try:
            task = registry.get(head.task_name)
        except TaskNotFound as exc:
            move_locked([_row(head)], Status.FAILED, using=using, runner=runner, note="task not found",
                        values={"error": str(exc)})
            return []
        if head.running_key is None:
            plain = [head]
            for candidate in candidates[1:]:
                if candidate.running_key is not None or candidate.task_name not in registry.all_names():
                    break  # keep the queue's order: the rest waits for the next claim
                plain.append(candidate)
            return _take(plain, runner, thread, 0, using, start)
        if _try_claim(head, task.running_limit, runner, thread, using, start):
            return [head]
        # Still under the locks taken on the key's owners: see the module docstring. What is
        # registered behind the candidate in its key is blocked too: it goes with it, at once,
        # so that a deep backlog on one key costs one transaction, not one per invocation.
        blocked = [_row(head), *statements(using).registered_behind(head, PARK_BATCH)]
        if task.reroute_on_concurrency_control:
            move_locked(blocked, Status.REROUTED, using=using, runner=runner,
                        note="its key was busy: parked until it frees")
        else:
            move_locked(blocked, Status.CONCURRENCY_CONTROLLED_FINAL, using=using, runner=runner,
                        note="its key was busy: dropped")
        return []


def _take_free(
    runner: Runner, *, using: str, queues: list[str] | None, thread: int | None, start: bool, room: int
) -> list[Invocation] | None:
    """Claim the head of the queue in one statement where the database can: what needs no decision.

    Return what was claimed ([] if nothing was there to claim), or None when
    the head needs deciding here (parking, an unknown task, a lost race) or
    the database has no such statement.
    """
    if not statements(using).one_statement_steps:
        return None
    # A savepoint only inside a caller's transaction: alone, the statement is its own transaction.
    block = transaction.atomic(using=using) if connections[using].in_atomic_block else nullcontext()
    try:
        with block:
            found = statements(using).take_free(queues, room, known=sorted(registry.all_names()), start=start,
                                                runner_id=runner.pk, thread=thread)
    except IntegrityError:
        return None  # another runner took one of those keys at the same moment
    if found is None:
        return None
    taken, stopped = found
    if not taken and stopped:
        return None
    for invocation in taken:
        invocation.runner = runner
    return taken


def _row(invocation: Invocation) -> Locked:
    return (invocation.pk, invocation.status, invocation.runner_id)


def _try_claim(candidate: Invocation, limit: int, runner: Runner, thread: int | None, using: str, start: bool) -> bool:
    """Claim ``candidate`` if its key has room and nothing of its key is ahead of it."""
    sql = statements(using)
    assert candidate.running_key is not None
    for _ in range(3):
        # Locking the owners is what makes parking safe: see the module docstring.
        taken = sql.owned_slots(candidate.task_name, candidate.running_key, lock=True)
        free = [slot for slot in range(limit) if slot not in taken]
        if not free:
            return False
        # Only due work: work scheduled for later must not hold up the key until then.
        ahead = sql.waiting_in_key_order(candidate.task_name, candidate.running_key, 1, before=candidate)
        if ahead:
            if ahead[0][1] == Status.REROUTED:
                # Parked although its key has room: its waker died. It goes first, the candidate waits.
                wake_next(candidate.task_name, candidate.running_key, using=using, runner=runner)
            return False
        try:
            with transaction.atomic(using=using):  # a savepoint: losing the race must not end the claim
                return bool(_take([candidate], runner, thread, free[0], using, start))
        except IntegrityError:
            # Another runner took the key between our look and our claim: look again.
            continue
    return False


def _take(
    candidates: list[Invocation], runner: Runner, thread: int | None, slot: int, using: str, start: bool
) -> list[Invocation]:
    values: dict[str, object] = {"runner": runner, "runner_thread": thread, "slot": slot}
    if start:
        values["attempts"] = F("attempts") + 1
    moved = set(move_locked([_row(c) for c in candidates], Status.RUNNING if start else Status.PENDING, using=using,
                            only_from={Status.REGISTERED}, runner=runner, runner_thread=thread, values=values,
                            via=[Status.PENDING] if start else ()))
    taken = [c for c in candidates if c.pk in moved]
    for candidate in taken:
        candidate.status = Status.RUNNING if start else Status.PENDING
        candidate.runner, candidate.runner_thread, candidate.slot = runner, thread, slot
        if start:
            candidate.attempts += 1
    return taken


@dataclass
class Wake:
    """What freeing a place of a key did."""

    #: Parked invocations registered again.
    woken: list[int]
    #: The invocation handed straight to the taker, if any.
    handed: Invocation | None = None


@dataclass
class Taker:
    """A runner thread that will run a freed key's next invocation itself, if it may."""

    runner: Runner
    thread: int | None
    queues: list[str] | None
    #: Asked when the invocation ends: False once the thread will not go on (its runner stops).
    goes_on: Callable[[], bool] = lambda: True


def wake_next(
    task_name: str, running_key: str | None, *, using: str, runner: Runner | None = None, taker: Taker | None = None,
    take: bool = False,
) -> Wake:
    """Give the places a key has free to its next invocations, in key order.

    A key with room for n more owners should have its first n waiting
    invocations registered; any of them still parked is woken, and joins the
    back of the queue. With a ``taker`` and nothing else waiting in its
    queues, the first of them, if parked, goes straight to RUNNING for the
    taker instead (a hand-off: no wake-up, no separate claim). With ``take``,
    a taker handed nothing may be given the queue's next invocation instead,
    where the database claims it in the same statement.
    Call it in the transaction that frees a place of the key.
    """
    if running_key is None:
        return Wake([])
    try:
        limit = registry.get(task_name).running_limit
    except TaskNotFound:
        limit = 1
    sql = statements(using)
    if limit == 1:
        done = sql.wake_next(task_name, running_key, runner_id=runner.pk if runner is not None else None,
                             taker=taker, channel=wakeups.CHANNEL,
                             known=sorted(registry.all_names()) if take and taker is not None else ())
        if done is not None:
            handed, woken = done
            if handed is not None and taker is not None:
                handed.runner = taker.runner
            return Wake(woken, handed)
    taken_slots = sql.owned_slots(task_name, running_key, lock=False)
    free = [slot for slot in range(limit) if slot not in taken_slots]
    if not free:
        return Wake([])
    next_up = sql.waiting_in_key_order(task_name, running_key, len(free))
    parked = [(pk, queue) for pk, status, queue in next_up if status == Status.REROUTED]
    handed: Invocation | None = None
    first_in_line_is_parked = bool(next_up) and next_up[0][1] == Status.REROUTED
    if (
        taker is not None
        and first_in_line_is_parked
        and (not taker.queues or parked[0][1] in taker.queues)
        # Only if it would be next anyway: else it takes its turn in the queue, behind what waits.
        and not sql.claimable_exists(taker.queues)
    ):
        # Claimers never lock parked rows, so this waits for nobody but a concurrent waker of the same key.
        handed = sql.lock_invocation(parked[0][0], Status.REROUTED)
        if handed is not None:
            move_locked([_row(handed)], Status.RUNNING, using=using, runner=taker.runner,
                        runner_thread=taker.thread, note=HANDED,
                        via=[Status.REGISTERED, Status.PENDING],
                        values={"runner": taker.runner, "runner_thread": taker.thread, "slot": free[0],
                                "attempts": F("attempts") + 1})
            handed.status, handed.slot, handed.attempts = Status.RUNNING, free[0], handed.attempts + 1
            handed.runner, handed.runner_thread = taker.runner, taker.thread
            parked = parked[1:]
    woken = move([pk for pk, _ in parked], Status.REGISTERED, using=using, only_from={Status.REROUTED},
                 runner=runner, note=WOKEN)
    for queue in {queue for pk, queue in parked if pk in woken}:
        if taker is None or (taker.queues and queue not in taker.queues):  # else the taker claims next anyway
            wakeups.notify(using, queue)
    return Wake(woken, handed)


def record_and_take(
    invocation: Invocation, to: Status, *, values: dict[str, Any], note: str, taker: Taker, using: str
) -> tuple[list[int], list[Invocation]] | None:
    """Record the outcome of an invocation without a key and claim the taker's next, at once.

    One statement on PostgreSQL, one transaction on SQLite. Return (the ids
    moved, what was claimed for the taker, RUNNING); or None, with nothing
    written, to take the general path. NotOwner if the taker's runner does
    not own the invocation any more.
    """
    steps = checked_path(to, only_from={Status.RUNNING})
    if steps is None or invocation.running_key is not None:
        return None
    if not connections[using].features.has_select_for_update:
        # A database locked as a whole (SQLite): the same two steps in one transaction take
        # its write lock once instead of twice.
        with transaction.atomic(using=using):
            moved = move([invocation.pk], to, using=using, only_from={Status.RUNNING}, owner=taker.runner,
                         runner_thread=taker.thread, values=values, note=note)
            taken = claim(taker.runner, using=using, queues=taker.queues, thread=taker.thread, start=True) if moved else []
        return moved, taken
    try:
        block = transaction.atomic(using=using) if connections[using].in_atomic_block else nullcontext()
        with block:
            found = statements(using).record_and_take(
                invocation.pk, steps, only_from={Status.RUNNING}, owner_id=taker.runner.pk,
                values=written(to, (), values), runner_id=taker.runner.pk, runner_thread=taker.thread, note=note,
                queues=taker.queues, known=sorted(registry.all_names()),
            )
    except IntegrityError:
        return None  # the claim lost a race for a key: the whole statement is undone; go the general way
    if found is None:
        return None
    row, taken, _ = found
    moved = moved_rows([(invocation.pk, *row)] if row is not None else [], only_from={Status.RUNNING},
                       owner=taker.runner)
    for claimed in taken:
        claimed.runner = taker.runner
    return moved, taken


def promote_due_retries(*, using: str, runner: Runner | None = None, limit: int = 1000) -> list[int]:
    """Register again the retries whose delay is over; return their ids."""
    with transaction.atomic(using=using):
        due = list(
            Invocation.objects.using(using)
            .filter(status=Status.RETRY)
            .due()
            .order_by("run_after")
            .locked(skip_locked=True)
            .values_list("pk", "status", "runner_id", "queue")[:limit]
        )
        promoted = move_locked([row[:3] for row in due], Status.REGISTERED, using=using, runner=runner,
                               note="its retry delay is over")
        for queue in {row[3] for row in due}:
            wakeups.notify(using, queue)
    return promoted


def wake_orphans(*, using: str, runner: Runner | None = None) -> list[int]:
    """Wake parked invocations whose key nobody holds or waits to take (their waker died)."""
    live = Invocation.objects.using(using).filter(
        task_name=OuterRef("task_name"),
        running_key=OuterRef("running_key"),
        status__in=[*OWNED, Status.REGISTERED],
    )
    keys = (
        Invocation.objects.using(using)
        .filter(status=Status.REROUTED)
        .exclude(Exists(live))
        .values_list("task_name", "running_key")
        .distinct()
    )
    woken: list[int] = []
    for task_name, running_key in keys:
        with transaction.atomic(using=using):
            woken += wake_next(task_name, running_key, using=using, runner=runner).woken
    if woken:
        logger.info("keyjobs: woke %d parked invocation(s) whose key was free", len(woken))
    return woken
