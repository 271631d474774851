"""Exceptions raised to the users of keyjobs."""

from typing import Any


def dotted_path(thing: Any) -> str:
    """Return the dotted path of a class or a function (``httpx.ConnectTimeout``): what an error or a task is called."""
    return f"{thing.__module__}.{thing.__qualname__}"


class KeyjobsError(Exception):
    """Base class of every keyjobs error."""


class TaskDeclarationError(KeyjobsError, TypeError):
    """A @task(...) declaration is invalid (raised at import time)."""


class ArgumentError(KeyjobsError, TypeError):
    """delay() was called with arguments the task cannot accept or store."""


class ResultNotStorable(KeyjobsError, TypeError):
    """A task returned a value keyjobs cannot store (see ``keyjobs.values``); its invocation ends FAILED."""


class TaskNotFound(KeyjobsError, LookupError):
    """No task is registered under this name."""


class InvalidTransition(KeyjobsError):
    """A status change the lifecycle does not allow."""


class NotOwner(KeyjobsError):
    """A runner tried to change an invocation it no longer owns."""


class ResultUnavailable(KeyjobsError):
    """The result of an invocation was asked for, but it has none."""


class InvocationFailed(ResultUnavailable):
    """The invocation ended FAILED; ``error`` and ``traceback`` say why."""

    def __init__(self, message: str, *, error: str = "", traceback: str = "") -> None:
        super().__init__(message)
        self.error = error
        self.traceback = traceback


class InvocationDropped(ResultUnavailable):
    """The invocation ended CONCURRENCY_CONTROLLED_FINAL: it never ran."""


class InvocationNotFinished(ResultUnavailable):
    """The invocation has not reached a final status yet."""


class TimeLimitExceeded(KeyjobsError, TimeoutError):
    """A run took longer than its task's ``timeout``."""


class RunnerDied(KeyjobsError):
    """Its runner died while running it more times than its task's ``max_recoveries`` allow: it is not run again."""


class InvocationCancelled(ResultUnavailable):
    """The invocation ended CANCELLED: cancelled before it started, or stopped while it ran."""


class Cancelled(KeyjobsError):
    """Raise it in a running task whose cancel was requested (``keyjobs.current().cancel_requested``): it ends CANCELLED."""


class WaitRefused(KeyjobsError):
    """A wait inside a task that could never end: on its own invocation, in a cycle of waits, or in a transaction."""


class WorkflowError(KeyjobsError):
    """A workflow call (``keyjobs.workflows``) made where it cannot be recorded: outside a workflow, inside a step
    or a transaction."""


class WorkflowDiverged(WorkflowError):
    """A workflow's replay asked, at some position, for another step than the one recorded there: its code changed
    under it. It ends FAILED; ``wf.patched()`` is the way to change the code of a workflow in flight."""


class WorkflowLimitExceeded(WorkflowError):
    """A workflow passed its cap on steps (``KEYJOBS_WORKFLOW_MAX_STEPS``)."""


class StepFailed(WorkflowError):
    """A replayed step's stored exception, when its own class cannot be rebuilt from what was stored."""

    def __init__(self, message: str, *, error_type: str = "") -> None:
        super().__init__(message)
        self.error_type = error_type


class ValueMissing(KeyjobsError, LookupError):
    """An invocation refers to a stored value (a large argument or result) whose row is gone (``keyjobs.values``)."""
