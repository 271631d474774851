"""Running a claimed invocation and recording its outcome.

The outcome is recorded in one transaction with the release of its key: the
invocation leaves the owned states and the next parked invocation of its key
is registered again, or neither happens. Recording survives a database
outage: it is retried until it lands, or until the invocation turns out to
belong to another runner (which recovered it while this one was cut off).
"""

import asyncio
import logging
import traceback
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from asgiref.sync import async_to_sync, sync_to_async
from django.db import IntegrityError, transaction

from . import faults, firing, registry, signals, values, waits, workflows
from .claim import Claimer, record_and_claim, wake_next
from .current import Host, Run, running
from .exceptions import (
    ArgumentError,
    Cancelled,
    KeyjobsError,
    NotOwner,
    TimeLimitExceeded,
    WorkflowDiverged,
    dotted_path,
)
from .models import Event, Invocation, Runner, Value
from .spec import TaskSpec
from .status import FINAL, NOW, Status
from .store import store
from .transitions import move, record

logger = logging.getLogger(__name__)

#: Seconds between an async run's looks at whether its cancel was requested.
CANCEL_POLL = 0.2


@dataclass
class Outcome:
    status: Status
    values: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    #: The key's next invocation, handed to this runner thread when the outcome freed the key.
    handed: Invocation | None = None
    #: What the run raised, for whoever is told of the outcome (``signals.invocation_finished``); None for a success.
    exception: BaseException | None = None
    #: A result too large for the row (``values``): stored with the outcome, which refers to it.
    held: Value | None = None
    #: The result itself, when it is ``held``: for the tasks it triggers.
    returned: Any = None

    def written(self) -> dict[str, Any]:
        """Return what the outcome gives its triggers: the values it writes, with the result itself."""
        return self.values if self.held is None else {**self.values, "return_value": self.returned}


def start(invocation: Invocation, runner: Runner, *, using: str, thread: int | None = None) -> bool:
    """Mark a claimed invocation RUNNING; return False if ``runner`` no longer owns it."""
    try:
        moved = move([invocation.pk], Status.RUNNING, using=using, only_from={Status.PENDING}, owner=runner,
                     runner_thread=thread) or _started_already(invocation, runner, using=using, thread=thread)
    except NotOwner:
        return False
    except Exception as exc:
        # A refusal heard after the start landed is no refusal of it.
        if faults.is_transient(exc) or not _started_already(invocation, runner, using=using, thread=thread):
            raise
        moved = True
    if moved:
        invocation.status = Status.RUNNING
        invocation.attempts += 1
    return bool(moved)


def _started_already(invocation: Invocation, runner: Runner, *, using: str, thread: int | None) -> bool:
    """Return whether ``invocation`` is RUNNING on this very thread: a start whose reply was lost, tried again."""
    return Invocation.objects.using(using).filter(pk=invocation.pk, status=Status.RUNNING, runner=runner,
                                                   runner_thread=thread).exists()


def call(run: Run) -> Outcome:
    """Call the run's function; return what to record. Never raises for what the task's code raises.

    Whatever it raises, ``BaseException`` included (``sys.exit()``,
    ``KeyboardInterrupt``, ``GeneratorExit``, an ``asyncio.CancelledError``),
    ends the run FAILED (or RETRY) with its class path and traceback: the
    thread goes on, and the invocation's key frees. A ``KeyboardInterrupt``
    here can only come from the task's code: a signal reaches a runner's main
    thread, which only waits (``Worker.install_signal_handlers``), never a
    runner thread.
    """
    invocation = run.invocation
    task: TaskSpec | None = None
    try:
        task = registry.get(invocation.task_name)
        _check_stored_call(invocation)
        signals.invocation_started.send(sender=task, invocation=invocation)
        if run.workflow is not None:
            value = run.workflow.run(task.func, invocation.args, invocation.kwargs)
        elif task.is_async:
            value = async_to_sync(_call_async)(task, run)
        else:
            value = task.func(*invocation.args, **invocation.kwargs)
        worked = run.clock.worked()  # paused time is not counted
        if task.timeout is not None and worked > task.timeout:
            raise TimeLimitExceeded(f"ran {worked:.1f}s, over its time limit of {task.timeout:g}s")
        large = values.outline_result(value, values.check_result(value, where=invocation.task_name))
    except BaseException as exc:
        if isinstance(exc, workflows.Suspended):
            # Not an outcome: the workflow's run ends here, and it is recorded suspended (see _execute).
            return Outcome(Status.PAUSED, note=exc.why, exception=exc)
        if isinstance(exc, Cancelled):
            return Outcome(Status.CANCELLED, _failure(exc, traceback.format_exc()), "stopped for a cancel request",
                           exception=exc)
        return failed(invocation, task, exc, traceback.format_exc())
    if large is not None:
        return Outcome(Status.SUCCESS, {"return_value": None, "result_value_id": large.digest},
                       held=Value(digest=large.digest, data=large.data, size=large.size), returned=value)
    return Outcome(Status.SUCCESS, {"return_value": value})


