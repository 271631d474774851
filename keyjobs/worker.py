"""The worker: a runner row and a pool of threads that claim, execute and record invocations.

Kept apart from the management command so that tests and embedding code can
drive it directly.
"""

import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from types import FrameType

from django.db import DatabaseError, close_old_connections, connections
from django.db.models.functions import Now

from . import faults, registry, waits
from .claim import Claimer, claim, releases
from .conf import conf
from .duties import Duties
from .exceptions import TaskNotFound, dotted_path
from .execute import execute, give_back
from .models import Invocation, Runner
from .recovery import recover_lost_runners
from .status import Status
from .store import store
from .values import storable_text

logger = logging.getLogger("keyjobs.worker")


@dataclass
class Run:
    """What a runner thread is running now: for the duty that flags runs past their time limit."""

    invocation: Invocation
    #: When it began, by this process's monotonic clock.
    began: float
    #: The task's time limit in seconds, if it has one.
    limit: float | None
    flagged: bool = False

#: Seconds a waiting thread keeps its connection where there is no pool to give it back to: a
#: connection is costly to make again, and a thread woken within this keeps it.
IDLE_CONNECTION_GRACE = 5.0

#: Unexpected errors in a row after which a runner thread gives up, and the runner stops claiming.
_FAILURES_IN_A_ROW = 5


