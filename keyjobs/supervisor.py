"""The supervisor of ``runworker --processes N``: N worker processes of T threads each, kept running.

One command starts a host's whole pool, so that a process manager (systemd,
a container's init) needs one entry. The supervisor runs no task itself. It:

- starts each worker process as ``runworker`` itself, in a fresh interpreter
  (multiprocessing's spawn), linked to the supervisor's runner row
  (``Runner.supervisor``) so that the monitor shows the pool;
- reaps a worker process that dies, recovers its work at once
  (``recovery.recover_dead_runner``: a reaped process writes nothing more, so
  its lease need not lapse) and starts another, after a back-off that grows
  while they keep dying young;
- enforces hard time limits (``@task(timeout=..., kill_on_timeout=True)``): a
  run past its limit is stopped by killing its process; the run ends FAILED
  with ``TimeLimitExceeded`` through the same ``execute.finish()`` as any
  outcome (its key frees, its next is woken), the process's other runs go
  back to the queue, and a replacement starts;
- replaces a worker process that exits after ``--max-tasks-per-child`` runs;
- forwards SIGTERM/SIGINT: the first stops the worker processes gracefully,
  a second makes them exit at once; it exits once they all have.

A worker process watches its parent: if the supervisor itself is killed, its
workers stop gracefully rather than run on unsupervised.
"""

import atexit
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Protocol

from django.core.management import execute_from_command_line
from django.db import DatabaseError, connections
from django.db.models import Q
from django.db.models.functions import Now
from django.utils import autoreload

from . import faults, registry
from .conf import conf
from .exceptions import TaskNotFound, TimeLimitExceeded
from .execute import failed, finish
from .models import Event, Invocation, Runner
from .recovery import recover_dead_runner
from .spec import TaskSpec
from .status import Status

logger = logging.getLogger(__name__)

#: Seconds between two looks for runs past a hard time limit (a query of this host's running invocations).
LIMIT_CHECK_INTERVAL = 0.25
#: The first pause before restarting a worker process that died, doubled while they keep dying young.
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
#: A worker process that ran this many seconds died of something else than its start-up: no back-off.
HEALTHY_AFTER = 30.0
#: The exit status of a worker process that stopped after its ``--max-tasks-per-child`` runs: replace it.
RECYCLED = 10


@dataclass
class Slot:
    """One of the supervisor's N places for a worker process."""

    number: int
    process: BaseProcess | None = None
    started: float = 0.0
    #: Deaths in a row of processes that did not live ``HEALTHY_AFTER`` seconds.
    deaths: int = 0
    #: When the next process may start, by this process's monotonic clock.
    start_at: float = 0.0
    #: Set when the supervisor killed the process itself (a hard time limit): its work is already recovered.
    killed: bool = False