def failed(
    invocation: Invocation, task: TaskSpec | None, exc: BaseException, formatted: str, note: str = ""
) -> Outcome:
    """Return the outcome of a run that raised ``exc``: RETRY while the task's retries allow, else FAILED."""
    failure = _failure(exc, formatted)
    # A diverged workflow would diverge again: its code, not the moment, is wrong.
    if (task is not None and isinstance(exc, task.retry_for) and not isinstance(exc, WorkflowDiverged)
            and invocation.attempts <= task.max_retries):
        delay = task.retry_delay(invocation.attempts)
        failure["run_after"] = NOW + timedelta(seconds=delay)  # the database's clock, when it is recorded
        return Outcome(Status.RETRY, failure, f"{note}{'; ' if note else ''}attempt {invocation.attempts} of "
                                              f"{task.max_retries + 1} failed; next in {delay:.1f}s", exception=exc)
    return Outcome(Status.FAILED, failure, note, exception=exc)


def _check_stored_call(invocation: Invocation) -> None:
    # The database only guarantees JSON; a row written around keyjobs may hold the wrong shape,
    # and f(*"text") would quietly call f with characters.
    if not isinstance(invocation.args, list):
        raise ArgumentError(f"its stored args are a JSON {type(invocation.args).__name__}, not a list")
    if not isinstance(invocation.kwargs, dict):
        raise ArgumentError(f"its stored kwargs are a JSON {type(invocation.kwargs).__name__}, not an object")


async def _call_async(task: TaskSpec, run: Run) -> Any:
    # A coroutine can really be stopped, unlike a thread: at its time limit, and when its cancel is requested.
    invocation = run.invocation
    work = asyncio.ensure_future(task.func(*invocation.args, **invocation.kwargs))
    watch = asyncio.ensure_future(_watch(run, work, task.timeout))
    try:
        return await work
    except asyncio.CancelledError:
        stopped = watch.result() if watch.done() and not watch.cancelled() else None
        if stopped == _AT_LIMIT:
            raise TimeLimitExceeded(f"cancelled at its time limit of {task.timeout:g}s") from None
        if stopped == _FOR_CANCEL:
            raise Cancelled("cancelled while it ran: the coroutine was stopped") from None
        raise
    finally:
        watch.cancel()


#: Why ``_watch`` stopped a coroutine.
_AT_LIMIT, _FOR_CANCEL = "at its time limit", "for a cancel request"


async def _watch(run: Run, work: "asyncio.Future[Any]", limit: float | None) -> str | None:
    """Cancel ``work`` at the run's time limit (its working time, ``Run.clock``) or once its cancel is requested.

    Return why it cancelled it, or None if ``work`` ended by itself.
    """
    requested = sync_to_async(lambda: run.cancel_requested)
    while not work.done():
        left = None if limit is None else limit - run.clock.worked()
        if left is not None and left <= 0:
            work.cancel()
            return _AT_LIMIT
        await asyncio.sleep(CANCEL_POLL if left is None else min(CANCEL_POLL, left))
        if not work.done() and await requested():
            work.cancel()
            return _FOR_CANCEL
    return None