class Worker:
    """Run invocations from ``queues`` (all when empty) on ``threads`` threads until stopped."""

    def __init__(
        self,
        *,
        threads: int = 1,
        queues: list[str] | None = None,
        burst: bool = False,
        using: str | None = None,
        poll_interval: float | None = None,
        prefetch: int = 1,
        max_runs: int | None = None,
        supervisor: int | None = None,
    ) -> None:
        if threads < 1:
            raise ValueError("threads must be at least 1")
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        self.threads = threads
        #: Stop gracefully after this many runs (``--max-tasks-per-child``); None for never.
        self.max_runs = max_runs
        self.runs = 0
        #: The runner id of the supervisor that started this process (``keyjobs.supervisor``), if any.
        self.supervisor = supervisor
        #: How many invocations a thread claims at once. One starts its claim at once; more are
        #: claimed PENDING and started one after another (cheaper per invocation for short work).
        self.prefetch = prefetch
        self.queues = list(queues or [])
        self.burst = burst
        self.using = using or conf.DATABASE
        if poll_interval is None:
            # Where the database wakes idle runners itself, polling is only the safety net.
            poll_interval = conf.POLL_INTERVAL
        if poll_interval is None:
            poll_interval = 1.0 if store(self.using).notifies else 0.05
        self.poll_interval = poll_interval
        self.runner: Runner | None = None
        self.stopping = threading.Event()
        self._stopped = threading.Event()
        lock = threading.RLock()  # stop() takes it again inside _idle()
        #: Idle threads wait here, without a database connection (``_idle``).
        self._work = threading.Condition(lock)
        #: The scout waits here, on the same lock: it keeps its connection, so a wake-up goes to it first.
        self._scouting = threading.Condition(lock)
        self._busy = 0
        #: Wake-ups received so far: a thread that was claiming when one came looks again instead of waiting.
        self._wakes = 0
        self._scout: int | None = None
        #: Wake-ups passed to idle threads so far: one that landed as a thread's wait ran out is not lost.
        self._calls = 0
        self._signals = 0
        self.lease = conf.LEASE
        #: Set when another runner declared this one lost and recovered its work.
        self.lost = False
        #: Why the runner stopped claiming by itself (a thread that could not go on); empty otherwise.
        self.stop_reason = ""
        self._renewed = time.monotonic()
        #: What each runner thread is running now, by thread number.
        self.running: dict[int, Run] = {}
        #: The runner threads alive, by number: ``threads`` of them, plus one lent for each paused run.
        self._pool: dict[int, threading.Thread] = {}
        #: Runs paused in a wait (``keyjobs.waits``), each lending its thread's slot.
        self._paused = 0
        #: What each runner thread claimed and has not started yet (its current batch's rest).
        self._claimed: dict[int, list[Invocation]] = {}

    # -- life cycle -------------------------------------------------------

    def run(self) -> None:
        """Register the runner, run until stopped (or, with burst, until nothing is left), then mark it stopped."""
        self.runner = Runner.objects.using(self.using).create(
            host=socket.gethostname(), pid=os.getpid(), threads=self.threads, queues=",".join(self.queues),
            supervisor_id=self.supervisor,
        )
        self.runner.refresh_from_db(fields=["started_at", "heartbeat_at"])
        self._renewed = time.monotonic()
        recover_lost_runners(using=self.using, lease=self.lease, by=self.runner)
        logger.info("keyjobs: %s started with %d thread(s) on %s", self.runner, self.threads,
                    ", ".join(self.queues) or "every queue")
        # The main thread only waits from here on: it holds no connection meanwhile.
        connections[self.using].close()
        housekeeping = threading.Thread(target=self._run_duties, name="keyjobs-duties", daemon=True)
        listener = store(self.using).listen(self._on_wake, self._stopped)
        with self._work:
            for number in range(self.threads):
                self._start_thread(number)
        housekeeping.start()
        try:
            while True:
                with self._work:
                    pool = list(self._pool.values())
                if not pool:
                    break
                pool[0].join(0.2)
        finally:
            self._stopped.set()
            while housekeeping.is_alive():  # it may sleep on this process's deferrals: wake it until it sees the stop
                releases.wake()
                housekeeping.join(0.05)
            if listener is not None:
                listener.join(2)
            if not self.lost:
                self._mark_stopped()
            connections[self.using].close()
            logger.info("keyjobs: %s stopped%s", self.runner, " (lost its lease)" if self.lost else "")

    def _mark_stopped(self) -> None:
        """Mark the runner stopped, unless it leaves work it still owns (an outcome it could not record).

        Recovery takes back the work of silent runners only: a runner marked
        stopped would keep such work, and its key, for ever. Left unmarked, its
        lease lapses and another runner recovers what it owned.
        """
        assert self.runner is not None
        try:
            if Invocation.objects.using(self.using).owned().filter(runner=self.runner).exists():
                logger.error("keyjobs: %s stops while it still owns invocations; it is left for recovery once "
                             "its lease (%gs) lapses", self.runner, self.lease)
                return
            Runner.objects.using(self.using).filter(pk=self.runner.pk).update(stopped_at=Now(), heartbeat_at=Now())
        except DatabaseError as exc:
            logger.warning("keyjobs: could not mark %s stopped (%s); its lease will lapse", self.runner, exc)

    def stop(self) -> None:
        """Stop claiming; invocations already running finish first."""
        self.stopping.set()
        with self._work:
            self._wake_all()

    def install_signal_handlers(self) -> None:
        """First SIGINT/SIGTERM: stop gracefully. Second: exit at once."""
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            logger.warning("keyjobs: second %s, exiting at once", signal.Signals(signum).name)
            os._exit(128 + signum)
        logger.info("keyjobs: %s: finishing running invocations, then stopping (again to exit at once)",
                    signal.Signals(signum).name)
        self.stop()

    # -- threads ----------------------------------------------------------

    def _start_thread(self, number: int) -> None:
        # Called with self._work held.
        thread = threading.Thread(target=self._thread_main, args=(number,), name=f"keyjobs-runner-{number}",
                                  daemon=True)
        self._pool[number] = thread
        thread.start()

    def _claiming(self) -> bool:
        # A stopping runner still runs what its paused runs wait for, or they could never end.
        return not self.stopping.is_set() or self._paused > 0

    def lend(self, thread: int | None) -> None:
        """The run on ``thread`` pauses: start a thread in its place, and give back what it claimed and not started."""
        with self._work:
            self._paused += 1
            if len(self._pool) - self._paused < self.threads:
                self._start_thread(min(set(range(len(self._pool) + 1)) - set(self._pool)))
        claimed = self._claimed.get(thread) if thread is not None else None
        if claimed and self.runner is not None:
            try:
                give_back(list(claimed), self.runner, using=self.using)
            except Exception:
                # They stay this thread's, to run after the paused one: slower, never lost.
                logger.exception("keyjobs: thread %s could not give back what it had claimed", thread)
            else:
                claimed.clear()

    def take_back(self, thread: int | None) -> None:
        """The run on ``thread`` goes on: the thread lent in its place retires once its run ends."""
        with self._work:
            self._paused -= 1
            self._wake_all()  # a stopping runner's idle threads see whether they may end now

    def _retires(self, number: int) -> bool:
        """Return True, and leave the pool, if this thread is one more than the runner's size needs."""
        with self._work:
            if len(self._pool) - self._paused <= self.threads:
                return False
            self._pool.pop(number, None)
            return True

    def _on_wake(self, queue: str) -> None:
        if waits.woke(queue):
            return
        if not self.queues or queue in self.queues:
            with self._work:
                self._wakes += 1
                self._wake_one()

    def _wake_one(self) -> None:
        """Wake one idle thread: the scout if it waits, as it holds a connection; call with the lock held."""
        self._calls += 1
        if self._scout is not None:
            self._scout = None  # woken: a second wake-up goes to another thread
            self._scouting.notify()
        else:
            self._work.notify()

    def _wake_all(self) -> None:
        self._calls += 1
        self._scouting.notify_all()
        self._work.notify_all()

    def _thread_main(self, number: int) -> None:
        assert self.runner is not None
        pause = 0.1
        checked = time.monotonic()
        #: Unexpected errors of this thread's own loop in a row, and the pause after the last.
        failures, backoff = 0, 0.1
        try:
            while self._claiming() and not self._retires(number):
                try:
                    if not self._holds_lease():
                        # Cut off for longer than the lease: others may be recovering our work. Claim nothing.
                        self.stopping.wait(self.poll_interval)
                        continue
                    # Not on every loop: with CONN_MAX_AGE = 0 (Django's default, meant for
                    # requests) it would reconnect for every invocation.
                    if time.monotonic() - checked > conf.HEARTBEAT_INTERVAL:
                        close_old_connections()
                        checked = time.monotonic()
                    # Busy from the claim on: what a claim takes is PENDING or RUNNING, which --burst's
                    # look for work left does not count, so a colleague must not see this thread idle.
                    with self._work:
                        self._busy += 1
                        wakes = self._wakes
                    try:
                        try:
                            # Stopping (still claiming for paused runs): one at a time, started, never given back.
                            prefetch = 1 if self.stopping.is_set() else self.prefetch
                            batch = claim(self.runner, using=self.using, queues=self.queues, thread=number,
                                          limit=prefetch, start=prefetch == 1)
                        except Exception as exc:
                            if not faults.is_transient(exc):
                                raise
                            logger.warning("keyjobs: thread %d could not claim (%s); retrying in %.1fs", number,
                                           exc, pause)
                            connections[self.using].close()
                            self.stopping.wait(pause)
                            pause = min(pause * 2, 5.0)
                            continue
                        pause = 0.1
                        if batch:
                            with self._work:
                                self._wake_one()  # there may be more: wake a colleague
                            self._run_batch(batch, number)
                    finally:
                        with self._work:
                            self._busy -= 1
                    failures, backoff = 0, 0.1
                    if not batch and self._idle(number, wakes):
                        break
                except Exception as exc:
                    # Not a task's error (execute() records those): a fault of keyjobs or of the
                    # database that a retry does not fix. Log it, and go on while going on helps.
                    failures += 1
                    if failures >= _FAILURES_IN_A_ROW:
                        self.stop_reason = storable_text(
                            f"thread {number} failed {failures} times in a row; the last time: "
                            f"{dotted_path(type(exc))}: {exc}", limit=2000)
                        logger.critical("keyjobs: %s stops claiming: %s", self.runner, self.stop_reason,
                                        exc_info=exc)
                        try:
                            Runner.objects.using(self.using).filter(pk=self.runner.pk).update(
                                stop_reason=self.stop_reason)
                        except Exception:
                            logger.exception("keyjobs: could not record why %s stops", self.runner)
                        self.stop()
                        break
                    logger.exception("keyjobs: thread %d of %s failed (%d time(s) in a row); going on in %.1fs",
                                     number, self.runner, failures, backoff)
                    connections[self.using].close()  # whatever state the error left it in
                    self.stopping.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            connections.close_all()
            with self._work:
                if self._pool.get(number) is threading.current_thread():
                    del self._pool[number]

    def _run_batch(self, batch: list[Invocation], number: int) -> None:
        """Run claimed invocations in order, and what each hands over when it frees its key."""
        assert self.runner is not None
        queue = self._claimed[number] = list(batch)
        while queue:
            invocation = queue.pop(0)
            if self.stopping.is_set() and invocation.status == Status.PENDING:
                give_back([invocation, *queue], self.runner, using=self.using)
                return
            # A hand-off needs a thread that goes on: not one stopping or cut off from the database.
            claimer = Claimer(self.runner, number, self.queues,
                              goes_on=lambda: not self.stopping.is_set() and self._holds_lease())
            handed: list[Invocation] = []
            self._count_run()
            try:
                self.running[number] = Run(invocation, time.monotonic(), _timeout_of(invocation))
                execute(invocation, self.runner, using=self.using, thread=number,
                        keep_trying=lambda: not self.lost, claimer=claimer, handed=handed, lender=self)
            except Exception:
                # The thread's loop logs it; what was claimed and not started must not stay owned meanwhile.
                if any(claimed.status == Status.PENDING for claimed in queue):
                    try:
                        give_back(queue, self.runner, using=self.using)
                    except Exception:
                        logger.exception("keyjobs: thread %d could not give back what it had claimed", number)
                raise
            finally:
                self.running.pop(number, None)
            queue[:0] = handed

    def _count_run(self) -> None:
        """Count a run as it starts; the last of ``max_runs`` stops the runner, so that it is handed nothing more."""
        with self._work:
            self.runs += 1
            if self.max_runs is not None and self.runs >= self.max_runs and not self.stopping.is_set():
                logger.info("keyjobs: %s starts its run %d of --max-tasks-per-child: stopping after it", self.runner,
                            self.runs)
                self.stopping.set()
                self._wake_all()  # the scout too: it waits apart

    def _idle(self, number: int, wakes: int) -> bool:
        """Wait for work; return True when this thread should end.

        ``wakes`` is how many wake-ups had come when this thread last looked:
        one that came while it looked may have been for work it did not see.

        One idle thread (the scout) looks again every poll interval; the others
        wait for a wake-up, which a thread that found work passes on, so that an
        idle pool costs the database one query per interval, not one per thread.

        With Django's pool (``OPTIONS["pool"]``) every waiting thread gives its
        connection back at once. Without one, only the scout keeps its
        connection, and a wake-up goes to it first: the others close theirs
        once idle for ``IDLE_CONNECTION_GRACE``. Either way an idle runner
        holds no connection per thread.
        """
        with self._work:
            if not self._claiming():  # stop() may have notified before this thread began to wait
                return True
            if self._wakes != wakes:
                return False  # woken while claiming: the work may have come after the look
            if self.burst and self._busy == 0 and not self._work_left():
                self.stop()
                return True
            if self._scout is None:
                self._scout = number
                store(self.using).let_go()  # with a pool, a look every poll interval takes one cheaply
                try:
                    self._scouting.wait(self.poll_interval)
                finally:
                    if self._scout == number:
                        self._scout = None
            else:
                calls = self._calls
                if not store(self.using).pooled and (self._work.wait(IDLE_CONNECTION_GRACE) or self._calls != calls):
                    return False
                self.close_connection()
                # Until woken; past the long wait, it looks only if nobody scouts (a look would reconnect).
                while (not self._work.wait(max(self.poll_interval * 20, 1.0)) and self._calls == calls
                       and self._scout is not None):
                    pass
        return False

    def _work_left(self) -> bool:
        # Retries belong to the work at hand; work scheduled for later by the caller does not.
        invocations = Invocation.objects.using(self.using)
        left = invocations.filter(status__in=[Status.REROUTED, Status.RETRY]) | invocations.filter(
            status=Status.REGISTERED).due()
        if self.queues:
            left = left.filter(queue__in=self.queues)
        # Work this process deferred (a full rate window) is work at hand too, though not due yet.
        return releases.next_in() is not None or left.exists()

    def _holds_lease(self) -> bool:
        return time.monotonic() - self._renewed < self.lease

    def renewed(self) -> None:
        """Note that the lease was renewed just now."""
        self._renewed = time.monotonic()

    def close_connection(self) -> None:
        """Drop this thread's connection after a database error: the next query opens a fresh one."""
        connections[self.using].close()

    def _run_duties(self) -> None:
        """Run the timed duties (``keyjobs.duties``) until the runner stops; wake the pool for what they freed."""
        assert self.runner is not None
        duties = Duties(self)
        while not self._stopped.is_set():
            duties.wait()
            if self._stopped.is_set():
                break
            made_runnable = duties.run_due()
            store(self.using).let_go()
            if made_runnable:
                with self._work:
                    self._wake_all()
        connections.close_all()


def _timeout_of(invocation: Invocation) -> float | None:
    try:
        return registry.get(invocation.task_name).timeout
    except TaskNotFound:
        return None
