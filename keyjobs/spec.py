"""The task spec: everything the engine needs to know of a task, whoever declared it.

``@task`` builds one; so can any other producer (Django's tasks API, a
schedule, the admin). The engine takes nothing else: the registry holds
specs, ``enqueue`` inserts calls of a spec, the runner calls its function.
"""

import functools
import inspect
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from .admission import Policy
from .conf import conf
from .exceptions import dotted_path

if TYPE_CHECKING:
    from .timers import Timer
    from .triggers import Trigger


@dataclass(frozen=True, eq=False)
class TaskSpec:
    """A task as the engine sees it: its name, its function, its policy, and how it is run."""

    name: str
    func: Callable[..., Any]
    policy: Policy = field(default_factory=Policy)
    #: None: ``KEYJOBS_DEFAULT_QUEUE``, read when a call is enqueued.
    default_queue: str | None = None
    priority: int = 0
    max_retries: int = 0
    retry_for: tuple[type[BaseException], ...] = (Exception,)
    retry_backoff: float = 1.0
    retry_backoff_max: float = 300.0
    #: Seconds a run may take; None for no limit.
    timeout: float | None = None
    #: Declared with ``schedule=``: when it runs by itself, with which keyword arguments, and whether
    #: ticks missed while no runner ran are run once (True) or skipped.
    schedule: "Timer | None" = None
    schedule_kwargs: Mapping[str, Any] = field(default_factory=dict)
    schedule_catch_up: bool = True
    #: Declared with ``trigger=``: the outcomes and events that enqueue it (``keyjobs.triggers``).
    triggers: tuple["Trigger", ...] = ()
    #: Stop a run at its ``timeout`` by killing the process that runs it (``runworker --processes``).
    kill_on_timeout: bool = False
    #: Declared with ``@workflow``: its run is replayed from its recorded steps (``keyjobs.workflows``).
    workflow: bool = False
    #: Times a run whose runner died while running it is run again (``keyjobs.recovery``); one more death: FAILED.
    max_recoveries: int = 3
    #: The ``@task`` options it was built from (``keyjobs.options.build_spec``); None for a spec built by hand.
    options: Mapping[str, Any] | None = field(default=None, repr=False)

    @property
    def func_path(self) -> str:
        """The dotted path of the function: what a worker imports."""
        return dotted_path(self.func)

    @property
    def queue(self) -> str:
        return self.default_queue or conf.DEFAULT_QUEUE

    @functools.cached_property
    def signature(self) -> inspect.Signature:
        return inspect.signature(self.func)

    @functools.cached_property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.func)

    def keys_for(self, arguments: Mapping[str, Any]) -> tuple[str | None, str | None]:
        """Return the (running, registration) keys of a call's bound arguments."""
        return self.policy.keys_for(arguments)

    def retry_delay(self, attempt: int) -> float:
        """Return the seconds to wait before attempt ``attempt + 1``: exponential, with full jitter above half."""
        ceiling = min(self.retry_backoff_max, self.retry_backoff * float(2 ** max(attempt - 1, 0)))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


@dataclass(frozen=True)
class Cause:
    """What created an invocation other than a plain delay(): stored in its ``cause_*`` fields."""

    schedule_id: int | None = None
    tick: datetime | None = None
    event: str = ""
    invocation_id: int | None = None
    status: str = ""


class Options:
    """A call's enqueue options over a spec: what ``enqueue`` takes, from every producer."""

    def __init__(
        self, task: TaskSpec, *, queue: str | None = None, priority: int | None = None,
        run_after: datetime | timedelta | None = None, cause: Cause | None = None,
    ) -> None:
        self.task = task
        self.queue = queue or task.queue
        self.priority = task.priority if priority is None else priority
        self.run_after = run_after
        #: Set by the producers that are not a caller: a schedule's tick, a trigger.
        self.cause = cause
