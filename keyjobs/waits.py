"""Waits on another invocation: a run that waits is PAUSED, lends its thread, and goes on when that one is final.

Inside a running task, ``child.wait()`` (or ``child.get_result()``) changes
the waiting run from RUNNING to PAUSED, recording which invocation it waits
for (``waiting_on``), and tells its runner that the thread's slot is free
(``Host.lend`` of ``keyjobs.current``): the runner may start one more thread, so that a pool whose
every thread waits on a child still runs the children. Once the child is
final, the run goes back to RUNNING, the same attempt going on, and the
runner takes its slot back. A paused run keeps its key; its paused time
counts toward none of its time limits (``current.Clock``).

The waiter learns that its child is final as idle runners learn of new work:
a hint (at once within the process; by NOTIFY from other processes, where the
database has it) with polling as the safety net.

A wait that could never end is refused (``WaitRefused``) instead of hanging:
a run waiting on itself, a cycle of waits (A waits on B while B waits on A,
including B waiting for a key A holds), and a wait inside a transaction, whose
run would hold it open while paused. Outside a task (a shell, a test, a view)
a wait just polls until the invocation is final or the timeout passes.
"""

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from asgiref.sync import sync_to_async
from django.db import connections

from . import faults
from .conf import conf
from .current import Run, this_run
from .exceptions import NotOwner, WaitRefused
from .models import Invocation
from .status import OWNED, WAITING, Change, Status, change
from .store import store
from .transitions import apply

logger = logging.getLogger(__name__)

#: How far a cycle is looked for along the chain of waits.
_CHAIN_LIMIT = 1000
#: The first and the longest pause between two looks at what is waited for.
_FIRST_LOOK, _LONGEST_PAUSE = 0.02, 0.5
#: A wake-up's payload that starts with this says an invocation is final: a queue name never has a comma.
FINAL_HINT = ","
#: What a waiter reads again of the invocation it waits for: its status and its outcome, a large result's
#: reference (``result_value``) included. Workflows read the same (``workflows.Replay.wait``).
REFRESHED = ["status", "return_value", "result_value", "error", "error_type", "traceback", "started_at", "finished_at"]

#: Who waits in this process, by the id of the invocation waited for.
_waiters: dict[int, set[threading.Event]] = {}
_waiters_lock = threading.Lock()


# -- learning that an invocation is final ---------------------------------------------


def finished(invocation: Invocation, *, using: str) -> None:
    """Tell whoever waits on ``invocation`` that it is final: at once in this process, by a hint to the others.

    The hint goes only for a child (an invocation delayed by a run): its
    parent is the one likely to wait. Others waiting on it poll.
    """
    if _waiters:
        _wake(invocation.pk)
    if invocation.parent_id is not None:
        db = store(using)
        if db.notifies:
            try:
                db.notify(f"{FINAL_HINT}{invocation.pk}")
            except Exception as exc:
                # Only a hint, sent once the outcome is recorded: a waiter that misses it polls.
                logger.warning("could not tell who waits on #%s that it is final (%s)", invocation.pk, exc,
                               extra=invocation.log_extra())


def woke(payload: str) -> bool:
    """Handle a wake-up that says an invocation is final; return False if it is a queue's wake-up instead."""
    if not payload.startswith(FINAL_HINT):
        return False
    if payload[len(FINAL_HINT):].isdigit():
        _wake(int(payload[len(FINAL_HINT):]))
    return True


def _wake(pk: int) -> None:
    with _waiters_lock:
        for event in _waiters.get(pk, ()):
            event.set()


# -- waiting --------------------------------------------------------------------------


