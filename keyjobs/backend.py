"""keyjobs as a backend of Django's tasks framework (``django.tasks``, Django 6.1): another producer of task specs.

``@django.tasks.task(...)`` hands its extra keyword arguments to the backend's
``task_class``: here they are keyjobs' ``@task`` options, validated by
``keyjobs.declare`` as ``@keyjobs.task`` validates them, so that a task
declared either way is the same ``TaskSpec``. ``enqueue()`` is ``delay()``:
the same insert in the caller's transaction, the same queue, workers, per-key
guarantees, admin and timeline. A result is read back from the invocation and
its history; keyjobs' statuses fold onto Django's four by the sets of
``keyjobs.status`` (``task_status()``).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

import django
from django.conf import settings
from django.core.checks import CheckMessage, Error
from django.core.exceptions import ImproperlyConfigured

if django.VERSION < (6, 1):  # pragma: no cover - the check route: Django 5.2 has no django.tasks
    raise ImproperlyConfigured(
        "keyjobs.backend.KeyjobsBackend needs Django 6.1 or later (django.tasks with task options); this is "
        f"Django {django.get_version()}. Declare tasks with @keyjobs.task instead."
    )

from django.db.models import Q
from django.tasks import (
    DEFAULT_TASK_BACKEND_ALIAS,
    DEFAULT_TASK_QUEUE_NAME,
    Task,
    TaskContext,
    TaskResult,
    TaskResultStatus,
)
from django.tasks.backends.base import BaseTaskBackend
from django.tasks.base import DEFAULT_TASK_PRIORITY, TASK_MAX_PRIORITY, TASK_MIN_PRIORITY, TaskError
from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist
from django.tasks.signals import task_enqueued, task_finished, task_started
from django.utils import timezone

from . import declare, registry, signals
from .conf import conf
from .current import this_run
from .enqueue import enqueue
from .exceptions import ResultUnavailable, TaskDeclarationError, dotted_path
from .models import Event, Invocation
from .options import OPTIONS as TASK_OPTIONS
from .options import check_names
from .spec import Options, TaskSpec
from .status import FINAL, OWNED, Status

#: ``@task`` options that Django's own arguments already say: ``queue_name`` and ``priority``.
_DJANGO_SAYS = {"queue": "queue_name", "priority": "priority"}
P = ParamSpec("P")
R = TypeVar("R")

if TYPE_CHECKING:
    # Generic only in django-stubs: at run time Django's classes take no type arguments.
    _Task = Task[..., Any]
    _TaskResult = TaskResult[..., Any]
else:
    _Task, _TaskResult = Task, TaskResult

#: The keyjobs options a django.tasks task may take: every option of ``@keyjobs.task`` but those.
OPTIONS = frozenset(TASK_OPTIONS) - set(_DJANGO_SAYS)

logger = logging.getLogger(__name__)

#: The django.tasks task of each keyjobs task name declared through this backend, as declared.
_declared: dict[str, KeyjobsTask] = {}


def task_status(status: str) -> TaskResultStatus:
    """Return Django's status for a keyjobs status: by the sets of ``keyjobs.status``, so that new ones fold in."""
    if status in FINAL:
        # Anything final but a success (failed, dropped, cancelled) raises from return_value; errors say why.
        return TaskResultStatus.SUCCESSFUL if status == Status.SUCCESS else TaskResultStatus.FAILED
    if status in OWNED and status != Status.PENDING:
        # A run has begun and not ended.
        return TaskResultStatus.RUNNING
    # Waiting, deferred, parked behind its key, or claimed but not started yet.
    return TaskResultStatus.READY


