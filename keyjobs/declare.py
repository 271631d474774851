"""Declaring a task: ``@task(...)`` validates its options at import time and registers it.

A declared task stays a plain function (calling it runs it inline); ``delay()``
hands a call to the workers instead, through ``enqueue`` (a producer, as a
schedule or a trigger is). The options themselves, and the validator that
turns them into a spec, are ``keyjobs.options``'.
"""

import copy
import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, Unpack, overload

from asgiref.sync import sync_to_async
from django.core.exceptions import SynchronousOnlyOperation

from . import registry
from .current import this_run
from .exceptions import TaskDeclarationError
from .options import TaskOptions, build_spec, check_names, check_priority, check_queue
from .spec import Options, TaskSpec

if TYPE_CHECKING:
    from .models import Invocation

P = ParamSpec("P")
R = TypeVar("R")


class Task(Generic[P, R]):
    """A function declared with ``@task``: call it to run it here, ``delay()`` it to run it on a worker."""

    #: Whether it is a workflow (``Workflow``, declared with ``@workflow``).
    is_workflow = False

    def __init__(self, func: Callable[P, R], **options: Unpack[TaskOptions]) -> None:
        where = (f"@{'workflow' if self.is_workflow else 'task'} on {getattr(func, '__module__', '?')}."
                 f"{getattr(func, '__qualname__', func)!s}")
        #: The spec as ``@task`` declared it; ``spec`` is the one that runs, with the settings' changes.
        self.declaration = build_spec(func, options, where=where)
        if self.is_workflow:
            if self.declaration.is_async:
                raise TaskDeclarationError(f"{where}: a workflow must be a plain function, not async def: "
                                           "its steps suspend it, which a coroutine's event loop would not survive")
            self.declaration = replace(self.declaration, workflow=True)
        self.func: Callable[P, R] = func
        functools.update_wrapper(self, func)
        registry.register(self.declaration)
        # A call's enqueue options, as using() sets them; None: the spec's.
        self._queue: str | None = None
        self._priority: int | None = None
        #: Not before this time (a datetime) or this long after the call (a timedelta); None: at once.
        self.run_after: datetime | timedelta | None = None

    @property
    def spec(self) -> TaskSpec:
        """The spec this process runs: the declaration with its ``KEYJOBS_TASK_OPTIONS`` applied."""
        return registry.effective(self.declaration)

    # What the spec holds, read as the declaration spelled it.
    name = property(lambda self: self.spec.name)
    signature = property(lambda self: self.spec.signature)
    queue = property(lambda self: self._queue or self.spec.queue)
    priority = property(lambda self: self.spec.priority if self._priority is None else self._priority)
    timeout = property(lambda self: self.spec.timeout)
    kill_on_timeout = property(lambda self: self.spec.kill_on_timeout)
    is_async = property(lambda self: self.spec.is_async)
    running_concurrency = property(lambda self: self.spec.policy.running)
    rate_limit = property(lambda self: self.spec.policy.rate)
    debounce = property(lambda self: self.spec.policy.debounce)
    debounce_max = property(lambda self: self.spec.policy.debounce_max)
    registration_concurrency = property(lambda self: self.spec.policy.registration)
    key_arguments = property(lambda self: self.spec.policy.key_arguments)
    reroute_on_concurrency_control = property(lambda self: self.spec.policy.park_blocked)
    running_limit = property(lambda self: self.spec.policy.limit)
    round_robin = property(lambda self: self.spec.policy.round_robin)
    max_retries = property(lambda self: self.spec.max_retries)
    retry_for = property(lambda self: self.spec.retry_for)
    schedule = property(lambda self: self.spec.schedule)
    triggers = property(lambda self: self.spec.triggers)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Task {self.name}>"

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> "Invocation":
        """Register a call for a worker to run, in the caller's transaction, and return its invocation.

        Inside a workflow it is a step (``keyjobs.workflows``): the child is created once, and a replay gets it back.
        """
        from .enqueue import enqueue

        run = this_run()
        if run is not None and run.workflow is not None:
            return run.workflow.child(self._enqueue_options(), args, kwargs)
        try:
            return enqueue(self._enqueue_options(), args, kwargs)
        except SynchronousOnlyOperation as exc:
            raise _await_instead(self, "delay") from exc

    def delay_many(self, calls: Iterable[tuple[tuple[Any, ...], dict[str, Any]] | Mapping[str, Any]]) -> list["Invocation"]:
        """Register many calls at once: each an ``(args, kwargs)`` pair or a dict of keyword arguments.

        Inside a workflow each call is a step of its own, in order.
        """
        from .enqueue import enqueue_many

        run = this_run()
        if run is not None and run.workflow is not None:
            replay, options = run.workflow, self._enqueue_options()
            return [replay.child(options, *_split(call)) for call in calls]

        try:
            return enqueue_many(self._enqueue_options(), calls)
        except SynchronousOnlyOperation as exc:
            raise _await_instead(self, "delay_many") from exc

    async def adelay(self, *args: P.args, **kwargs: P.kwargs) -> "Invocation":
        """Return ``delay()`` from async code (an async view): it runs in Django's thread for sync code."""
        return await sync_to_async(self.delay)(*args, **kwargs)

    async def adelay_many(
        self, calls: Iterable[tuple[tuple[Any, ...], dict[str, Any]] | Mapping[str, Any]]
    ) -> list["Invocation"]:
        """Return ``delay_many()`` from async code."""
        return await sync_to_async(self.delay_many)(calls)

    def using(
        self,
        *,
        queue: str | None = None,
        priority: int | None = None,
        run_after: datetime | timedelta | None = None,
    ) -> "Task[P, R]":
        """Return a copy of this task whose calls take these enqueue options (the others as this one's)."""
        where = f"{self.name}.using()"
        if run_after is not None and not isinstance(run_after, (datetime, timedelta)):
            raise TaskDeclarationError(f"{where}: run_after must be a datetime or a timedelta")
        changed = copy.copy(self)
        if queue is not None:
            changed._queue = check_queue(where, queue)
        if priority is not None:
            changed._priority = check_priority(where, priority)
        if run_after is not None:
            changed.run_after = run_after
        return changed

    def _enqueue_options(self) -> Options:
        return Options(self.spec, queue=self._queue, priority=self._priority, run_after=self.run_after)