def wait(invocation: Invocation, timeout: float | None = None) -> str:
    """Wait until ``invocation`` is final and return its status; TimeoutError past ``timeout`` seconds.

    Inside a run, the run is PAUSED meanwhile and its thread slot lent; see the module docstring.
    """
    run = this_run()
    if run is None:
        return _poll(invocation, timeout)
    if run.workflow is not None:
        # A workflow does not pause: its run ends until the invocation is final (``keyjobs.workflows``).
        return run.workflow.wait(invocation, timeout)
    waiter = run.invocation
    if invocation.pk == waiter.pk:
        raise WaitRefused(f"invocation #{waiter.pk} of {waiter.task_name} waits on itself: it would never end")
    invocation.refresh_from_db(using=run.using, fields=REFRESHED)
    if invocation.is_final:
        return invocation.status
    if connections[run.using].in_atomic_block:
        raise WaitRefused(
            f"invocation #{waiter.pk} of {waiter.task_name} waits on #{invocation.pk} inside a transaction: "
            "paused, it would hold the transaction open, and what it delayed in it stays invisible to runners "
            "until it commits; wait outside transaction.atomic()"
        )
    _move(run, change(Status.PAUSED, runner_id=run.runner.pk, thread=run.thread, note=f"waits for #{invocation.pk}",
                      values={"waiting_on": invocation.pk}), Status.RUNNING)
    run.clock.pause()  # paused time counts toward no time limit
    outcome = "ended"
    try:
        found = cycle(waiter, invocation, using=run.using)
        if found is not None:
            outcome = "was refused: a cycle"
            raise WaitRefused(f"wait cycle: {found}; #{waiter.pk} of {waiter.task_name} would wait for ever")
        if run.host is not None:
            run.host.lend(run)
        try:
            status = _poll(invocation, timeout)
        except TimeoutError:
            outcome = f"timed out after {timeout:g}s"
            raise
        finally:
            if run.host is not None:
                run.host.take_back(run)
        outcome = f"ended {status}"
        return status
    finally:
        resume(run, f"its wait for #{invocation.pk} {outcome}")
        run.clock.resume()


@contextmanager
def held_back(run: Run, why: str) -> Iterator[None]:
    """Keep ``run`` PAUSED while the block runs: its runner holds its code back (``why``), though it waits on nothing.

    Like a wait's pause: a death of its runner meanwhile is not counted against it, nor the time against its limits.
    """
    _move(run, change(Status.PAUSED, runner_id=run.runner.pk, thread=run.thread, note=why), Status.RUNNING)
    run.clock.pause()
    try:
        yield
    finally:
        resume(run, "its turn came")
        run.clock.resume()


def resume(run: Run, note: str) -> None:
    """Take the paused run up again: RUNNING, the same attempt going on."""
    _move(run, change(Status.RUNNING, resumed=True, runner_id=run.runner.pk, thread=run.thread, note=note,
                      values={"waiting_on": None}), Status.PAUSED)


def _move(run: Run, made: Change, expected: Status) -> None:
    """Apply ``made`` to the run's invocation, which its runner must own in status ``expected``.

    Tried again across what a retry can fix (``faults.retrying``), and found
    done is done: a change whose reply was lost finds the invocation in the
    status it asked for, still the run's. While the database is away it
    keeps trying for a lease at most: a runner cut off that long has lost its
    work to recovery, and the run ends (NotOwner).
    """
    pk = run.invocation.pk

    def done_already() -> list[int]:
        there = Invocation.objects.using(run.using).filter(pk=pk, status=made.to, runner=run.runner).exists()
        return [pk] if there else []

    def step() -> list[int]:
        try:
            return apply([pk], made, using=run.using, only_from={expected}, owner=run.runner) or done_already()
        except Exception as exc:
            # A refusal heard after the change landed is no refusal of it.
            if faults.is_transient(exc) or isinstance(exc, NotOwner) or not done_already():
                raise
            return [pk]

    moved = faults.retrying(f"record that #{pk} goes {made.to}", step, using=run.using, patience=conf.LEASE)
    if not moved:
        raise NotOwner(f"invocation #{pk} was taken from {run.runner} while it ran" if moved is not None else
                       f"invocation #{pk} could not go {made.to} for over a lease ({conf.LEASE:g}s) without the "
                       "database: its runner's work is recovered by others by now")
    run.invocation.status = made.to


