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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType

from django.db import DatabaseError, connections, transaction
from django.db.models import Exists, OuterRef
from django.db.models.functions import Now

from . import faults, waits, workflows
from .claim import Claimer, adopt, claim, releases
from .conf import conf
from .current import Run
from .duties import Duties
from .exceptions import dotted_path
from .execute import execute, give_back
from .models import Invocation, KeyControl, Runner
from .recovery import recover_lost_runners
from .status import Status
from .store import store
from .values import storable_text

logger = logging.getLogger(__name__)


#: Seconds a waiting thread keeps its connection where there is no pool to give it back to: a
#: connection is costly to make again, and a thread woken within this keeps it.
IDLE_CONNECTION_GRACE = 5.0

#: Unexpected errors in a row after which a runner thread gives up, and the runner stops claiming.
_FAILURES_IN_A_ROW = 5


def keep_usable_connections() -> None:
    """Close this thread's connections that are broken, or older than a ``CONN_MAX_AGE`` above 0; keep the others.

    Django's ``close_old_connections()`` closes every connection under
    ``CONN_MAX_AGE = 0``, its default, meant for a request: a runner thread,
    which queries all the time, would reconnect at each look, paying a new
    server process and its prepared statements every heartbeat. A positive
    age is honoured; 0 keeps a usable connection for as long as it works.
    """
    for connection in connections.all(initialized_only=True):
        if connection.settings_dict.get("CONN_MAX_AGE") == 0:
            connection.close_at = None
        connection.close_if_unusable_or_obsolete()