def _failure(exc: BaseException, formatted: str) -> dict[str, Any]:
    """Return the fields that record ``exc``, made storable: whatever the task raised, its failure can be written."""
    try:
        message = str(exc)
    except Exception:
        message = "(its message could not be read)"
    ours = isinstance(exc, KeyjobsError)
    return {
        "error": values.storable_text(message if ours else f"{type(exc).__qualname__}: {message}"),
        "error_type": values.storable_text(dotted_path(type(exc)), limit=255),
        # keyjobs' own errors say all there is to say, except where the run itself was stopped.
        "traceback": "" if ours and not isinstance(exc, TimeLimitExceeded) else values.storable_text(formatted),
    }


def finish(
    invocation: Invocation,
    outcome: Outcome,
    runner: Runner,
    *,
    using: str,
    thread: int | None = None,
    claimer: Claimer | None = None,
) -> Status | None:
    """Record ``outcome``, free the invocation's key and wake who waits for it.

    Return the status recorded (a retry refused by the registration guard is
    recorded as FAILED), or None if ``runner`` does not own the invocation any
    more. With a ``claimer`` (the thread, which claims next), the next invocation of the key, or for work
    without a key the queue's next where the database can claim it in the
    same statement, may be handed to it: it is then in ``outcome.handed``,
    RUNNING.
    """
    if claimer is not None and not claimer.goes_on():
        claimer = None
    # Only what this attempt handed over, and only once its outermost transaction is over: a hand-off rolled
    # back with its outcome (or kept from an earlier attempt) gave this thread nothing, and running it would run
    # a call whose key is someone else's. One committed but not acknowledged is found again (``adopt``).
    outcome.handed = None
    with store(using).writing():
        if outcome.held is None:
            status, handed = _finish(invocation, outcome, runner, using=using, thread=thread, claimer=claimer)
        else:
            # A large result is stored in the outcome's transaction: both commit, or neither.
            with transaction.atomic(using=using):
                store(using).hold_values([outcome.held])
                status, handed = _finish(invocation, outcome, runner, using=using, thread=thread, claimer=claimer)
    outcome.handed = handed
    return status


def _finish(
    invocation: Invocation, outcome: Outcome, runner: Runner, *, using: str, thread: int | None, claimer: Claimer | None
) -> tuple[Status | None, Invocation | None]:
    """Record ``outcome``; return the status recorded (None if not this runner's any more) and what was handed."""
    handed = None
    try:
        done = None
        triggering = bool(firing.triggered_by(invocation.task_name, outcome.status))
        if (claimer is not None and invocation.running_key is None and outcome.status != Status.RETRY
                and not triggering):
            # Nothing to release: where the database can, one statement records the outcome and
            # claims the thread's next invocation.
            done = record_and_claim(invocation, outcome.status, values=outcome.values, note=outcome.note,
                                    claimer=claimer, using=using)
        if done is not None:
            moved, taken = done
            handed = taken[0] if taken else None
        else:
            moved, outcome, handed = _record(invocation, outcome, runner, using=using, thread=thread,
                                             claimer=claimer, triggering=triggering)
    except NotOwner:
        return None, None
    if not moved:
        recorded = _recorded_already(invocation, runner, using=using, thread=thread)
        if recorded is None:
            return None, None
        if recorded != outcome.status:  # the first try's outcome landed, and its reply was lost
            outcome = Outcome(recorded, note=outcome.note)
    invocation.status = outcome.status
    if outcome.status in FINAL:
        waits.finished(invocation, using=using)
    signals.invocation_finished.send(sender=Invocation, invocation=invocation, status=outcome.status,
                                     exception=outcome.exception)
    return outcome.status, handed


def _recorded_already(invocation: Invocation, runner: Runner, *, using: str, thread: int | None) -> Status | None:
    """Return the outcome this thread recorded for ``invocation``, if that was its last change; else None.

    A recording whose reply was lost is tried again, and finds the
    invocation moved already: by itself (its own success, whatever the reply
    said), or by someone else who took it (recovery).
    """
    row = Invocation.objects.using(using).filter(pk=invocation.pk, runner=runner).values_list("status").first()
    if row is None or row[0] not in (*FINAL, Status.RETRY):
        return None
    last = (Event.objects.using(using).filter(invocation_id=invocation.pk, kind=Event.Kind.TRANSITION)
            .order_by("-pk").values_list("from_status", "to_status", "runner_id", "runner_thread").first())
    if last != (Status.RUNNING, row[0], runner.pk, thread):
        return None
    return Status(row[0])