@dataclass(frozen=True, slots=True, kw_only=True, init=False)
class KeyjobsTask(_Task):
    """A ``django.tasks`` task run by keyjobs: Django's fields, and the keyjobs task spec they declare."""

    #: The keyjobs options it was declared with, as given.
    options: Mapping[str, Any] = field(default_factory=dict, compare=False)
    #: The spec as declared; shared by every ``using()`` copy. The engine runs ``keyjobs_spec``.
    spec: TaskSpec | None = field(default=None, compare=False, repr=False)

    def __init__(
        self,
        *,
        func: Callable[..., Any],
        priority: int = DEFAULT_TASK_PRIORITY,
        backend: str = DEFAULT_TASK_BACKEND_ALIAS,
        queue_name: str = DEFAULT_TASK_QUEUE_NAME,
        run_after: datetime | None = None,
        takes_context: bool = False,
        options: Mapping[str, Any] | None = None,
        spec: TaskSpec | None = None,
        **keyjobs_options: Any,
    ) -> None:
        # A dataclass's own __init__ cannot take keyjobs' options as keyword arguments: this one can.
        for name, value in (("func", func), ("priority", priority), ("backend", backend), ("queue_name", queue_name),
                            ("run_after", run_after), ("takes_context", takes_context),
                            ("options", dict(options or {}, **keyjobs_options))):
            object.__setattr__(self, name, value)
        where = f"@task on {self.module_path}"
        for ours, django_says in _DJANGO_SAYS.items():
            if ours in self.options:
                raise TaskDeclarationError(f"{where}: {ours}= is keyjobs' spelling; pass django.tasks' {django_says}=")
        check_names(where, self.options, known=OPTIONS)
        chosen = self.get_backend()
        if not isinstance(chosen, KeyjobsBackend) and self.options:
            raise TaskDeclarationError(
                f"{where}: {', '.join(sorted(self.options))} are keyjobs options, but backend {backend!r} is "
                f"{type(chosen).__module__}.{type(chosen).__qualname__}, which ignores them; use a "
                "keyjobs.backend.KeyjobsBackend alias"
            )
        self.__post_init__()  # Django's validation: the backend's validate_task()
        if spec is None:
            spec = declare.Task(
                _runnable(func, takes_context), name=self.module_path, queue=queue_name, priority=priority,
                **self.options,
            ).declaration
            _declared[spec.name] = self
        object.__setattr__(self, "spec", spec)

    def __reduce__(self) -> tuple[Any, ...]:
        # The spec is not pickled: the declared task is imported again, with this copy's using() overrides.
        changes = {name: getattr(self, name) for name in ("priority", "queue_name", "run_after", "backend")}
        return _unpickle, (self.module_path, changes)

    @property
    def keyjobs_spec(self) -> TaskSpec:
        """The spec this process runs: ``spec`` (as declared) with its ``KEYJOBS_TASK_OPTIONS`` applied."""
        assert self.spec is not None  # set by __init__ whatever it is given
        return registry.effective(self.spec)


def _unpickle(module_path: str, changes: dict[str, Any]) -> KeyjobsTask:
    declared = _declared_by_import(module_path)
    if declared is None:
        raise ValueError(f"Expected {module_path!r} to point to a Task instance.")
    copy = declared.using(**changes)
    assert isinstance(copy, KeyjobsTask)
    return copy


def _runnable(func: Callable[..., Any], takes_context: bool) -> Callable[..., Any]:
    """Return what the worker calls with a stored call's arguments: ``func``, given its context if it takes one."""
    if not takes_context:
        return func
    wrapper: Callable[..., Any]
    if inspect.iscoroutinefunction(func):
        @functools.wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            return await func(_context(), *args, **kwargs)
    else:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return func(_context(), *args, **kwargs)
    # The call's arguments bind to the rest: key_arguments and enqueue() see no ``context``.
    signature = inspect.signature(func)
    wrapper.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])  # type: ignore[attr-defined]
    return wrapper


def _context() -> TaskContext[..., Any]:
    run = this_run()
    if run is None:
        raise RuntimeError("a django.tasks task that takes its context runs on a keyjobs worker, or through .call()")
    return TaskContext(task_result=result_of(_declared[run.invocation.task_name], run.invocation))


