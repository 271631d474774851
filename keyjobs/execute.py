"""Running a claimed invocation and recording its outcome.

The outcome is recorded in one transaction with the release of its key: the
invocation leaves the owned states and the next parked invocation of its key
is registered again, or neither happens.
"""

import logging
import traceback
from dataclasses import dataclass, field
from typing import Any

from asgiref.sync import async_to_sync
from django.db import transaction
from django.db.models import F

from . import registry, signals
from .claim import wake_next
from .enqueue import check_json
from .exceptions import KeyjobsError, NotOwner
from .models import Invocation, Runner
from .status import Status
from .transitions import move

logger = logging.getLogger("keyjobs.worker")


@dataclass
class Outcome:
    status: Status
    values: dict[str, Any] = field(default_factory=dict)


def start(invocation: Invocation, runner: Runner, *, using: str, thread: int | None = None) -> bool:
    """Mark a claimed invocation RUNNING; return False if ``runner`` no longer owns it."""
    try:
        return bool(
            move([invocation.pk], Status.RUNNING, using=using, only_from={Status.PENDING}, owner=runner,
                 runner_thread=thread, values={"attempts": F("attempts") + 1})
        )
    except NotOwner:
        return False


def call(invocation: Invocation) -> Outcome:
    """Call the invocation's function; return what to record. Never raises for the task's own errors."""
    try:
        task = registry.get(invocation.task_name)
        signals.invocation_started.send(sender=task, invocation=invocation)
        if task.is_async:
            value = async_to_sync(task.func)(*invocation.args, **invocation.kwargs)
        else:
            value = task.func(*invocation.args, **invocation.kwargs)
        check_json(value, where=invocation.task_name, path="return value", kind="result")
    except KeyjobsError as exc:
        return Outcome(Status.FAILED, {"error": str(exc), "traceback": ""})
    except Exception as exc:
        return Outcome(
            Status.FAILED,
            {"error": f"{type(exc).__qualname__}: {exc}", "traceback": traceback.format_exc()},
        )
    return Outcome(Status.SUCCESS, {"return_value": value})


def finish(invocation: Invocation, outcome: Outcome, runner: Runner, *, using: str, thread: int | None = None) -> bool:
    """Record ``outcome``, free the invocation's key and wake who waits for it; False if not owned any more."""
    try:
        with transaction.atomic(using=using):
            moved = move([invocation.pk], outcome.status, using=using, only_from={Status.RUNNING}, owner=runner,
                         runner_thread=thread, values=outcome.values)
            if moved:
                wake_next(invocation.task_name, invocation.running_key, using=using, runner=runner)
    except NotOwner:
        return False
    if moved:
        signals.invocation_finished.send(sender=Invocation, invocation=invocation, status=outcome.status)
    return bool(moved)


def execute(invocation: Invocation, runner: Runner, *, using: str, thread: int | None = None) -> Status | None:
    """Start, call and finish one claimed invocation; return its final status, None if it was taken away."""
    if not start(invocation, runner, using=using, thread=thread):
        logger.warning("keyjobs: invocation #%s was taken from %s before it started", invocation.pk, runner)
        return None
    outcome = call(invocation)
    if not finish(invocation, outcome, runner, using=using, thread=thread):
        logger.warning("keyjobs: invocation #%s was taken from %s while it ran; its outcome is discarded",
                       invocation.pk, runner)
        return None
    return outcome.status
