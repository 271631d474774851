"""keyjobs: per-key serial task execution for Django, with the database as the coordinator."""

#: The one version number: pyproject.toml reads it, and so do the docs and CHANGELOG.md's test.
__version__ = "0.1.0.dev0"

from .concurrency import ConcurrencyControlType, Mode
from .current import current
from .declare import Task, task, workflow
from .exceptions import (
    ArgumentError,
    Cancelled,
    InvalidTransition,
    InvocationCancelled,
    InvocationDropped,
    InvocationFailed,
    InvocationNotFinished,
    KeyjobsError,
    ResultUnavailable,
    StepFailed,
    TaskDeclarationError,
    TaskNotFound,
    TimeLimitExceeded,
    WaitRefused,
    WorkflowDiverged,
    WorkflowError,
    WorkflowLimitExceeded,
)
from .firing import emit
from .status import Status
from .triggers import on_event, on_status

__all__ = [
    "ArgumentError",
    "Cancelled",
    "ConcurrencyControlType",
    "InvalidTransition",
    "InvocationCancelled",
    "InvocationDropped",
    "InvocationFailed",
    "InvocationNotFinished",
    "KeyjobsError",
    "Mode",
    "ResultUnavailable",
    "Status",
    "StepFailed",
    "Task",
    "TaskDeclarationError",
    "TaskNotFound",
    "TimeLimitExceeded",
    "WaitRefused",
    "WorkflowDiverged",
    "WorkflowError",
    "WorkflowLimitExceeded",
    "current",
    "emit",
    "on_event",
    "on_status",
    "task",
    "workflow",
]