class Alone:
    """The runs in progress in a process, and the one recovered run that goes alone among them.

    A process that died while several runs were in it does not say which one
    killed it (a segfault, an out-of-memory kill), so each of them counts the
    death (``keyjobs.recovery``). Run again alone in its process, a recovered
    run's next death is its own: a poison pill uses up its
    ``max_recoveries``, and the process-mates it took along are not blamed
    twice.

    Each runner thread is *in* from before it claims until its claimed work
    is recorded (``enter()``, ``leave()``), but not while its run is paused:
    so a recovered run that goes alone (``go_alone()``) has no other run
    RUNNING beside it until its own outcome is recorded, and threads claim
    nothing meanwhile. It waits for its turn PAUSED (``Worker.calls``): a
    death meanwhile is not counted against it, nor the wait against its
    time limits.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        #: Runner threads in, each with its claimed work: at most one of them alone.
        self._in = 0
        #: Recovered runs waiting to go alone: threads wait behind them, so that they get their turn.
        self._asking = 0
        self._alone: Run | None = None

    def enter(self) -> None:
        """Come in to claim and run work (a thread, or a paused run going on); wait while a run goes alone."""
        with self._changed:
            self._changed.wait_for(lambda: self._alone is None and not self._asking)
            self._in += 1

    def leave(self, run: Run | None = None) -> None:
        """Go out: the thread's claimed work is recorded (or ``run`` pauses)."""
        with self._changed:
            self._in -= 1
            if run is not None and self._alone is run:
                self._alone = None
            self._changed.notify_all()

    def alone_at_once(self, run: Run) -> bool:
        """Make ``run`` (whose thread is in) the one alone if nothing else is in; return whether it is."""
        with self._changed:
            if self._in == 1 and self._alone is None:
                self._alone = run
            return self._alone is run

    def go_alone(self, run: Run, *, out: bool = False) -> None:
        """Wait, out, until nothing else is in, then come (back) in alone; ``out``: ``run``'s thread is not in."""
        with self._changed:
            self._in -= not out
            self._asking += 1
            self._changed.notify_all()
            try:
                self._changed.wait_for(lambda: self._in == 0 and self._alone is None)
            finally:
                self._asking -= 1
            self._in += 1
            self._alone = run

    def done(self, run: Run) -> None:
        """``run``'s outcome is recorded: the others may come in (its thread stays in)."""
        with self._changed:
            if self._alone is run:
                self._alone = None
                self._changed.notify_all()


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
        #: What each runner thread is running now, by thread number: the run in progress in that thread.
        self.running: dict[int, Run] = {}
        #: The runner threads alive, by number: ``threads`` of them, plus one lent for each paused run.
        self._pool: dict[int, threading.Thread] = {}
        #: Runs paused in a wait (``keyjobs.waits``), each lending its thread's slot.
        self._paused = 0
        #: What each runner thread claimed and has not started yet (its current batch's rest).
        self._claimed: dict[int, list[Invocation]] = {}
        #: When the threads look for suspended workflows that are due (``keyjobs.workflows``).
        self._resumes = workflows.Resumes(self.poll_interval)
        self._alone = Alone()
        #: Held while a thread takes back what a step whose reply was lost gave it (``claim.adopt``), and while the
        #: in-doubt sweep gives back what no thread holds (``holding``): never both at once.
        self._doubts = threading.Lock()
        #: What threads took back that way and have not begun to run yet.
        self._adopted: set[int] = set()

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
        logger.info("%s started with %d thread(s) on %s", self.runner, self.threads,
                    ", ".join(self.queues) or "every queue", extra={"runner_id": self.runner.pk})
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
            logger.info("%s stopped%s", self.runner, " (lost its lease)" if self.lost else "",
                        extra={"runner_id": self.runner.pk})

    def _mark_stopped(self) -> None:
        """Mark the runner stopped, unless it leaves work it still owns (an outcome it could not record).

        Recovery takes back the work of silent runners only: a runner marked
        stopped would keep such work, and its key, for ever. Left unmarked, its
        lease lapses and another runner recovers what it owned.
        """
        assert self.runner is not None
        try:
            if Invocation.objects.using(self.using).owned().filter(runner=self.runner).exists():
                logger.error("%s stops while it still owns invocations; it is left for recovery once "
                             "its lease (%gs) lapses", self.runner, self.lease, extra={"runner_id": self.runner.pk})
                return
            Runner.objects.using(self.using).filter(pk=self.runner.pk).update(stopped_at=Now(), heartbeat_at=Now())
        except DatabaseError as exc:
            logger.warning("could not mark %s stopped (%s); its lease will lapse", self.runner, exc,
                           extra={"runner_id": self.runner.pk})

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
            logger.warning("second %s, exiting at once", signal.Signals(signum).name)
            os._exit(128 + signum)
        logger.info("%s: finishing running invocations, then stopping (again to exit at once)",
                    signal.Signals(signum).name)
        self.stop()

    # -- threads ----------------------------------------------------------

    def held(self) -> set[int]:
        """Return the invocations this runner's threads hold: running, claimed and not started, or taken back."""
        held = {run.invocation.pk for run in list(self.running.values())} | self._adopted
        for claimed in list(self._claimed.values()):
            held.update(invocation.pk for invocation in list(claimed))
        return held

    @contextmanager
    def holding(self) -> Iterator[set[int]]:
        """While the block runs, no thread takes back work it did not hear of; yield what the threads hold."""
        with self._doubts:
            yield self.held()

    def _adopt(self, number: int, besides: Sequence[Invocation] = ()) -> list[Invocation]:
        """Return what thread ``number`` owns and does not hold (nor ``besides``): a step whose reply was lost took it."""
        assert self.runner is not None
        with self._doubts:
            found = adopt(Claimer(self.runner, number, self.queues), using=self.using,
                          besides=self.held() | {invocation.pk for invocation in besides})
            self._adopted.update(invocation.pk for invocation in found)
        if found:
            logger.warning("thread %d takes back %d invocation(s) claimed for it by a step whose reply was lost",
                           number, len(found), extra={"runner_id": self.runner.pk,
                                                      "invocation_ids": [inv.pk for inv in found]})
        return found

    def _start_thread(self, number: int) -> None:
        # Called with self._work held.
        thread = threading.Thread(target=self._thread_main, args=(number,), name=f"keyjobs-runner-{number}",
                                  daemon=True)
        self._pool[number] = thread
        thread.start()

    def _claiming(self) -> bool:
        # A stopping runner still runs what its paused runs wait for, or they could never end.
        return not self.stopping.is_set() or self._paused > 0

    def began(self, run: Run) -> None:
        """Note the run a thread began (``current.Host``)."""
        if run.thread is not None:
            self.running[run.thread] = run
        self._adopted.discard(run.invocation.pk)

    def ended(self, run: Run) -> None:
        """Forget the run a thread ended (``current.Host``)."""
        if run.thread is not None and self.running.get(run.thread) is run:
            del self.running[run.thread]

    @contextmanager
    def calls(self, run: Run) -> Iterator[None]:
        """Call a run and record its outcome inside: alone in this process if it was recovered after a death."""
        if not run.invocation.recoveries:
            yield
            return
        if not self._alone.alone_at_once(run):
            try:
                with waits.held_back(run, "recovered after its runner died, it waits to run alone in its process"):
                    self._alone.go_alone(run)
            except BaseException:
                self._alone.done(run)  # taken away meanwhile (NotOwner): the others must not wait for it for ever
                raise
        try:
            yield
        finally:
            self._alone.done(run)

    def lend(self, run: Run) -> None:
        """The run pauses: start a thread in its place, and give back what its thread claimed and not started."""
        self._alone.leave(run)
        with self._work:
            self._paused += 1
            if len(self._pool) - self._paused < self.threads:
                self._start_thread(min(set(range(len(self._pool) + 1)) - set(self._pool)))
        thread = run.thread
        claimed = self._claimed.get(thread) if thread is not None else None
        if claimed and self.runner is not None:
            try:
                give_back(list(claimed), self.runner, using=self.using)
            except Exception:
                # They stay this thread's, to run after the paused one: slower, never lost.
                logger.exception("thread %s could not give back what it had claimed", thread)
            else:
                claimed.clear()

    def take_back(self, run: Run) -> None:
        """The run goes on: the thread lent in its place retires once its run ends."""
        with self._work:
            self._paused -= 1
            self._wake_all()  # a stopping runner's idle threads see whether they may end now
        # Still PAUSED meanwhile: waiting here for its turn counts toward no limit, and no death against it.
        if run.invocation.recoveries:
            self._alone.go_alone(run, out=True)
        else:
            self._alone.enter()

    def _retires(self, number: int) -> bool:
        """Return True, and leave the pool, if this thread is one more than the runner's size needs."""
        with self._work:
            if len(self._pool) - self._paused <= self.threads:
                return False
            self._pool.pop(number, None)
            return True

    def _on_wake(self, queue: str) -> None:
        if waits.woke(queue):
            # A child is final: a suspended workflow may wait for it.
            if self._resumes.hint():
                with self._work:
                    self._wakes += 1
                    self._wake_one()
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
        #: Whether the last claim failed: it may have committed, its reply lost.
        in_doubt = False
        try:
            while self._claiming() and not self._retires(number):
                try:
                    if not self._holds_lease():
                        # Cut off for longer than the lease: others may be recovering our work. Claim nothing.
                        self.stopping.wait(self.poll_interval)
                        continue
                    if time.monotonic() - checked > conf.HEARTBEAT_INTERVAL:
                        keep_usable_connections()
                        checked = time.monotonic()
                    # Busy from the claim on: what a claim takes is PENDING or RUNNING, which --burst's
                    # look for work left does not count, so a colleague must not see this thread idle.
                    with self._work:
                        self._busy += 1
                        wakes = self._wakes
                    self._alone.enter()  # not while a recovered run goes alone: nothing runs beside it
                    try:
                        try:
                            # Stopping (still claiming for paused runs): one at a time, started, never given back.
                            prefetch = 1 if self.stopping.is_set() else self.prefetch
                            batch = self._adopt(number) if in_doubt else []
                            in_doubt = False
                            batch = batch or self._resume(number, idle=False) or claim(
                                self.runner, using=self.using, queues=self.queues, thread=number, limit=prefetch,
                                start=prefetch == 1) or self._resume(number, idle=True)
                        except Exception as exc:
                            in_doubt = True
                            if not faults.is_transient(exc):
                                raise
                            logger.warning("thread %d could not claim (%s); retrying in %.1fs", number,
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
                        self._alone.leave()
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
                        logger.critical("%s stops claiming: %s", self.runner, self.stop_reason,
                                        exc_info=exc, extra={"runner_id": self.runner.pk})
                        try:
                            Runner.objects.using(self.using).filter(pk=self.runner.pk).update(
                                stop_reason=self.stop_reason)
                        except Exception:
                            logger.exception("could not record why %s stops", self.runner,
                                             extra={"runner_id": self.runner.pk})
                        self.stop()
                        break
                    logger.exception("thread %d of %s failed (%d time(s) in a row); going on in %.1fs",
                                     number, self.runner, failures, backoff, extra={"runner_id": self.runner.pk})
                    connections[self.using].close()  # whatever state the error left it in
                    self.stopping.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            connections.close_all()
            with self._work:
                if self._pool.get(number) is threading.current_thread():
                    del self._pool[number]

    def _resume(self, number: int, *, idle: bool) -> list[Invocation]:
        """Take a suspended workflow that is due, RUNNING, if it is time to look (``workflows.Resumes``)."""
        assert self.runner is not None
        if self.stopping.is_set() or not self._resumes.due(idle=idle):
            return []
        resumed = workflows.resume(self.runner, using=self.using, queues=self.queues, thread=number)
        return [] if resumed is None else [resumed]

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
                execute(invocation, self.runner, using=self.using, thread=number,
                        keep_trying=lambda: not self.lost, claimer=claimer, handed=handed, host=self)
            except Exception:
                # The thread's loop logs it; what was claimed and not started must not stay owned meanwhile.
                if any(claimed.status == Status.PENDING for claimed in queue):
                    try:
                        give_back(queue, self.runner, using=self.using)
                    except Exception:
                        logger.exception("thread %d could not give back what it had claimed", number)
                raise
            if invocation.parent_id is not None:
                self._resumes.hint()  # its parent may be a suspended workflow
            if claimer.in_doubt:  # its outcome's reply was lost: what was handed with it is found again
                handed += self._adopt(number, besides=handed)
            queue[:0] = handed

    def _count_run(self) -> None:
        """Count a run as it starts; the last of ``max_runs`` stops the runner, so that it is handed nothing more."""
        with self._work:
            self.runs += 1
            if self.max_runs is not None and self.runs >= self.max_runs and not self.stopping.is_set():
                logger.info("%s starts its run %d of --max-tasks-per-child: stopping after it", self.runner,
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
        """Return whether work this runner could claim is left (``--burst`` stops once none is).

        Rows another transaction holds locked are not: a claim skips them (a
        ``delay()`` merging into a waiting call holds it until its caller
        commits, and nothing says when that is), and so does this look.
        """
        invocations = Invocation.objects.using(self.using)
        # Work this process deferred (a full rate window) is work at hand too, though not due yet. The note is
        # only a hint: while no waiting row carries a time, what it noted is gone (cancelled, pruned).
        if releases.next_in() is not None and invocations.filter(
                status=Status.REGISTERED, run_after__isnull=False).exists():
            return True
        # Retries belong to the work at hand; work scheduled for later by the caller does not.
        left = invocations.filter(status__in=[Status.REROUTED, Status.RETRY]) | invocations.filter(
            status=Status.REGISTERED).due()
        # A paused key's work waits for the operator, not for this runner.
        left = left.exclude(Exists(KeyControl.objects.using(self.using).filter(
            task_name=OuterRef("task_name"), running_key=OuterRef("running_key"), paused=True)))
        if self.queues:
            left = left.filter(queue__in=self.queues)
        # A suspended workflow that is due (its child final, its time come) is work at hand; a sleeping one is not.
        if self._resumes.declared() and workflows.any_due(using=self.using, queues=self.queues):
            return True
        with transaction.atomic(using=self.using):
            return left.locked(skip_locked=True).exists()

    def _holds_lease(self) -> bool:
        return time.monotonic() - self._renewed < self.lease

    def renewed(self, at: float) -> None:
        """Note that the lease was renewed at ``at`` (by this process's monotonic clock): a heartbeat sent then landed."""
        self._renewed = max(self._renewed, at)

    def declared_lost(self) -> None:
        """Stop: another runner declared this one lost and recovered its work; outcomes still to come are discarded."""
        self.lost = True
        self.stop()

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
            # Busy while the duties run: a duty holds the rows it moves locked (a retry it registers again, an
            # orphan it wakes), which --burst's look for work left skips, so the pool must not see this as idle.
            with self._work:
                self._busy += 1
            try:
                made_runnable = duties.run_due()
            finally:
                with self._work:
                    self._busy -= 1
            store(self.using).let_go()
            if made_runnable:
                with self._work:
                    self._wake_all()
        connections.close_all()

