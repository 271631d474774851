"""Waits on another invocation: a run that waits is PAUSED, lends its thread, and goes on when that one is final.

Inside a running task, ``child.wait()`` (or reading ``child.result``) changes
the waiting run from RUNNING to PAUSED, recording which invocation it waits
for (``waiting_on``), and tells its runner that the thread's slot is free
(``Lender.lend``): the runner may start one more thread, so that a pool whose
every thread waits on a child still runs the children. Once the child is
final, the run goes back to RUNNING, the same attempt going on, and the
runner takes its slot back. A paused run keeps its key.

The waiter learns that its child is final as idle runners learn of new work:
a hint (at once within the process; by NOTIFY from other processes, where the
database has it) with polling as the safety net.

A wait that could never end is refused (``WaitRefused``) instead of hanging:
a run waiting on itself, a cycle of waits (A waits on B while B waits on A,
including B waiting for a key A holds), and a wait inside a transaction, whose
run would hold it open while paused. Outside a task (a shell, a test, a view)
a wait just polls until the invocation is final or the timeout passes.
"""

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

from django.db import connections

from . import faults
from .conf import conf
from .exceptions import NotOwner, WaitRefused
from .models import Invocation, Runner
from .status import OWNED, WAITING, Change, Status, change
from .store import store
from .transitions import apply

logger = logging.getLogger("keyjobs.worker")

#: How far a cycle is looked for along the chain of waits.
_CHAIN_LIMIT = 1000
#: The first and the longest pause between two looks at what is waited for.
_FIRST_LOOK, _LONGEST_PAUSE = 0.02, 0.5
#: A wake-up's payload that starts with this says an invocation is final: a queue name never has a comma.
FINAL_HINT = ","
_REFRESHED = ["status", "return_value", "error", "error_type", "traceback", "started_at", "finished_at"]


class Lender(Protocol):
    """A runner that lends a paused run's thread slot to other work."""

    def lend(self, thread: int | None) -> None:
        """The run on ``thread`` pauses: its slot may go to another thread meanwhile."""

    def take_back(self, thread: int | None) -> None:
        """The run on ``thread`` goes on: it takes its slot back."""


@dataclass(frozen=True)
class Run:
    """The invocation a runner thread is running, and what pausing it needs."""

    invocation: Invocation
    runner: Runner
    using: str
    thread: int | None
    lender: Lender | None


_current: ContextVar[Run | None] = ContextVar("keyjobs_run", default=None)

#: Who waits in this process, by the id of the invocation waited for.
_waiters: dict[int, set[threading.Event]] = {}
_waiters_lock = threading.Lock()


@contextmanager
def running(
    invocation: Invocation, runner: Runner, *, using: str, thread: int | None, lender: Lender | None
) -> Iterator[None]:
    """Mark the code inside as ``invocation``'s run: its waits pause it, its delay() calls are its children."""
    token = _current.set(Run(invocation, runner, using, thread, lender))
    try:
        yield
    finally:
        _current.reset(token)


def in_a_run() -> bool:
    """Return whether the calling code runs inside a task run."""
    return _current.get() is not None


def parent_id() -> int | None:
    """Return the id of the invocation whose run is calling, the parent of what it delays; None outside a run."""
    run = _current.get()
    return None if run is None else run.invocation.pk


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
                logger.warning("keyjobs: could not tell who waits on #%s that it is final (%s)", invocation.pk, exc)


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
    run = _current.get()
    if run is None:
        return _poll(invocation, timeout)
    waiter = run.invocation
    if invocation.pk == waiter.pk:
        raise WaitRefused(f"invocation #{waiter.pk} of {waiter.task_name} waits on itself: it would never end")
    invocation.refresh_from_db(using=run.using, fields=_REFRESHED)
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
    outcome = "ended"
    try:
        cycle = _cycle(waiter, invocation, using=run.using)
        if cycle is not None:
            outcome = "was refused: a cycle"
            raise WaitRefused(f"wait cycle: {cycle}; #{waiter.pk} of {waiter.task_name} would wait for ever")
        if run.lender is not None:
            run.lender.lend(run.thread)
        try:
            status = _poll(invocation, timeout)
        except TimeoutError:
            outcome = f"timed out after {timeout:g}s"
            raise
        finally:
            if run.lender is not None:
                run.lender.take_back(run.thread)
        outcome = f"ended {status}"
        return status
    finally:
        _move(run, change(Status.RUNNING, resumed=True, runner_id=run.runner.pk, thread=run.thread,
                          note=f"its wait for #{invocation.pk} {outcome}", values={"waiting_on": None}),
              Status.PAUSED)


def _move(run: Run, made: Change, expected: Status) -> None:
    """Apply ``made`` to the run's invocation, which its runner must own in status ``expected``.

    Retried across what a retry can fix (``faults.is_transient``), as an
    outcome is: a run left PAUSED by an outage would have its outcome refused.
    """
    pause = 0.1
    while True:
        try:
            moved = apply([run.invocation.pk], made, using=run.using, only_from={expected}, owner=run.runner)
            break
        except Exception as exc:
            if not faults.is_transient(exc):
                raise
            connections[run.using].close()
            logger.warning("keyjobs: could not record that #%s goes %s (%s); retrying in %.1fs", run.invocation.pk,
                           made.to, exc, pause)
            time.sleep(pause)
            pause = min(pause * 2, 5.0)
    if not moved:
        raise NotOwner(f"invocation #{run.invocation.pk} was taken from {run.runner} while it ran")
    run.invocation.status = made.to


def _poll(invocation: Invocation, timeout: float | None) -> str:
    """Look at ``invocation`` until it is final, woken early by a hint; TimeoutError past ``timeout`` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    using = invocation._state.db or conf.DATABASE
    hint = threading.Event()
    with _waiters_lock:
        _waiters.setdefault(invocation.pk, set()).add(hint)
    try:
        pause = _FIRST_LOOK
        while True:
            hint.clear()
            invocation.refresh_from_db(using=using, fields=_REFRESHED)
            if invocation.is_final:
                return invocation.status
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"invocation #{invocation.pk} of {invocation.task_name} is still "
                                   f"{invocation.status} after {timeout:g}s")
            # Between looks it holds no connection, where Django's pool takes it back (see Store.let_go).
            store(using).let_go()
            hint.wait(pause if deadline is None else max(0.0, min(pause, deadline - time.monotonic())))
            pause = min(pause * 1.5, _LONGEST_PAUSE)
    finally:
        with _waiters_lock:
            waiting = _waiters[invocation.pk]
            waiting.discard(hint)
            if not waiting:
                del _waiters[invocation.pk]


def _cycle(waiter: Invocation, waited: Invocation, *, using: str) -> str | None:
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
