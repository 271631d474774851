"""Claiming: a runner takes registered invocations that admission lets start, and a freed key wakes who waits.

Blocked work is examined once, then parked (REROUTED) or dropped
(CONCURRENCY_CONTROLLED_FINAL) as ``admission.admit`` decides, never cycled
through the queue: a parked invocation stays out of every claim until a slot
of its key frees, and ``wake_next`` registers it again in that same
transaction.

Why parking cannot lose a wake-up: a runner parks an invocation only while
holding row locks on the owners of its key. The owner's final transition
locks the owner's own row first, so either it commits before the parker looks
(and the parker sees the key free), or it waits for the parker's commit and
then sees the parked row when it wakes the next one. ``wake_orphans`` (a
timed duty) is the safety net for a runner that died in between.
"""

import heapq
import logging
import threading
import time
from collections.abc import Callable, Collection
from contextlib import nullcontext
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from django.db import IntegrityError, connections, transaction
from django.db.models import Count, Exists, Min, OuterRef, Q, Subquery
from django.db.models.functions import Coalesce, Now

from . import admission, registry
from .admission import KeyState, Verdict
from .exceptions import TaskNotFound, dotted_path
from .models import Event, Invocation, KeyControl, Runner
from .status import HANDED, OWNED, WOKEN, Change, Status, change, mark
from .store import LockedRow, Woken, store
from .transitions import apply, apply_locked, moved_rows, row_of

logger = logging.getLogger(__name__)

#: How many registered invocations one claim decides at most, blocked ones included.
SCAN = 16
#: How many blocked invocations of one key one transaction parks at most.
PARK_BATCH = 2000
#: How many times a wake-up looks again at a key whose next invocations a concurrent wake-up took.
_WAKE_ROUNDS = 3


@dataclass
class Claimer:
    """A runner thread about to claim: the one that freed a key may run the key's next invocation itself."""

    runner: Runner
    thread: int | None
    queues: list[str] | None
    #: Asked when the invocation ends: False once the thread will not go on (its runner stops).
    goes_on: Callable[[], bool] = lambda: True
    #: Set when a step that could hand this thread work failed: it may have committed, the reply lost (``adopt``).
    in_doubt: bool = False

    def claim(self, *, start: bool = True, slot: int = 0, via: tuple[Status, ...] = (),
              started_at: datetime | None = None, limit: int | None = None) -> Change:
        """Return the change that makes an invocation this thread's (RUNNING with ``start``, else PENDING).

        ``started_at``: the start's time as its rate window's token recorded it, instead of the clock.
        ``limit``: the key's limit it starts under (an operator's override), stored with its slot, so
        that the check ``keyjobs_slot_within_limit`` holds the slot to it.
        """
        path = (*via, Status.PENDING) if start else via
        values: dict[str, Any] = {}
        if started_at is not None:
            values["started_at"] = started_at
        if limit is not None:
            values["running_limit"] = limit
        return change(Status.RUNNING if start else Status.PENDING, via=path, owner_id=self.runner.pk,
                      thread=self.thread, slot=slot, note=HANDED if via else "", values=values or None)


#: Seconds after deferred work is due that the runner which deferred it looks for it.
RELEASE_MARGIN = 0.005