def _record(
    invocation: Invocation, outcome: Outcome, runner: Runner, *, using: str, thread: int | None, claimer: Claimer | None,
    triggering: bool = False,
) -> tuple[list[int], Outcome, Invocation | None]:
    """Record ``outcome``, release the key and enqueue what it triggers, in one transaction.

    Return the ids moved, the outcome recorded and the invocation handed to ``claimer``, if any.
    """
    try:
        return _record_once(invocation, outcome, runner, using=using, thread=thread, claimer=claimer,
                            triggering=triggering)
    except IntegrityError:
        if claimer is None:
            raise
        # The key's hand-off to this thread (one statement on PostgreSQL) lost a race for its slot to another
        # runner's claim: the whole transaction is undone. Record again, waking the key's next instead.
        return _record_once(invocation, outcome, runner, using=using, thread=thread, claimer=None,
                            triggering=triggering)


def _record_once(
    invocation: Invocation, outcome: Outcome, runner: Runner, *, using: str, thread: int | None, claimer: Claimer | None,
    triggering: bool,
) -> tuple[list[int], Outcome, Invocation | None]:
    # Without a key, a retry to guard or a trigger to fire there is only the outcome: one
    # statement where the database has it, no transaction around.
    needs_transaction = invocation.running_key is not None or outcome.status == Status.RETRY or triggering
    handed = None
    with transaction.atomic(using=using) if needs_transaction else nullcontext():
        if outcome.status == Status.RETRY:
            try:
                with transaction.atomic(using=using):  # a savepoint: the registration guard may refuse
                    moved = move([invocation.pk], Status.RETRY, using=using, only_from={Status.RUNNING},
                                 owner=runner, runner_thread=thread, values=outcome.values, note=outcome.note)
                    if moved:
                        # The row keeps only the last failure: the history keeps each attempt's.
                        record(invocation, Event.Kind.ERROR, using=using, runner=runner,
                               note=f"{outcome.values['error_type']}\n{outcome.values['traceback'] or outcome.values['error']}")
            except IntegrityError:
                # A duplicate registered while this one ran is waiting: it will make the same call.
                outcome = Outcome(Status.FAILED, {k: v for k, v in outcome.values.items() if k != "run_after"},
                                  "not retried: a waiting duplicate takes its place", exception=outcome.exception)
        if outcome.status != Status.RETRY:
            moved = move([invocation.pk], outcome.status, using=using, only_from={Status.RUNNING}, owner=runner,
                         runner_thread=thread, values=outcome.values, note=outcome.note)
        if moved:
            # Only the run that moved the invocation fires: a retried recording finds it moved already.
            firing.fire(invocation, outcome.status, outcome.written(), using=using)
            handed = wake_next(invocation.task_name, invocation.running_key, using=using,
                               runner=runner, claimer=claimer).handed
    return moved, outcome, handed


def execute(
    invocation: Invocation,
    runner: Runner,
    *,
    using: str,
    thread: int | None = None,
    keep_trying: Callable[[], bool] = lambda: True,
    claimer: Claimer | None = None,
    handed: list[Invocation] | None = None,
    host: Host | None = None,
) -> Status | None:
    """Start (unless the claim did), call and finish one claimed invocation: one ``Run``.

    Return the status recorded, or None if the invocation was taken away.
    With a ``claimer``, an invocation handed over when the key freed is appended
    to ``handed``, RUNNING: the caller runs it next. A step the database
    refuses for good ends the invocation FAILED with the reason, never the
    thread. The run is the run in progress (``keyjobs.current``) from its
    start to its outcome, and ``host`` (the runner) is told when it begins and
    ends; while the run waits on another invocation it is PAUSED, and ``host``
    may lend its thread slot (``keyjobs.waits``).
    """
    run = Run(invocation, runner, using, thread, host,
              workflow=workflows.replay_for(invocation, runner, using=using, thread=thread))
    if host is not None:
        host.began(run)
    try:
        with running(run):
            return _execute(run, keep_trying=keep_trying, claimer=claimer, handed=handed)
    finally:
        if host is not None:
            host.ended(run)


