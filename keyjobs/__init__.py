"""keyjobs: per-key serial task execution for Django, with the database as the coordinator."""

from .concurrency import ConcurrencyControlType, Mode
from .declare import Task, task
from .exceptions import (
    ArgumentError,
    InvalidTransition,
    InvocationDropped,
    InvocationFailed,
    InvocationNotFinished,
    KeyjobsError,
    ResultUnavailable,
    TaskDeclarationError,
    TaskNotFound,
    TimeLimitExceeded,
)
from .status import Status

__all__ = [
    "ArgumentError",
    "ConcurrencyControlType",
    "InvalidTransition",
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
    "task",
]