@dataclass
class Supervisor:
    """Keep ``processes`` worker processes of ``threads`` threads running until stopped."""

    processes: int
    threads: int = 1
    queues: list[str] = field(default_factory=list)
    prefetch: int = 1
    burst: bool = False
    using: str | None = None
    max_tasks_per_child: int | None = None
    verbosity: int = 1

    def __post_init__(self) -> None:
        if self.processes < 1:
            raise ValueError("processes must be at least 1")
        self.using = self.using or conf.DATABASE
        self.runner: Runner | None = None
        self.slots = [Slot(number) for number in range(self.processes)]
        self.stopping = threading.Event()
        self._signals = 0
        self._specs: dict[str, TaskSpec | None] = {}
        self._context = multiprocessing.get_context("spawn")

    @property
    def db(self) -> str:
        assert self.using is not None
        return self.using

    # -- life cycle -------------------------------------------------------

    def run(self) -> None:
        """Register the supervisor's runner row, keep the worker processes running until stopped, then mark it stopped."""
        self.runner = Runner.objects.using(self.db).create(
            host=socket.gethostname(), pid=os.getpid(), threads=0, queues=",".join(self.queues)
        )
        logger.info("%s supervises %d worker process(es) of %d thread(s) on %s", self.runner,
                    self.processes, self.threads, ", ".join(self.queues) or "every queue",
                    extra={"runner_id": self.runner.pk})
        beat = limits = time.monotonic()
        try:
            while True:
                self._start_due()
                alive = [slot.process.sentinel for slot in self.slots if slot.process is not None]
                if not alive and (self.stopping.is_set() or all(slot.start_at == float("inf") for slot in self.slots)):
                    break
                wait(alive, timeout=LIMIT_CHECK_INTERVAL)
                try:
                    self._reap()
                    now = time.monotonic()
                    if now - limits >= LIMIT_CHECK_INTERVAL and not self.stopping.is_set():
                        limits = now
                        self._enforce_limits()
                    if now - beat >= conf.HEARTBEAT_INTERVAL:
                        beat = now
                        Runner.objects.using(self.db).filter(pk=self.runner.pk).update(heartbeat_at=Now())
                except Exception as exc:
                    if not faults.is_transient(exc):
                        raise
                    logger.warning("%s could not reach the database (%s); retrying", self.runner, exc,
                                   extra={"runner_id": self.runner.pk})
                    connections[self.db].close()
        finally:
            self._kill_all()
            try:
                Runner.objects.using(self.db).filter(pk=self.runner.pk).update(stopped_at=Now(), heartbeat_at=Now())
            except DatabaseError as exc:
                logger.warning("could not mark %s stopped (%s); its lease will lapse", self.runner, exc,
                               extra={"runner_id": self.runner.pk})
            connections[self.db].close()
            logger.info("%s stopped", self.runner, extra={"runner_id": self.runner.pk})

    def stop(self) -> None:
        """Stop the worker processes gracefully (they finish what they run); ``run()`` returns once they exited."""
        self.stopping.set()
        self._forward(signal.SIGTERM)

    def install_signal_handlers(self) -> None:
        """First SIGINT/SIGTERM: stop gracefully. Second: the worker processes exit at once."""
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals > 1:
            logger.warning("second %s: the worker processes exit at once", name)
            self._forward(signum)
            return
        logger.info("%s: the worker processes finish what they run, then stop (again to exit at once)",
                    name)
        self.stopping.set()
        self._forward(signum)

    def _forward(self, signum: int) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.pid is not None and slot.process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.process.pid, signum)

    # -- worker processes -------------------------------------------------

    def arguments(self) -> list[str]:
        """Return the ``runworker`` arguments of a worker process."""
        assert self.runner is not None
        arguments = ["manage.py", "runworker", "--threads", str(self.threads), "--prefetch", str(self.prefetch),
                     "--database", self.db, "--noreload", "--verbosity", str(self.verbosity),
                     "--supervisor", str(self.runner.pk)]
        if self.queues:
            arguments += ["--queues", ",".join(self.queues)]
        if self.burst:
            arguments.append("--burst")
        if self.max_tasks_per_child is not None:
            arguments += ["--max-tasks-per-child", str(self.max_tasks_per_child)]
        return arguments

    def _start_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.process is None and not self.stopping.is_set() and now >= slot.start_at:
                # runworker itself, as a person would start it: the same settings, logging and signals.
                slot.process = self._context.Process(target=execute_from_command_line, args=(self.arguments(),),
                                                     name=f"keyjobs-worker-{slot.number}", daemon=False)
                slot.process.start()
                slot.started, slot.killed = time.monotonic(), False
                logger.info("%s started worker process %d (pid %s)", self.runner, slot.number,
                            slot.process.pid)

    def _reap(self) -> None:
        """Deal with every worker process that exited: recover what it left, and plan its replacement."""
        for slot in self.slots:
            process = slot.process
            if process is None or process.exitcode is None:
                continue
            process.join()
            slot.process = None
            code = process.exitcode
            lived = time.monotonic() - slot.started
            recovered: list[int] = []
            if not slot.killed:
                # Counted against its runs unless the pool was stopping: a second Ctrl-C is not their doing.
                recovered = self._recover(process.pid, f"died (exit {_exit_text(code)})",
                                          counted=not self.stopping.is_set())
            if self.stopping.is_set():
                continue
            if code in (0, RECYCLED) or slot.killed:
                # Recycled after --max-tasks-per-child, killed at a hard limit, or stopped by someone else:
                # another starts at once. With --burst, exiting 0 means nothing is left: no replacement.
                slot.deaths = 0
                slot.start_at = float("inf") if code == 0 and self.burst else time.monotonic()
                continue
            # A process that died with work in it is no crash loop at start-up: what ran in it is to blame,
            # and its recoveries are bounded (max_recoveries). The other keys need a process again soon.
            slot.deaths = 1 if lived >= HEALTHY_AFTER or recovered else slot.deaths + 1
            pause = min(BACKOFF_FIRST * 2 ** (slot.deaths - 1), BACKOFF_MAX)
            slot.start_at = time.monotonic() + pause
            logger.error("worker process %d (pid %s) exited %s after %.1fs; another starts in %.1fs",
                         slot.number, process.pid, _exit_text(code), lived, pause)

    def _recover(self, pid: int | None, why: str, *, counted: bool = False) -> list[int]:
        """Recover at once the work of this supervisor's runner rows of ``pid``, whose process is reaped.

        ``counted``: the process died by itself, so the death counts toward the ``max_recoveries`` of
        the runs it cut short; not when the supervisor killed it, knowing why.
        """
        if pid is None:
            return []  # never started
        assert self.runner is not None
        rows = Runner.objects.using(self.db).active().filter(supervisor=self.runner, pid=pid)

        def recover() -> list[int]:
            recovered: list[int] = []
            for runner_id in list(rows.values_list("pk", flat=True)):
                recovered += recover_dead_runner(runner_id, using=self.db, by=self.runner, why=why,
                                                 counted=counted)
                Runner.objects.using(self.db).filter(pk=runner_id).update(stop_reason=f"its process {why}")
            return recovered

        # While the database is away, a heartbeat interval at most: reaping, restarts and hard limits go on, and
        # what is not recovered now is recovered once the dead runner's lease lapses, by any live runner.
        return faults.retrying(f"recover the work of pid {pid}", recover, using=self.db,
                               patience=conf.HEARTBEAT_INTERVAL) or []

    def _kill_all(self) -> None:
        """Leave no worker process behind (they were asked to stop first, unless run() failed)."""
        for slot in self.slots:
            if slot.process is not None:
                if slot.process.exitcode is None:
                    slot.process.kill()
                slot.process.join()
                self._recover(slot.process.pid, "was killed as its supervisor stopped")
                slot.process = None

    # -- hard time limits ---------------------------------------------------

    def _spec(self, task_name: str) -> TaskSpec | None:
        if task_name not in self._specs:
            try:
                self._specs[task_name] = registry.get(task_name)
            except TaskNotFound:
                self._specs[task_name] = None
        return self._specs[task_name]

    def _enforce_limits(self) -> None:
        """Kill the process of every run of this pool past its hard time limit (on the database's clock)."""
        by_pid = {slot.process.pid: slot for slot in self.slots if slot.process is not None}
        running = (
            Invocation.objects.using(self.db)
            .filter(status=Status.RUNNING, runner__supervisor=self.runner, runner__stopped_at__isnull=True,
                    started_at__isnull=False)
            .annotate(now=Now())
            .values_list("pk", "task_name", "runner__pid", "started_at", "now")
        )
        past: list[tuple[int, TaskSpec, Slot, datetime, float]] = []
        for pk, task_name, pid, started_at, now in running:
            spec = self._spec(task_name)
            if spec is None or not spec.kill_on_timeout or spec.timeout is None or started_at is None:
                continue
            elapsed = (now - started_at).total_seconds()
            slot = by_pid.get(pid)
            if elapsed >= spec.timeout and slot is not None and slot.process is not None and not slot.killed:
                past.append((pk, spec, slot, started_at, elapsed))
        if not past:
            return
        # Past the limit since its start; but time spent paused (waiting on another invocation) does not count.
        paused = self._paused({pk: started_at for pk, _, _, started_at, _ in past})
        for pk, spec, slot, _, elapsed in past:
            assert spec.timeout is not None
            if elapsed - paused[pk] >= spec.timeout and not slot.killed:
                self._kill_for_limit(slot, pk, spec, elapsed - paused[pk])

    def _paused(self, started: dict[int, datetime]) -> dict[int, float]:
        """Return the seconds each of these running invocations spent PAUSED since its start, from its history.

        Read from the history's stamps, on the database's clock as ``started_at``. They are RUNNING:
        every pause since their start has ended.
        """
        paused = dict.fromkeys(started, 0.0)
        since: dict[int, datetime] = {}
        history = (
            Event.objects.using(self.db)
            .filter(invocation_id__in=started, kind=Event.Kind.TRANSITION)
            .filter(Q(to_status=Status.PAUSED) | Q(from_status=Status.PAUSED))
            .order_by("pk").values_list("invocation_id", "from_status", "to_status", "at")
        )
        for pk, came, went, at in history:
            if at < started[pk]:
                continue  # an earlier attempt's
            if went == Status.PAUSED:
                since[pk] = at
            elif came == Status.PAUSED and pk in since:
                paused[pk] += (at - since.pop(pk)).total_seconds()
        return paused

    def _kill_for_limit(self, slot: Slot, pk: int, spec: TaskSpec, elapsed: float) -> None:
        """Kill ``slot``'s process, record invocation ``pk`` stopped at its limit, and recover the process's other runs."""
        assert slot.process is not None and spec.timeout is not None
        process = slot.process
        logger.warning("invocation #%s of %s worked %.1fs, past its hard time limit of %gs: killing worker "
                       "process %d (pid %s)", pk, spec.name, elapsed, spec.timeout, slot.number, process.pid,
                       extra={"invocation_id": pk, "task": spec.name})
        process.kill()
        process.join()  # reaped: nothing more can be written for it
        slot.killed = True
        invocation = Invocation.objects.using(self.db).select_related("runner").get(pk=pk)
        if invocation.status == Status.RUNNING and invocation.runner is not None:
            exc = TimeLimitExceeded(f"stopped at its time limit of {spec.timeout:g}s: its process was killed")
            outcome = failed(invocation, spec, exc, "",
                             note=f"killed at its time limit of {spec.timeout:g}s (worked {elapsed:.1f}s)")
            owner = invocation.runner
            # As for recovery, a heartbeat interval at most: unrecorded, it is recovered with its process's work.
            faults.retrying(f"record #{pk} stopped at its time limit",
                            lambda: finish(invocation, outcome, owner, using=self.db, thread=invocation.runner_thread),
                            using=self.db, patience=conf.HEARTBEAT_INTERVAL)
        self._recover(process.pid, f"was killed: invocation #{pk} passed its hard time limit of {spec.timeout:g}s")