def _poll(invocation: Invocation, timeout: float | None) -> str:
    """Look at ``invocation`` until it is final, woken early by a hint; TimeoutError past ``timeout`` seconds."""
    looks = _Looks(invocation, timeout)
    hint = threading.Event()
    with _waiters_lock:
        _waiters.setdefault(invocation.pk, set()).add(hint)
    try:
        while True:
            hint.clear()
            if looks.final():
                return invocation.status
            pause = looks.pause()
            # Between looks it holds no connection, where Django's pool takes it back (see Store.let_go).
            store(looks.using).let_go()
            hint.wait(pause)
    finally:
        with _waiters_lock:
            waiting = _waiters[invocation.pk]
            waiting.discard(hint)
            if not waiting:
                del _waiters[invocation.pk]


async def await_final(invocation: Invocation, timeout: float | None = None) -> str:
    """Wait as ``wait()`` does, from async code: return the final status; TimeoutError past ``timeout`` seconds.

    Inside a run (an ``async def`` task), the run is PAUSED as ``wait()``
    pauses it, in the run's own thread. Elsewhere (an async view) no thread
    is held while it waits: each look is a query in Django's thread for sync
    code, and the pauses between looks are ``asyncio.sleep()``.
    """
    if this_run() is not None:
        return await sync_to_async(wait)(invocation, timeout)
    looks = _Looks(invocation, timeout)

    def look() -> bool:
        final = looks.final()
        store(looks.using).let_go()
        return final

    while not await sync_to_async(look)():
        await asyncio.sleep(looks.pause())
    return invocation.status


class _Looks:
    """The looks at an invocation until it is final: each a refresh; pauses that grow, up to a deadline."""

    def __init__(self, invocation: Invocation, timeout: float | None) -> None:
        self.invocation, self.timeout = invocation, timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.using = invocation._state.db or conf.DATABASE
        self.next = _FIRST_LOOK

    def final(self) -> bool:
        """Read the invocation again; return whether it is final."""
        self.invocation.refresh_from_db(using=self.using, fields=REFRESHED)
        return self.invocation.is_final

    def pause(self) -> float:
        """Return the seconds until the next look; TimeoutError if the deadline has passed."""
        now = time.monotonic()
        if self.deadline is not None and now >= self.deadline:
            raise TimeoutError(f"invocation #{self.invocation.pk} of {self.invocation.task_name} is still "
                               f"{self.invocation.status} after {self.timeout:g}s")
        pause = self.next if self.deadline is None else max(0.0, min(self.next, self.deadline - now))
        self.next = min(self.next * 1.5, _LONGEST_PAUSE)
        return pause


def cycle(waiter: Invocation, waited: Invocation, *, using: str) -> str | None:
    """Return the chain of waits from ``waited`` back to ``waiter`` as a person reads it, or None if there is none.

    A paused invocation waits for its ``waiting_on``; a waiting invocation of
    a key with one slot (the ``running_limit`` it stored) waits for the key's owner. Read after the waiter's own
    PAUSED is committed: of two runs closing a cycle at once, the later one
    sees the earlier's wait, so at least one of them finds the cycle.
    """
    links = [f"#{waiter.pk} waits for #{waited.pk}"]
    seen = {waiter.pk}
    invocations = Invocation.objects.using(using)
    # Every link read now, never from what was loaded before the waiter's PAUSED was committed.
    following = waited.pk
    for _ in range(_CHAIN_LIMIT):
        node = (invocations.filter(pk=following)
                .values_list("pk", "status", "waiting_on_id", "task_name", "running_key", "running_limit").first())
        if node is None:
            return None
        pk, status, waiting_on, task_name, running_key, running_limit = node
        if pk in seen:
            return None  # a cycle that does not pass through the waiter: its own members find it
        seen.add(pk)
        if status == Status.PAUSED and waiting_on is not None:
            following, link = waiting_on, f"#{pk} waits for #{waiting_on}"
        elif status in WAITING and running_key is not None and running_limit == 1:
            owner = (invocations.filter(task_name=task_name, running_key=running_key, status__in=OWNED)
                     .values_list("pk", flat=True).first())
            if owner is None:
                return None
            following, link = owner, f"#{pk} waits for its key, held by #{owner}"
        else:
            return None
        links.append(link)
        if following == waiter.pk:
            return ", ".join(links)
    return None