def _split(call: tuple[tuple[Any, ...], dict[str, Any]] | Mapping[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Return a ``delay_many()`` call as (args, kwargs)."""
    if isinstance(call, Mapping):
        return (), dict(call)
    args, kwargs = call
    return tuple(args), dict(kwargs)


def _await_instead(task: Task[..., Any], call: str) -> SynchronousOnlyOperation:
    """Return the error of a call that queries the database made from async code: it names the twin to await."""
    return SynchronousOnlyOperation(
        f"{task.name}.{call}() queries the database, which async code may not do directly: "
        f"await {task.name}.a{call}(...) instead"
    )


@overload
def task(func: Callable[P, R], /) -> Task[P, R]: ...
@overload
def task(**options: Unpack[TaskOptions]) -> Callable[[Callable[P, R]], Task[P, R]]: ...
def task(func: Any = None, /, **options: Unpack[TaskOptions]) -> Any:
    """Declare a task: ``@task`` or ``@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",))``.

    The options, their defaults and what each does: ``keyjobs.options.TaskOptions``.
    """
    check_names("@task", options)
    if func is not None:
        return Task(func, **options)
    return lambda f: Task(f, **options)


class Workflow(Task[P, R]):
    """A function declared with ``@workflow``: a task whose run is replayed from its recorded steps."""

    is_workflow = True


@overload
def workflow(func: Callable[P, R], /) -> Task[P, R]: ...
@overload
def workflow(**options: Unpack[TaskOptions]) -> Callable[[Callable[P, R]], Task[P, R]]: ...
def workflow(func: Any = None, /, **options: Unpack[TaskOptions]) -> Any:
    """Declare a durable workflow: a task whose steps run once and whose run resumes where it stopped.

    It takes every ``@task`` option; its invocations are invocations like any
    other. What may be done inside it: ``keyjobs.workflows``.
    """
    check_names("@workflow", options)
    if func is not None:
        return Workflow(func, **options)
    return lambda f: Workflow(f, **options)
