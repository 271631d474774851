"""keyjobs: per-key serial task execution for Django, with the database as the coordinator."""

from .concurrency import ConcurrencyControlType, Mode
from .current import current
from .declare import Task, task
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
    TaskDeclarationError,
    TaskNotFound,
    TimeLimitExceeded,
    WaitRefused,
)
from .status import Status
from .triggers import emit, on_event, on_status

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
    "Task",
    "TaskDeclarationError",
    "TaskNotFound",
    "TimeLimitExceeded",
    "WaitRefused",
    "current",
    "emit",
    "on_event",
    "on_status",
    "task",
]
