"""Running a claimed invocation and recording its outcome.

The outcome is recorded in one transaction with the release of its key: the
invocation leaves the owned states and the next parked invocation of its key
is registered again, or neither happens. Recording survives a database
outage: it is retried until it lands, or until the invocation turns out to
belong to another runner (which recovered it while this one was cut off).
"""

import asyncio
import logging
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

from asgiref.sync import async_to_sync, sync_to_async
from django.db import IntegrityError, connections, transaction
from django.utils import timezone

from . import faults, registry, signals, triggers, values, waits
from .claim import Claimer, record_and_claim, wake_next
from .current import running
from .exceptions import ArgumentError, Cancelled, KeyjobsError, NotOwner, TimeLimitExceeded, dotted_path
from .models import Event, Invocation, Runner
from .spec import TaskSpec
from .status import FINAL, Status
from .store import store
from .transitions import move, record

logger = logging.getLogger("keyjobs.worker")

T = TypeVar("T")

#: Seconds between an async run's looks at whether its cancel was requested.
CANCEL_POLL = 0.2


@dataclass
class Outcome:
    status: Status
    values: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    #: The key's next invocation, handed to this runner thread when the outcome freed the key.
    handed: Invocation | None = None


def start(invocation: Invocation, runner: Runner, *, using: str, thread: int | None = None) -> bool:
    """Mark a claimed invocation RUNNING; return False if ``runner`` no longer owns it."""
    try:
        moved = move([invocation.pk], Status.RUNNING, using=using, only_from={Status.PENDING}, owner=runner,
                     runner_thread=thread)
    except NotOwner:
        return False
    if moved:
        invocation.status = Status.RUNNING
        invocation.attempts += 1
    return bool(moved)


def call(invocation: Invocation) -> Outcome:
    """Call the invocation's function; return what to record. Never raises for the task's own errors."""
    task: TaskSpec | None = None
    began = time.monotonic()
    try:
        task = registry.get(invocation.task_name)
        _check_stored_call(invocation)
        signals.invocation_started.send(sender=task, invocation=invocation)
        token = running.set(invocation)
        try:
            if task.is_async:
                value = async_to_sync(_call_async)(task, invocation)
            else:
                value = task.func(*invocation.args, **invocation.kwargs)
        finally:
            running.reset(token)
        elapsed = time.monotonic() - began
        if task.timeout is not None and elapsed > task.timeout:
            raise TimeLimitExceeded(f"ran {elapsed:.1f}s, over its time limit of {task.timeout:g}s")
        values.check_result(value, where=invocation.task_name)
    except Exception as exc:
        if isinstance(exc, Cancelled):
            return Outcome(Status.CANCELLED, _failure(exc, traceback.format_exc()), "stopped for a cancel request")
        return failed(invocation, task, exc, traceback.format_exc())
    return Outcome(Status.SUCCESS, {"return_value": value})


def failed(invocation: Invocation, task: TaskSpec | None, exc: Exception, formatted: str, note: str = "") -> Outcome:
    """Return the outcome of a run that raised ``exc``: RETRY while the task's retries allow, else FAILED."""
    failure = _failure(exc, formatted)
    if task is not None and isinstance(exc, task.retry_for) and invocation.attempts <= task.max_retries:
        delay = task.retry_delay(invocation.attempts)
        failure["run_after"] = timezone.now() + timedelta(seconds=delay)
        return Outcome(Status.RETRY, failure, f"{note}{'; ' if note else ''}attempt {invocation.attempts} of "
                                              f"{task.max_retries + 1} failed; next in {delay:.1f}s")
    return Outcome(Status.FAILED, failure, note)


def _check_stored_call(invocation: Invocation) -> None:
    # The database only guarantees JSON; a row written around keyjobs may hold the wrong shape,
    # and f(*"text") would quietly call f with characters.
    if not isinstance(invocation.args, list):
        raise ArgumentError(f"its stored args are a JSON {type(invocation.args).__name__}, not a list")
    if not isinstance(invocation.kwargs, dict):
        raise ArgumentError(f"its stored kwargs are a JSON {type(invocation.kwargs).__name__}, not an object")


async def _call_async(task: TaskSpec, invocation: Invocation) -> Any:
    # A coroutine can really be stopped, unlike a thread: at its time limit, and when its cancel is requested.
    run = asyncio.ensure_future(asyncio.wait_for(task.func(*invocation.args, **invocation.kwargs), task.timeout))
    watch = asyncio.ensure_future(_stop_when_cancelled(invocation, run))
    try:
        return await run
    except TimeoutError:
        raise TimeLimitExceeded(f"cancelled at its time limit of {task.timeout:g}s") from None
    except asyncio.CancelledError:
        if watch.done() and not watch.cancelled() and watch.result():
            raise Cancelled("cancelled while it ran: the coroutine was stopped") from None
        raise
    finally:
        watch.cancel()


async def _stop_when_cancelled(invocation: Invocation, run: "asyncio.Future[Any]") -> bool:
    """Cancel ``run`` once ``invocation``'s cancel is requested; return True if it did."""
    requested = sync_to_async(_cancel_requested)
    while not run.done():
        await asyncio.sleep(CANCEL_POLL)
        if await requested(invocation):
            run.cancel()
            return True
    return False


def _cancel_requested(invocation: Invocation) -> bool:
    return Invocation.objects.using(invocation._state.db).filter(pk=invocation.pk, cancel_requested=True).exists()


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
    with store(using).writing():
        return _finish(invocation, outcome, runner, using=using, thread=thread, claimer=claimer)