def _execute(
    run: Run, *, keep_trying: Callable[[], bool], claimer: Claimer | None, handed: list[Invocation] | None
) -> Status | None:
    invocation, runner, using, thread = run.invocation, run.runner, run.using, run.thread
    try:
        started = invocation.status == Status.RUNNING or faults.retrying(
            f"start #{invocation.pk}", lambda: start(invocation, runner, using=using, thread=thread),
            using=using, keep_trying=keep_trying,
        )
    except Exception as exc:
        refused = _refused(exc, "its start", invocation)

        def fail_unstarted() -> list[int]:
            with transaction.atomic(using=using):
                moved = move([invocation.pk], Status.FAILED, using=using, only_from={Status.PENDING}, owner=runner,
                             runner_thread=thread, values=refused.values, note=refused.note)
                if moved:
                    wake_next(invocation.task_name, invocation.running_key, using=using, runner=runner)
            return moved

        moved = faults.retrying(f"record the refused start of #{invocation.pk}", fail_unstarted, using=using,
                                keep_trying=keep_trying)
        return Status.FAILED if moved else None
    if not started:
        logger.warning("invocation #%s was taken from %s before it started", invocation.pk, runner,
                       extra=invocation.log_extra())
        return None
    unreadable: Outcome | None = None
    if invocation.arguments_value_id is not None:
        try:
            if faults.retrying(f"read the arguments of #{invocation.pk}", lambda: _read_arguments(invocation, using),
                               using=using, keep_trying=keep_trying) is None:
                return None  # given up: its runner stops, and recovery takes it up
        except Exception as exc:
            # The value is gone, or the database refuses to read it: a retry brings it back no more than a
            # run would, so the run ends here, with why.
            unreadable = failed(invocation, None, exc, traceback.format_exc())
    # The task's own code holds no connection of keyjobs': busy threads share a pool's connections.
    store(using).let_go()
    try:
        # Its runner may hold it back first, PAUSED (a run recovered after a death runs alone), until its outcome
        # is recorded: a death after its code returned is not its own.
        with run.host.calls(run) if run.host is not None else nullcontext():
            return _call_and_record(run, unreadable, keep_trying=keep_trying, claimer=claimer, handed=handed)
    except NotOwner:
        logger.warning("invocation #%s was taken from %s while it waited for its turn", invocation.pk, runner,
                       extra=invocation.log_extra())
        return None


def _call_and_record(
    run: Run, unreadable: Outcome | None, *, keep_trying: Callable[[], bool], claimer: Claimer | None,
    handed: list[Invocation] | None,
) -> Status | None:
    invocation, runner, using, thread = run.invocation, run.runner, run.using, run.thread
    outcome = call(run) if unreadable is None else unreadable
    if run.workflow is not None and isinstance(outcome.exception, workflows.Suspended):
        suspension, replay = outcome.exception, run.workflow
        try:
            suspended = faults.retrying(f"suspend #{invocation.pk}", lambda: replay.suspend(suspension),
                                        using=using, keep_trying=keep_trying)
        except Exception as exc:
            outcome = _refused(exc, "its suspension", invocation)
        else:
            if not suspended:
                logger.warning("workflow #%s was taken from %s while it ran; its suspension is discarded",
                               invocation.pk, runner, extra=invocation.log_extra())
            return Status.PAUSED if suspended else None
    if invocation.status == Status.PAUSED:
        # Its wait's resume was refused, and the run went on to its end: its outcome is recorded from RUNNING.
        try:
            waits.resume(run, "its run ended while it was paused")
        except Exception:
            logger.exception("could not take up #%s again to record its outcome", invocation.pk,
                             extra=invocation.log_extra())
            return None

    def attempt() -> Status | None:
        try:
            return finish(invocation, outcome, runner, using=using, thread=thread, claimer=claimer)
        except Exception:
            # It may have committed, and what it handed this thread with it: the thread looks for that (``adopt``).
            if claimer is not None:
                claimer.in_doubt = True
            raise

    def record() -> Status | None:
        # As long as the runner holds its work: once declared lost, its outcome is not its to record.
        return faults.retrying(f"record the outcome of #{invocation.pk}", attempt, using=using,
                               keep_trying=keep_trying)

    try:
        finished = record()
    except Exception as exc:
        # Retrying would fail the same way for ever: record why, through the same finish(),
        # so that the key frees and the thread takes its next invocation.
        outcome = _refused(exc, f"its outcome ({outcome.status})", invocation)
        finished = record()
    if outcome.handed is not None and handed is not None:
        handed.append(outcome.handed)
    if not finished:
        logger.warning("invocation #%s was taken from %s while it ran; its outcome is discarded",
                       invocation.pk, runner, extra=invocation.log_extra())
    return finished