class KeyjobsBackend(BaseTaskBackend):
    """Run ``django.tasks`` tasks on keyjobs' workers, with keyjobs' options given to ``@task(...)``."""

    task_class = KeyjobsTask

    supports_defer = True
    supports_async_task = True
    supports_get_result = True
    supports_priority = True

    def validate_task(self, task: Task[..., Any]) -> None:
        """Refuse what keyjobs cannot run, naming the task: Django's rules, each message with the task's path."""
        where = task.module_path
        priority = task.priority
        if isinstance(priority, bool) or not isinstance(priority, int) or not (
            TASK_MIN_PRIORITY <= priority <= TASK_MAX_PRIORITY
        ):
            raise InvalidTask(
                f"{where}: priority must be a whole number between {TASK_MIN_PRIORITY} and {TASK_MAX_PRIORITY}, "
                f"not {priority!r}."
            )
        run_after = task.run_after
        if run_after is not None and (
            not isinstance(run_after, datetime) or (settings.USE_TZ and not timezone.is_aware(run_after))
        ):
            raise InvalidTask(f"{where}: run_after must be an aware datetime, not {run_after!r}.")
        if self.queues and task.queue_name not in self.queues:
            raise InvalidTask(
                f"{where}: Queue {task.queue_name!r} is not valid for backend {self.alias!r}: it is not in "
                f"TASKS[{self.alias!r}]['QUEUES'] ({', '.join(sorted(self.queues))})."
            )
        try:
            super().validate_task(task)
        except InvalidTask as exc:
            raise InvalidTask(f"{where}: {exc}") from None

    def enqueue(self, task: Task[P, R], args: list[Any], kwargs: dict[str, Any]) -> TaskResult[P, R]:
        """Register a call, in the caller's transaction; a merged duplicate returns the waiting invocation's result."""
        # As Django's own backends do: the settings may have changed since the task (or its using() copy) was made.
        self.validate_task(task)
        spec = _spec_of(task, self)
        invocation = enqueue(Options(spec, queue=task.queue_name, priority=task.priority, run_after=task.run_after),
                             tuple(args), dict(kwargs))
        if invocation.reused:
            result = result_of(task, invocation, backend=self.alias, merged=True)
        else:
            arguments = invocation.call_arguments()
            result = cast("TaskResult[P, R]", KeyjobsTaskResult(
                task=task, id=str(invocation.pk), status=task_status(invocation.status),
                enqueued_at=invocation.created_at, started_at=None, finished_at=None, last_attempted_at=None,
                args=arguments[0], kwargs=arguments[1], backend=self.alias, errors=[], worker_ids=[],
            ))
        task_enqueued.send(type(self), task_result=result)
        return result

    def get_result(self, result_id: Any) -> TaskResult[..., Any]:
        """Return the result of invocation ``result_id``; TaskResultDoesNotExist unless it is one of this backend's tasks."""
        try:
            pk = int(result_id)
            invocation = Invocation.objects.using(conf.DATABASE).get(pk=pk)
        except (TypeError, ValueError, Invocation.DoesNotExist):
            raise TaskResultDoesNotExist(result_id) from None
        declared = _declared.get(invocation.task_name)
        if declared is None:
            try:
                declared = _declared_by_import(invocation.task_name)
            except (ImportError, AttributeError, TaskDeclarationError):
                declared = None
        if declared is None:
            raise TaskResultDoesNotExist(f"{result_id}: invocation #{pk} is of {invocation.task_name}, not a django.tasks task")
        return result_of(declared, invocation, backend=self.alias)

    def check(self, **kwargs: Any) -> list[CheckMessage]:
        """Return the problems of this backend's settings (``manage.py check`` runs it)."""
        messages: list[CheckMessage] = []
        if self.options:
            messages.append(Error(
                f"TASKS[{self.alias!r}]['OPTIONS'] has {', '.join(sorted(self.options))}; keyjobs takes none.",
                hint="keyjobs reads its KEYJOBS_* settings; the options of a task go to @task(...).",
                id="keyjobs.E130",
            ))
        from django.apps import apps

        if not apps.is_installed("keyjobs"):
            messages.append(Error(
                f"TASKS[{self.alias!r}] is keyjobs.backend.KeyjobsBackend, but keyjobs is not in INSTALLED_APPS.",
                hint="Add 'keyjobs' to INSTALLED_APPS: its models hold the invocations and its runworker runs them.",
                id="keyjobs.E131",
            ))
        return messages


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyjobsTaskResult(_TaskResult):  # type: ignore[misc]  # the stubs say TaskResult is not frozen; it is
    """A ``TaskResult`` that also says whether ``enqueue()`` merged the call into an invocation already waiting."""

    #: True when registration concurrency returned the waiting invocation's result instead of a new one.
    merged: bool = False


def _spec_of(task: Task[..., Any], backend: KeyjobsBackend) -> TaskSpec:
    if isinstance(task, KeyjobsTask):
        return task.keyjobs_spec
    raise InvalidTask(
        f"{task.module_path}: backend {backend.alias!r} runs only tasks declared for it: "
        f"@task(backend={backend.alias!r}) from django.tasks"
    )


def _declared_by_import(name: str) -> KeyjobsTask | None:
    from django.utils.module_loading import import_string

    found = import_string(name)
    return found if isinstance(found, KeyjobsTask) else None