def _finish(
    invocation: Invocation, outcome: Outcome, runner: Runner, *, using: str, thread: int | None, claimer: Claimer | None
) -> Status | None:
    try:
        done = None
        triggering = bool(triggers.triggered_by(invocation.task_name, outcome.status))
        if (claimer is not None and invocation.running_key is None and outcome.status != Status.RETRY
                and not triggering):
            # Nothing to release: where the database can, one statement records the outcome and
            # claims the thread's next invocation.
            done = record_and_claim(invocation, outcome.status, values=outcome.values, note=outcome.note,
                                    claimer=claimer, using=using)
        if done is not None:
            moved, taken = done
            outcome.handed = taken[0] if taken else None
        else:
            moved, outcome = _record(invocation, outcome, runner, using=using, thread=thread, claimer=claimer,
                                     triggering=triggering)
    except NotOwner:
        return None
    if not moved:
        return None
    invocation.status = outcome.status
    if outcome.status in FINAL:
        waits.finished(invocation, using=using)
    signals.invocation_finished.send(sender=Invocation, invocation=invocation, status=outcome.status)
    return outcome.status


def _record(
    invocation: Invocation, outcome: Outcome, runner: Runner, *, using: str, thread: int | None, claimer: Claimer | None,
    triggering: bool = False,
) -> tuple[list[int], Outcome]:
    """Record ``outcome``, release the key and enqueue what it triggers, in one transaction.

    Return the ids moved and the outcome recorded.
    """
    # Without a key, a retry to guard or a trigger to fire there is only the outcome: one
    # statement where the database has it, no transaction around.
    needs_transaction = invocation.running_key is not None or outcome.status == Status.RETRY or triggering
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
                                  "not retried: a waiting duplicate takes its place")
        if outcome.status != Status.RETRY:
            moved = move([invocation.pk], outcome.status, using=using, only_from={Status.RUNNING}, owner=runner,
                         runner_thread=thread, values=outcome.values, note=outcome.note)
        if moved:
            # Only the run that moved the invocation fires: a retried recording finds it moved already.
            triggers.fire(invocation, outcome.status, outcome.values, using=using)
            outcome.handed = wake_next(invocation.task_name, invocation.running_key, using=using,
                                       runner=runner, claimer=claimer, take=True).handed
    return moved, outcome


def durably(what: str, step: Callable[[], T], *, using: str, keep_trying: Callable[[], bool]) -> T | None:
    """Run a database step until it succeeds, across connection losses; None once ``keep_trying()`` says stop.

    Only what a retry can fix is retried (``faults.is_transient``): anything
    else the database refuses is raised at once, for the caller to record.
    """
    pause = 0.1
    while True:
        try:
            return step()
        except Exception as exc:
            if not faults.is_transient(exc):
                raise
            connections[using].close()
            if not keep_trying():
                logger.error("keyjobs: gave up %s: %s", what, exc)
                return None
            logger.warning("keyjobs: could not %s (%s); retrying in %.1fs", what, exc, pause)
            time.sleep(pause)
            pause = min(pause * 2, 5.0)


def execute(
    invocation: Invocation,
    runner: Runner,
    *,
    using: str,
    thread: int | None = None,
    keep_trying: Callable[[], bool] = lambda: True,
    claimer: Claimer | None = None,
    handed: list[Invocation] | None = None,
    lender: waits.Lender | None = None,
) -> Status | None:
    """Start (unless the claim did), call and finish one claimed invocation.

    Return the status recorded, or None if the invocation was taken away.
    With a ``claimer``, an invocation handed over when the key freed is appended
    to ``handed``, RUNNING: the caller runs it next. A step the database
    refuses for good ends the invocation FAILED with the reason, never the
    thread. While the run waits on another invocation it is PAUSED, and
    ``lender`` (the runner) may lend its thread slot (``keyjobs.waits``).
    """
    try:
        started = invocation.status == Status.RUNNING or durably(
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

        moved = durably(f"record the refused start of #{invocation.pk}", fail_unstarted, using=using,
                        keep_trying=keep_trying)
        return Status.FAILED if moved else None
    if not started:
        logger.warning("keyjobs: invocation #%s was taken from %s before it started", invocation.pk, runner)
        return None
    # The task's own code holds no connection of keyjobs': busy threads share a pool's connections.
    store(using).let_go()
    with waits.running(invocation, runner, using=using, thread=thread, lender=lender):
        outcome = call(invocation)

    def record() -> Status | None:
        return durably(f"record the outcome of #{invocation.pk}",
                       lambda: finish(invocation, outcome, runner, using=using, thread=thread, claimer=claimer),
                       using=using, keep_trying=keep_trying)

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
        logger.warning("keyjobs: invocation #%s was taken from %s while it ran; its outcome is discarded",
                       invocation.pk, runner)
    return finished


def _refused(exc: Exception, what: str, invocation: Invocation) -> Outcome:
    """Return the FAILED outcome that records the database's refusal (``exc``) to store ``what``."""
    reason = faults.reason(exc, what=what)
    logger.error("keyjobs: the database refused %s of invocation #%s, which ends FAILED: %s", what, invocation.pk,
                 reason, exc_info=exc)
    return Outcome(Status.FAILED, {**_failure(exc, traceback.format_exc()), "error": reason},
                   "the database refused to store " + what)


def give_back(invocations: list[Invocation], runner: Runner, *, using: str) -> list[int]:
    """Return claimed invocations that were never started to REGISTERED (a stopping runner's prefetch)."""
    pending = [inv for inv in invocations if inv.status == Status.PENDING]
    with transaction.atomic(using=using):
        moved = move([inv.pk for inv in pending], Status.REGISTERED, using=using, only_from={Status.PENDING},
                     owner=runner, note="given back: its runner stopped before starting it")
        for invocation in pending:
            wake_next(invocation.task_name, invocation.running_key, using=using, runner=runner)
    return moved