def _read_arguments(invocation: Invocation, using: str) -> bool:
    """Put an invocation's out-of-line arguments back in its ``args`` and ``kwargs``: the call as it was made."""
    invocation.args, invocation.kwargs = invocation.call_arguments(using)
    return True


def _refused(exc: Exception, what: str, invocation: Invocation) -> Outcome:
    """Return the FAILED outcome that records the database's refusal (``exc``) to store ``what``."""
    reason = faults.reason(exc, what=what)
    logger.error("the database refused %s of invocation #%s, which ends FAILED: %s", what, invocation.pk,
                 reason, exc_info=exc, extra=invocation.log_extra())
    return Outcome(Status.FAILED, {**_failure(exc, traceback.format_exc()), "error": reason},
                   "the database refused to store " + what, exception=exc)


def give_back(invocations: list[Invocation], runner: Runner, *, using: str) -> list[int]:
    """Return claimed invocations that were never started to REGISTERED (a stopping runner's prefetch)."""
    pending = [inv for inv in invocations if inv.status == Status.PENDING]
    with transaction.atomic(using=using):
        moved = move([inv.pk for inv in pending], Status.REGISTERED, using=using, only_from={Status.PENDING},
                     owner=runner, note="given back: its runner stopped before starting it")
        for invocation in pending:
            wake_next(invocation.task_name, invocation.running_key, using=using, runner=runner)
    return moved


#: The note of an invocation given back by the in-doubt sweep.
UNHELD = "given back: its runner owned it, but no thread of it held it (a step's reply was lost)"


def give_back_unheld(owned: Mapping[int, str], runner: Runner, *, using: str) -> list[int]:
    """Give back what ``runner`` owns and none of its threads holds (id to status, as seen); return the ids moved.

    The in-doubt sweep's step (``duties.GiveBackUnheld``): what a step whose
    reply was lost took, and no thread took back. Each goes back to the queue
    in a transaction of its own, if still as it was seen and ``runner``'s;
    one whose cancel was requested is CANCELLED instead, and one whose
    duplicate waits already is FAILED, as a dead runner's work would be.
    """
    given: list[int] = []
    for pk, status in owned.items():
        with transaction.atomic(using=using):
            row = (Invocation.objects.using(using).filter(pk=pk)
                   .values_list("task_name", "running_key", "cancel_requested").first())
            if row is None:
                continue
            task_name, running_key, cancel_requested = row
            common: dict[str, Any] = {"using": using, "only_from": {status}, "owner": runner}
            if cancel_requested:
                moved = move([pk], Status.CANCELLED, note=f"{UNHELD}; cancelled, as asked",
                             values={"error": "Cancelled before it ran", "waiting_on": None}, **common)
            else:
                try:
                    with transaction.atomic(using=using):  # a savepoint: the registration guard may refuse
                        moved = move([pk], Status.REGISTERED, note=UNHELD,
                                     values={"slot": 0, "run_after": None, "waiting_on": None}, **common)
                except IntegrityError:
                    moved = move([pk], Status.FAILED, note=f"{UNHELD}; a waiting duplicate runs instead",
                                 values={"error": "given back unrun; a waiting duplicate runs instead",
                                         "waiting_on": None}, **common)
            if moved:
                wake_next(task_name, running_key, using=using, runner=runner)
            given += moved
    if given:
        logger.warning("%s gave back %d invocation(s) it owned and no thread of it held", runner, len(given),
                       extra={"runner_id": runner.pk, "invocation_ids": given})
    return given