class Runnable(Protocol):
    """A ``Worker`` or a ``Supervisor``: what ``serve()`` runs."""

    def run(self) -> None: ...

    def stop(self) -> None: ...

    def install_signal_handlers(self) -> None: ...


#: Seconds a runner stopping for a reload gets to finish what it runs; what it has not finished by then is
#: recovered once its lease lapses.
RELOAD_GRACE = 10.0


def serve(runner: Runnable, *, reload: bool) -> None:
    """Run ``runner`` in this process; with ``reload``, restart it whenever code changes (development).

    Through Django's autoreloader, as ``runserver`` does: an outer process
    restarts an inner one, whose main thread watches the files while the
    runner runs in another thread. The inner process's runner stops as on
    SIGTERM (gracefully, for up to ``RELOAD_GRACE`` seconds) before a restart;
    Ctrl-C reaches the inner one alone, which stops as usual.
    """
    if not reload:
        runner.install_signal_handlers()
        runner.run()
        return
    if os.environ.get(autoreload.DJANGO_AUTORELOAD_ENV) != "true":
        # The outer process: it only restarts the inner one, which handles the terminal's Ctrl-C itself.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        autoreload.run_with_reloader(runner.run)
        return
    runner.install_signal_handlers()  # the reloader then takes SIGTERM (sys.exit), which the atexit hook below follows
    done, exiting = threading.Event(), threading.Event()

    def main() -> None:
        try:
            runner.run()
        finally:
            done.set()
            if not exiting.is_set():
                # The reloader's loop in the main thread ends with the runner: its SIGTERM handler exits 0.
                os.kill(os.getpid(), signal.SIGTERM)

    def stop_for_restart() -> None:
        exiting.set()
        if not done.is_set():
            logger.info("stopping for a restart (up to %gs for what is running)", RELOAD_GRACE)
            runner.stop()
            done.wait(RELOAD_GRACE)

    atexit.register(stop_for_restart)
    autoreload.run_with_reloader(main)


class Stoppable(Protocol):
    def stop(self) -> None: ...


def watch_parent(runner: Stoppable, parent: int, interval: float = 1.0) -> threading.Thread:
    """Stop ``runner`` gracefully once process ``parent`` (its supervisor) is gone; return the watching thread."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        logger.error("the supervisor (pid %d) is gone: stopping", parent)
        runner.stop()

    thread = threading.Thread(target=watch, name="keyjobs-parent-watch", daemon=True)
    thread.start()
    return thread


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        return f"on signal {signal.Signals(-code).name}"
    return f"with status {code}"
