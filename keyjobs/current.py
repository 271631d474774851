"""The run in progress: one ``Run``, in one context variable, set by ``execute`` and read by all that needs it.

``execute.execute()`` builds a ``Run`` when it takes a claimed invocation and
sets it (``running()``, with a token) around the run's start, its call and the
recording of its outcome; once it returns, nothing of the run is left in the
thread, whatever the outcome (discarded included). Everything that needs "the
run in progress" reads it here, never a variable of its own:

- the task, through ``current()`` (its invocation, whether its cancel was
  requested);
- ``waits``, which pauses the run and lends its thread slot (``Run.host``);
- ``enqueue``, which links what a run delays to it (``Invocation.parent``);
- ``workflows``, whose replay of a workflow's steps the run holds (``Run.workflow``);
- the ``django.tasks`` backend's ``TaskContext`` and the async cancel watcher;
- the runner's bookkeeping (``Worker.running``), which holds the same object.

A ``Run`` is frozen: what it says of the run cannot change under a reader. To
carry more per-run state, add a field with a default and set it where
``execute`` builds the run; state that changes while the run goes on belongs
in an object such a field holds (frozen covers the reference, not what it
refers to). Readers outside the engine use ``this_run()``.
"""

import contextvars
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .models import Invocation, Runner
    from .workflows import Replay


class Host(Protocol):
    """The runner a run runs on: it keeps track of its runs, and lends a paused run's thread slot to other work."""

    def began(self, run: "Run") -> None:
        """``run`` began on its thread."""

    def ended(self, run: "Run") -> None:
        """``run`` ended: its outcome is recorded, or discarded."""

    def lend(self, run: "Run") -> None:
        """``run`` pauses (``keyjobs.waits``): its thread slot may go to another thread meanwhile."""

    def take_back(self, run: "Run") -> None:
        """``run`` goes on after a pause: it takes its slot back."""

    def calls(self, run: "Run") -> AbstractContextManager[None]:
        """The run's task code runs inside: the host may hold it back first (a recovered run goes alone)."""


class Clock:
    """A run's working time: since it began, less the time it spent paused (``keyjobs.waits``).

    Time limits count working time: a run waiting on another invocation is
    not running its code, and the wait may be long. By this process's
    monotonic clock; the supervisor's hard limits read the same from the
    history, on the database's clock.
    """

    def __init__(self, began: float | None = None) -> None:
        #: When the run began, by this process's monotonic clock.
        self.began = time.monotonic() if began is None else began
        self._paused = 0.0
        self._since: float | None = None
        self._lock = threading.Lock()  # an async run pauses in another thread than the one that reads it

    def pause(self, at: float | None = None) -> None:
        """Note that the run paused (``at``: when, by the monotonic clock; default now)."""
        with self._lock:
            if self._since is None:
                self._since = time.monotonic() if at is None else at

    def resume(self) -> None:
        """Note that the run goes on after a pause."""
        with self._lock:
            if self._since is not None:
                self._paused += time.monotonic() - self._since
                self._since = None

    def worked(self) -> float:
        """Return the seconds the run has worked so far: paused time does not count."""
        with self._lock:
            now = time.monotonic()
            paused = self._paused + (now - self._since if self._since is not None else 0.0)
        return now - self.began - paused


# eq=False: two runs are never the same run, whatever their fields; a run hashes by identity, so that a
# duty can keep a set of the runs it saw.
@dataclass(frozen=True, eq=False)
class Run:
    """One run of an invocation by a runner thread, from its start to the recording of its outcome."""

    #: The invocation run (the object ``execute`` was given: its ``status`` and ``attempts`` follow the run).
    invocation: "Invocation"
    #: The runner that claimed it, and whose ownership every write of the run checks.
    runner: "Runner"
    #: The database alias of the invocation.
    using: str
    #: The runner thread's number, if the runner numbers its threads.
    thread: int | None = None
    #: The runner, for its bookkeeping and to lend a paused run's thread slot; None where nothing hosts it (tests).
    host: Host | None = None
    #: When the run began and how long it was paused: what its time limits count (``Clock.worked()``).
    clock: Clock = field(default_factory=Clock)
    #: A workflow's run: its replay of the recorded steps (``keyjobs.workflows``); None for a task's.
    workflow: "Replay | None" = None

    @property
    def cancel_requested(self) -> bool:
        """Return whether ``cancel()`` was asked for this run; read from the database each time.

        A task that sees it may stop by raising ``keyjobs.Cancelled``: the
        invocation then ends CANCELLED. An ``async def`` task is stopped for
        it without asking (``execute``'s watcher reads this too). Read it from
        synchronous code only.
        """
        # Through the invocation's own class: keyjobs/__init__ imports this module before Django's apps are ready.
        invocations = type(self.invocation).objects.using(self.using)
        return invocations.filter(pk=self.invocation.pk, cancel_requested=True).exists()


#: The run in progress in this thread or coroutine; set only by ``running()``.
_run: contextvars.ContextVar[Run | None] = contextvars.ContextVar("keyjobs_run", default=None)


def this_run() -> Run | None:
    """Return the run in progress in this thread or coroutine, or None outside a runner's run."""
    return _run.get()


@contextmanager
def running(run: Run) -> Iterator[Run]:
    """Make ``run`` the run in progress for the code inside, and nothing once it exits (``execute`` calls it)."""
    token = _run.set(run)
    try:
        yield run
    finally:
        _run.reset(token)


@dataclass(frozen=True)
class Current:
    """The run in progress as its task sees it: also outside a runner's run, so that a task stays a plain function."""

    #: The run, or None when the function was called directly, not by a runner.
    run: Run | None

    @property
    def invocation(self) -> "Invocation | None":
        """The invocation run, or None outside a runner's run."""
        return None if self.run is None else self.run.invocation

    @property
    def cancel_requested(self) -> bool:
        """Return whether ``cancel()`` was asked for this run (``Run.cancel_requested``); False outside a run."""
        return self.run is not None and self.run.cancel_requested


def current() -> Current:
    """Return the run in progress in this thread (``Current.invocation`` is None outside a runner's run)."""
    return Current(_run.get())