def result_of(task: Task[P, R], invocation: Invocation, *, backend: str | None = None, merged: bool = False) -> TaskResult[P, R]:
    """Return the ``TaskResult`` of ``invocation``, read from its row and, after a first attempt, its history."""
    status = task_status(invocation.status)
    worker_ids: list[str] = []
    errors: list[TaskError] = []
    first_start = invocation.started_at
    if invocation.attempts > 1 or (invocation.attempts == 1 and invocation.runner_id is None):
        history = (
            Event.objects.using(conf.DATABASE)
            .filter(invocation_id=invocation.pk)
            .filter(Q(kind=Event.Kind.TRANSITION, to_status=Status.RUNNING) | Q(kind=Event.Kind.ERROR))
            .order_by("id").values_list("kind", "runner_id", "at", "note")
        )
        for kind, runner_id, at, note in history:
            if kind == Event.Kind.ERROR:
                class_path, _, text = note.partition("\n")
                errors.append(TaskError(exception_class_path=class_path, traceback=text))
            else:
                worker_ids.append(str(runner_id))
                first_start = first_start if len(worker_ids) > 1 else at
    elif invocation.attempts == 1:
        worker_ids.append(str(invocation.runner_id))
    if status == TaskResultStatus.FAILED:
        errors.append(_final_error(invocation))
    args, kwargs = invocation.call_arguments()
    result = KeyjobsTaskResult(
        task=_as_enqueued(task, invocation),
        id=str(invocation.pk),
        status=status,
        enqueued_at=invocation.created_at,
        started_at=first_start,
        finished_at=invocation.finished_at if invocation.status in FINAL else None,
        last_attempted_at=invocation.started_at,
        args=args,
        kwargs=kwargs,
        backend=backend or task.backend,
        errors=errors,
        worker_ids=worker_ids,
        merged=merged,
    )
    if invocation.status == Status.SUCCESS:
        object.__setattr__(result, "_return_value", invocation.stored_result())
    return cast("TaskResult[P, R]", result)


def _final_error(invocation: Invocation) -> TaskError:
    """Return why a final invocation did not succeed: its run's exception, or keyjobs' own for how it ended."""
    if invocation.status == Status.FAILED and invocation.error_type:
        return TaskError(exception_class_path=invocation.error_type,
                         traceback=invocation.traceback or f"{invocation.error_type}: {invocation.error}\n")
    try:
        _ = invocation.result
    except ResultUnavailable as exc:
        # Dropped, cancelled (even while it ran), or failed by keyjobs before it ran: what result() raises for it.
        return TaskError(exception_class_path=dotted_path(type(exc)), traceback=f"{dotted_path(type(exc))}: {exc}\n")
    raise AssertionError(f"invocation #{invocation.pk} is {invocation.status}, which result() does not refuse")


def _as_enqueued(task: Task[P, R], invocation: Invocation) -> Task[P, R]:
    """Return ``task`` with the queue, priority and run_after its invocation was enqueued with."""
    if (task.queue_name, task.priority) == (invocation.queue, invocation.priority) and invocation.run_after is None:
        return task
    priority = invocation.priority if TASK_MIN_PRIORITY <= invocation.priority <= TASK_MAX_PRIORITY else task.priority
    return task.using(queue_name=invocation.queue, priority=priority, run_after=invocation.run_after)


# -- in the runner thread: Django's signals, and the context (the run in progress: keyjobs.current) ----------------


def _started(sender: TaskSpec, invocation: Invocation, **kwargs: Any) -> None:
    declared = _declared.get(invocation.task_name)
    if declared is None:
        return
    task_started.send(KeyjobsBackend, task_result=result_of(declared, invocation))


def _finished(
    sender: Any, invocation: Invocation, status: str, exception: BaseException | None = None, **kwargs: Any
) -> None:
    declared = _declared.get(invocation.task_name)
    if declared is None or status not in FINAL:
        return
    # The outcome is recorded: whatever goes wrong from here on is told, never recorded over it.
    try:
        invocation.refresh_from_db(
            using=conf.DATABASE, fields=["status", "return_value", "result_value", "error", "error_type", "traceback",
                                         "finished_at"]
        )
        result = result_of(declared, invocation)
    except Exception:
        logger.exception("could not read the result of invocation #%s for task_finished", invocation.pk,
                         extra=invocation.log_extra())
        return
    if exception is None:
        answers = task_finished.send_robust(KeyjobsBackend, task_result=result)
    else:
        # Django's receivers read the exception from sys.exc_info(), as its own backends send task_finished
        # inside their handler (its log line carries the traceback): so is it sent here.
        try:
            raise exception
        except BaseException:
            answers = task_finished.send_robust(KeyjobsBackend, task_result=result)
    for receiver, answer in answers:
        if isinstance(answer, Exception):
            logger.error("a task_finished receiver (%r) raised for invocation #%s", receiver, invocation.pk,
                         exc_info=answer, extra=invocation.log_extra())


signals.invocation_started.connect(_started, dispatch_uid="keyjobs.backend.started")
signals.invocation_finished.connect(_finished, dispatch_uid="keyjobs.backend.finished")