class Releases:
    """When work this process deferred (a full rate window) becomes due: what the release duty waits for.

    Only a hint, by this process's monotonic clock: the deferred rows carry
    their time (``run_after``, the database's clock), and every runner's
    polling finds them anyway; this makes the runner that deferred them look
    again the moment they are due, instead of at its next poll.
    """

    def __init__(self) -> None:
        self._due: list[float] = []
        self._changed = threading.Condition()

    def note(self, until: datetime, now: datetime) -> None:
        """Note deferred work due at ``until``, ``now`` being the time by the same (the database's) clock."""
        # A little late rather than early: work looked for before it is due waits for the next poll.
        at = time.monotonic() + max(0.0, (until - now).total_seconds()) + RELEASE_MARGIN
        with self._changed:
            heapq.heappush(self._due, at)
            self._changed.notify_all()

    def next_in(self) -> float | None:
        """Return the seconds until the next noted work is due (0 if some is), or None if none is noted."""
        with self._changed:
            return max(0.0, self._due[0] - time.monotonic()) if self._due else None

    def take_due(self) -> int:
        """Forget the noted times that have come; return how many."""
        now, taken = time.monotonic(), 0
        with self._changed:
            while self._due and self._due[0] <= now:
                heapq.heappop(self._due)
                taken += 1
        return taken

    def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds, or until a time is noted or ``wake()`` is called."""
        with self._changed:
            self._changed.wait(timeout)

    def wake(self) -> None:
        with self._changed:
            self._changed.notify_all()


#: This process's deferred work (see ``Releases``).
releases = Releases()


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
    claimer = Claimer(runner, thread, queues)
    claimed: list[Invocation] = []
    for _ in range(SCAN):
        if len(claimed) >= limit:
            break
        with store(using).writing():
            taken = _claim_next(claimer, using=using, start=start, room=limit - len(claimed), first=not claimed)
        if taken is None:
            break
        claimed += taken
    return claimed


def _claim_next(
    claimer: Claimer, *, using: str, start: bool, room: int, first: bool = True
) -> list[Invocation] | None:
    """Decide the next registered invocations: return those claimed, None if there were none.

    Up to ``room`` invocations without a running key at the head of the queue
    are claimed together; one with a running key is decided alone, under its
    key's owner locks. A rate-limited invocation is claimed RUNNING, and only
    as the ``first`` of a claim (else None: the claim stops before it), so
    that its recorded start, which its rate window counts, is when it runs.
    """
    taken = _claim_head(claimer, using=using, start=start, room=room)
    if taken is not None:
        return taken or None
    # No savepoint inside a caller's transaction (record_and_claim's): a failure undoes both.
    with transaction.atomic(using=using, savepoint=False):
        # Nothing, too, for a runner declared lost (or stopped): what it took now, no recovery would find.
        candidates = store(using).claimable(claimer.queues, room, runner_id=claimer.runner.pk)
        if not candidates:
            return None
        head = candidates[0]
        try:
            spec = registry.get(head.task_name)
        except TaskNotFound as exc:
            apply_locked([row_of(head)], change(Status.FAILED, runner_id=claimer.runner.pk, note="task not found",
                                                values={"error": str(exc), "error_type": dotted_path(TaskNotFound)}),
                         using=using)
            return []
        if head.running_key is None:
            plain = [head]
            for candidate in candidates[1:]:
                if candidate.running_key is not None or not registry.is_registered(candidate.task_name):
                    break  # keep the queue's order: the rest waits for the next claim
                plain.append(candidate)
            return _take(plain, claimer, 0, using, start)
        # An operator's control on the key, read only where one is in force (the candidates' query says).
        control = store(using).key_control(head.task_name, head.running_key) if head.controlled else None
        policy = admission.under(spec.policy, control)
        if policy.rate is not None and not first:
            return None
        decision, key = _decide(head, policy, claimer, using, control)
        if decision.verdict is Verdict.START:
            try:
                with transaction.atomic(using=using):  # a savepoint: losing the race must not end the claim
                    started_at = None
                    if policy.rate is not None:
                        # Part of starting: the token is given back with the savepoint if the start loses its race.
                        window = store(using).take_start(head.task_name, head.running_key, policy.rate)
                        if window.contended:
                            # Undecided until the claims taking its tokens commit: nothing is deferred nor
                            # recorded, the claim stops, and this runner looks again shortly.
                            assert window.full_until is not None
                            releases.note(window.full_until, store(using).clock())
                            return None
                        decision = admission.admit(policy, replace(key, window_full_until=window.full_until))
                        started_at = window.taken_at
                    if decision.verdict is Verdict.START:
                        return _take([head], claimer, decision.slot or 0, using, start or started_at is not None,
                                     started_at=started_at, limit=_overridden(control, head.running_limit))
            except IntegrityError:
                return []  # another runner took the slot between our look and our claim: the next claim looks again
        # Still under the locks taken on the key's owners: see the module docstring. What is
        # registered behind the candidate in its key is blocked too: it goes with it, at once,
        # so that a deep backlog on one key costs one transaction, not one per invocation.
        blocked = [row_of(head), *store(using).registered_behind(head, PARK_BATCH)]
        if decision.verdict is Verdict.PARK:
            note = ("its key is paused: parked until it resumes" if key.paused
                    else "its key was busy: parked until it frees")
            apply_locked(blocked, change(Status.REROUTED, runner_id=claimer.runner.pk, note=note), using=using)
        elif decision.verdict is Verdict.DEFER:
            assert decision.until is not None and policy.rate is not None
            _defer(blocked, decision.until, f"its key's rate window ({policy.rate}) was full", claimer, using)
        else:
            apply_locked(blocked, change(Status.CONCURRENCY_CONTROLLED_FINAL, runner_id=claimer.runner.pk,
                                         note="its key was busy: dropped"), using=using)
        return []


def _decide(
    candidate: Invocation, policy: admission.Policy, claimer: Claimer, using: str,
    control: admission.Control | None = None,
) -> tuple[admission.Decision, KeyState]:
    """Ask admission about ``candidate``'s slots, with its key's owners locked (what makes parking safe).

    Work of its key ahead of it goes first. If that work is parked although
    the key has room (its waker died), it is woken now, in this transaction.
    Return the decision and the key's state (a rate window is asked about later, when it would start).
    ``control``: an operator's, in force on the key.
    """
    assert candidate.running_key is not None
    db = store(using)
    limit = _limit_under(control, candidate.running_limit)
    held = db.owned_slots(candidate.task_name, candidate.running_key, lock=True)
    ahead = db.waiting_in_key_order(candidate.task_name, candidate.running_key, limit, before=candidate)
    key = KeyState(held=held, ahead=len(ahead), limit=limit, paused=control is not None and control.paused)
    decision = admission.admit(policy, key)
    if (decision.verdict is not Verdict.START and admission.room(key)
            and any(row.status == Status.REROUTED for row in ahead)):
        wake_next(candidate.task_name, candidate.running_key, using=using, runner=claimer.runner)
    return decision, key


def _defer(rows: list[LockedRow], until: datetime, why: str, claimer: Claimer, using: str) -> None:
    """Leave locked registered invocations REGISTERED, not due before ``until``, and record why.

    Not a change of status: a deferred invocation waits in the queue as any
    invocation given a ``run_after`` does, holding no thread and no key.
    """
    apply_locked(rows, mark(Event.Kind.DEFERRED, {"run_after": until}, runner_id=claimer.runner.pk,
                            thread=claimer.thread, note=f"{why}: deferred until "
                                                        f"{until.isoformat(timespec='milliseconds')}"),
                 using=using, only_from={Status.REGISTERED})
    releases.note(until, store(using).clock())


def _claim_head(claimer: Claimer, *, using: str, start: bool, room: int) -> list[Invocation] | None:
    """Claim the head of the queue in one statement where the store can: what needs no decision.

    Return what was claimed ([] if nothing was there to claim), or None when
    the head needs deciding here (parking, an unknown task, a policy outside
    ``admission.FAST_PATH``, a lost race) or the store has no such step.
    """
    steps = store(using).steps
    fast_tasks = registry.fast_tasks()
    if steps is None or not fast_tasks:
        return None
    # A savepoint only inside a caller's transaction: alone, the statement is its own transaction.
    block = transaction.atomic(using=using) if connections[using].in_atomic_block else nullcontext()
    try:
        with block:
            found = steps.claim_head(claimer.queues, room, fast_tasks=fast_tasks, claim=claimer.claim(start=start))
    except IntegrityError:
        return None  # another runner took one of those keys at the same moment
    if not found.invocations and found.stopped:
        return None
    for invocation in found.invocations:
        invocation.runner = claimer.runner
    return found.invocations


def _limit_under(control: admission.Control | None, stored: int) -> int:
    """Return a key's limit: an operator's override in force (``control``), else the one its invocation stored.

    The one derivation of it (``Control.limit_for``): the claim, the wake-up and the hand-over ask here.
    """
    return control.limit_for(stored) if control is not None else stored


def _overridden(control: admission.Control | None, stored: int) -> int | None:
    """Return the limit a start under ``control`` stores in place of the ``stored`` one, None to keep it."""
    limit = _limit_under(control, stored)
    return None if limit == stored else limit


def _take(
    candidates: list[Invocation], claimer: Claimer, slot: int, using: str, start: bool,
    started_at: datetime | None = None, limit: int | None = None,
) -> list[Invocation]:
    made = claimer.claim(start=start, slot=slot, started_at=started_at, limit=limit)
    moved = set(apply_locked([row_of(c) for c in candidates], made, using=using, only_from={Status.REGISTERED}))
    taken = [c for c in candidates if c.pk in moved]
    for candidate in taken:
        candidate.status = made.to
        candidate.runner, candidate.runner_thread, candidate.slot = claimer.runner, claimer.thread, slot
        if limit is not None:
            candidate.running_limit = limit
        if start:
            candidate.attempts += 1
    return taken


def wake_next(
    task_name: str, running_key: str | None, *, using: str, runner: Runner | None = None,
    claimer: Claimer | None = None,
) -> Woken:
    """Give the slots a key has free to its next invocations, in key order.

    A key with room for n more owners should have its first n waiting
    invocations registered; any of them still parked is woken. It keeps its
    original place in the queue (priority, then enqueue order), or, for a
    task declared ``round_robin``, joins the back of it. The key's limit is
    the one its next invocation stored. With a ``claimer``, the first of them,
    if parked and next in its queues anyway, goes straight to RUNNING for the
    claimer instead (a hand-off: no wake-up, no separate claim). Next anyway:
    nothing claimable is ahead of its place, which is its own (nothing at all
    for ``round_robin``, whose woken work joins the back). A key's chain is the
    critical path of a busy queue; handing it on keeps it moving through a busy
    start instead of waiting for the next thread to come free. On PostgreSQL
    the whole wake-up is one statement, for any limit, for a policy in
    ``admission.FAST_PATH``; a hand-off there may lose a race for its slot to
    another runner's claim (an IntegrityError that undoes the transaction:
    the caller records again without a claimer, ``execute._record``). There,
    a claimer handed nothing is given the queue's next invocation in the
    same statement, as a record-and-claim gives it (``handed``, RUNNING):
    the thread that freed a key claims no more apart.
    Call it in the transaction that frees a slot of the key.
    """
    if running_key is None:
        return Woken(None, [])
    policy = registry.policy_of(task_name)
    db = store(using)
    woken_change = change(Status.REGISTERED, runner_id=runner.pk if runner is not None else None, note=WOKEN,
                          keep_place=not policy.round_robin)
    if db.steps is not None and admission.in_fast_path(policy):
        fast_tasks = registry.fast_tasks() if claimer is not None else []
        done = db.steps.wake_next(
            task_name, running_key, woken=woken_change,
            handed=claimer.claim(via=(Status.REGISTERED,)) if claimer is not None else None,
            queues=claimer.queues if claimer is not None else None,
            fast_tasks=fast_tasks, claim=claimer.claim() if claimer is not None and fast_tasks else None,
        )
        if done.handed is not None and claimer is not None:
            done.handed.runner = claimer.runner
        if done.controlled:  # an operator's control on the key, which the statement leaves alone: decided here
            if done.handed is not None:  # what the statement claimed instead: the thread has its next already
                return Woken(done.handed, _wake(task_name, running_key, policy, woken_change, None, using).woken)
            return _wake(task_name, running_key, policy, woken_change, claimer, using)
        if not done.missed:
            return done
        # Another waker of the key took some of the rows first: look again at what is left, as below.
        rest = _wake(task_name, running_key, policy, woken_change, None, using)
        return Woken(done.handed, done.woken + rest.woken)
    return _wake(task_name, running_key, policy, woken_change, claimer, using)


def _wake(
    task_name: str, running_key: str, policy: admission.Policy, woken_change: Change, claimer: Claimer | None,
    using: str,
) -> Woken:
    """``wake_next``'s general path: ask admission about the key's free slots, under the limit its next invocation
    stored, and wake (or hand over) its next invocations."""
    db = store(using)
    handed: Invocation | None = None
    woken: list[int] = []
    handing = claimer is not None
    # Another waker of the key (a slot freed at the same moment) may wake the same rows first: this
    # one's wake-up then waits for its commit, finds them woken, and looks again at what is left.
    for _ in range(_WAKE_ROUNDS):
        held, control = db.key_slots(task_name, running_key)  # its owners' slots, and an operator's control
        overridden = control.limit if control is not None else None
        line = db.waiting_in_key_order(task_name, running_key, overridden)
        if not line:
            break
        limit = _limit_under(control, line[0].running_limit)
        free = admission.room(KeyState(held=held, limit=limit, paused=control is not None and control.paused))
        if not free:
            break
        next_up = line[:len(free)]
        parked = [row for row in next_up if row.status == Status.REROUTED]
        if (
            handing and claimer is not None
            and next_up and next_up[0].status == Status.REROUTED
            and (not claimer.queues or parked[0].queue in claimer.queues)
            # Only if it would be next anyway: else it takes its turn in the queue, behind what waits.
            and not db.claimable_exists(claimer.queues,
                                        ahead_of=None if policy.round_robin else next_up[0].id)
        ):
            handing = False
            try:
                # A savepoint: a claim of another of the key's invocations may take the slot first
                # (it read the key before this transaction's changes); then this one is woken instead.
                with transaction.atomic(using=using):
                    handed = _hand_over(parked[0].id, admission.under(policy, control), claimer, held, limit,
                                        free[0], using, control)
            except IntegrityError:
                handed = None
            if handed is not None:
                parked = parked[1:]
        handing = False
        now = apply([row.id for row in parked], woken_change, using=using, only_from={Status.REROUTED})
        woken += now
        # A claimer skips a row another transaction locks: the thread that frees the key may not be the
        # one that claims what it woke, so every runner of its queue hears of it.
        for queue in {row.queue for row in parked if row.id in now}:
            if claimer is None or len(now) > 1 or limit > 1 or (claimer.queues and queue not in claimer.queues):
                db.notify(queue)
        if len(now) == len(parked):
            break
    return Woken(handed, woken)


def _hand_over(
    pk: int, policy: admission.Policy, claimer: Claimer, held: set[int], limit: int, slot: int, using: str,
    control: admission.Control | None = None,
) -> Invocation | None:
    """Make parked invocation ``pk`` RUNNING in ``slot`` for ``claimer``; None if it is not parked any more, or its
    rate window is full."""
    db = store(using)
    if not db.may_claim(claimer.runner.pk):
        return None  # declared lost: it is woken instead, for a live runner
    # Claimers never lock parked rows, so this waits for nobody but a concurrent waker of the same key.
    handed = db.lock_invocation(pk, Status.REROUTED)
    if handed is None:
        return None
    started_at = None
    if policy.rate is not None:
        # A hand-off is a start: it takes its window's token, or the invocation is woken instead,
        # and its claim defers it.
        window = db.take_start(handed.task_name, handed.running_key or "", policy.rate)
        if admission.admit(policy, KeyState(held=held, window_full_until=window.full_until, limit=limit)) \
                .verdict is not Verdict.START:
            return None
        started_at = window.taken_at
    overridden = _overridden(control, handed.running_limit)
    made = claimer.claim(slot=slot, via=(Status.REGISTERED,), started_at=started_at, limit=overridden)
    apply_locked([row_of(handed)], made, using=using)
    handed.status, handed.slot, handed.attempts = Status.RUNNING, slot, handed.attempts + 1
    if overridden is not None:
        handed.running_limit = overridden
    handed.runner, handed.runner_thread = claimer.runner, claimer.thread
    return handed


def record_and_claim(
    invocation: Invocation, to: Status, *, values: dict[str, Any], note: str, claimer: Claimer, using: str
) -> tuple[list[int], list[Invocation]] | None:
    """Record the outcome of an invocation without a key and claim the claimer's next, at once.

    One statement where the store has it, one transaction elsewhere. Return
    (the ids moved, what was claimed for the claimer, RUNNING); or None, with
    nothing written, to take the general path. NotOwner if the claimer's
    runner does not own the invocation any more.
    """
    if invocation.running_key is not None:
        return None
    outcome = change(to, values=values, runner_id=claimer.runner.pk, thread=claimer.thread, note=note)
    if not outcome.legal_from(Status.RUNNING):
        return None
    steps = store(using).steps
    fast_tasks = registry.fast_tasks()
    if steps is None or not fast_tasks:
        # The same two steps in one transaction: a database locked as a whole (SQLite) takes its
        # write lock once instead of twice.
        with transaction.atomic(using=using):
            moved = apply([invocation.pk], outcome, using=using, only_from={Status.RUNNING}, owner=claimer.runner)
            taken = claim(claimer.runner, using=using, queues=claimer.queues, thread=claimer.thread,
                          start=True) if moved else []
        return moved, taken
    try:
        block = transaction.atomic(using=using) if connections[using].in_atomic_block else nullcontext()
        with block:
            found = steps.record_and_claim(invocation.pk, outcome, owner_id=claimer.runner.pk, queues=claimer.queues,
                                           fast_tasks=fast_tasks, claim=claimer.claim())
    except IntegrityError:
        return None  # the claim lost a race for a key: the whole statement is undone; go the general way
    moved = moved_rows([found.row] if found.row is not None else [], only_from={Status.RUNNING},
                       owner=claimer.runner)
    for claimed in found.claimed.invocations:
        claimed.runner = claimer.runner
    return moved, found.claimed.invocations


def adopt(claimer: Claimer, *, using: str, besides: Collection[int] = ()) -> list[Invocation]:
    """Return what ``claimer``'s thread owns, PENDING or RUNNING, but ``besides``: what it took and did not hear of.

    A claim, a hand-off or a record-and-claim whose reply was lost committed
    all the same: what it took is the thread's, in the state it asked for,
    which is the step's success. Found again here, it is run as if the reply
    had come (the RUNNING first, as a hand-off's is). A thread without a
    number cannot tell its work from its runner's other threads': the runner's
    sweep (``execute.give_back_unheld``) gives that back instead.
    """
    if claimer.thread is None:
        return []
    found = list(Invocation.objects.using(using)
                 .filter(runner=claimer.runner, runner_thread=claimer.thread,
                         status__in=[Status.RUNNING, Status.PENDING])
                 .exclude(pk__in=list(besides)).order_by("pk"))
    for invocation in found:
        invocation.runner = claimer.runner
    return sorted(found, key=lambda invocation: invocation.status != Status.RUNNING)


def wake_orphans(*, using: str, runner: Runner | None = None) -> list[int]:
    """Wake parked invocations whose key has a slot that nobody holds or waits to take (their waker died)."""
    live = (
        Invocation.objects.using(using)
        .filter(task_name=OuterRef("task_name"), running_key=OuterRef("running_key"),
                status__in=[*OWNED, Status.REGISTERED])
        .order_by()
        .values("task_name")
        .annotate(taken=Count("pk"))
        .values("taken")
    )
    controls = KeyControl.objects.using(using).in_force().filter(task_name=OuterRef("task_name"),
                                                                 running_key=OuterRef("running_key"))
    taken = Coalesce(Subquery(live), 0)
    # One parked row per key, its first: the owners are counted per key, not per parked row (a backlog of 3,000
    # on one key counted them 3,000 times, each reading the key's rows: 0.9 s a look on PostgreSQL).
    firsts = (Invocation.objects.using(using).filter(status=Status.REROUTED).order_by()
              .values("task_name", "running_key").annotate(first=Min("pk")).values("first"))
    keys = (
        Invocation.objects.using(using)
        .filter(pk__in=firsts)
        # A key of one slot (the common case) is an orphan when nobody holds it or waits to take it; a key an
        # operator paused is no orphan, and one whose limit is overridden has the override's slots.
        .filter(~Exists(controls.filter(paused=True)))
        .filter(Q(running_limit__gt=taken) | Exists(controls.filter(until__gt=Now(), running_limit__gt=taken)))
        .values_list("task_name", "running_key")
    )
    woken: list[int] = []
    for task_name, running_key in keys:
        with transaction.atomic(using=using):
            woken += wake_next(task_name, running_key, using=using, runner=runner).woken
    if woken:
        logger.info("woke %d parked invocation(s) whose key was free", len(woken), extra={"invocation_ids": woken})
    return woken


def promote_due_retries(*, using: str, runner: Runner | None = None, limit: int = 1000) -> list[int]:
    """Register again the retries whose delay is over; return their ids."""
    if not store(using).retries_due():
        return []  # one cheap read, not a write transaction: this runs as often as runners poll
    with transaction.atomic(using=using):
        due = list(
            Invocation.objects.using(using)
            .filter(status=Status.RETRY)
            .due()
            .order_by("run_after")
            .locked(skip_locked=True)
            .values_list("pk", "status", "runner_id", "queue")[:limit]
        )
        promoted = apply_locked([LockedRow(*row[:3]) for row in due],
                                change(Status.REGISTERED, runner_id=runner.pk if runner is not None else None,
                                       note="its retry delay is over"), using=using)
        for queue in {row[3] for row in due}:
            store(using).notify(queue)
    return promoted

