"""Declaring a task: ``@task(...)`` validates its options at import time and registers it.

A declared task stays a plain function (calling it runs it inline); ``delay()``
hands a call to the workers instead.
"""

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

from . import registry
from .admission import MAX_LIMIT, Policy, Rate, is_limit
from .concurrency import ConcurrencyControlType, Mode
from .exceptions import ArgumentError, TaskDeclarationError, dotted_path
from .spec import Options, TaskSpec
from .timers import Timer, TimerError
from .triggers import Trigger, check_trigger
from .values import check_arguments

if TYPE_CHECKING:
    from .models import Invocation

P = ParamSpec("P")
R = TypeVar("R")

MAX_NAME_LENGTH = 200
MAX_QUEUE_LENGTH = 100
PRIORITY_RANGE = range(-(2**31), 2**31)


class Task(Generic[P, R]):
    """A function declared with ``@task``: call it to run it here, ``delay()`` it to run it on a worker."""

    def __init__(
        self,
        func: Callable[P, R],
        *,
        name: str | None = None,
        queue: str | None = None,
        priority: int = 0,
        running_concurrency: ConcurrencyControlType | str = Mode.DISABLED,
        registration_concurrency: ConcurrencyControlType | str = Mode.DISABLED,
        key_arguments: Iterable[str] | str = (),
        reroute_on_concurrency_control: bool = True,
        running_limit: int | Callable[..., int] | None = None,
        round_robin: bool = False,
        max_retries: int = 0,
        retry_for: tuple[type[BaseException], ...] | type[BaseException] = (Exception,),
        retry_backoff: float = 1.0,
        retry_backoff_max: float = 300.0,
        timeout: float | None = None,
        rate_limit: str | tuple[int, timedelta] | None = None,
        debounce: float | None = None,
        debounce_max: float | None = None,
        schedule: str | timedelta | None = None,
        schedule_kwargs: Mapping[str, Any] | None = None,
        schedule_catch_up: bool = True,
        trigger: Trigger | Iterable[Trigger] | None = None,
        kill_on_timeout: bool = False,
    ) -> None:
        where = f"@task on {getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', func)!s}"
        if not inspect.isfunction(func):
            raise TaskDeclarationError(f"{where}: a task must be a function, not {type(func).__name__}")
        try:
            running = Mode.parse(running_concurrency, option="running_concurrency")
            registration = Mode.parse(registration_concurrency, option="registration_concurrency")
        except TypeError as exc:
            raise TaskDeclarationError(f"{where}: {exc}") from None
        keys = (key_arguments,) if isinstance(key_arguments, str) else tuple(key_arguments)
        signature = inspect.signature(func)
        self._check_keys(where, signature, keys, running, registration)
        if not isinstance(reroute_on_concurrency_control, bool):
            raise TaskDeclarationError(f"{where}: reroute_on_concurrency_control must be True or False")
        limit = _check_limit(where, running_limit, running, keys, signature)
        if not isinstance(round_robin, bool):
            raise TaskDeclarationError(f"{where}: round_robin={round_robin!r} must be True or False")
        if round_robin and running is Mode.DISABLED:
            raise TaskDeclarationError(f"{where}: round_robin=True needs running_concurrency (it orders keys' turns)")
        queue = _check_queue(where, queue)
        priority = _check_priority(where, priority)
        retries = _check_retries(where, max_retries, retry_for, retry_backoff, retry_backoff_max)
        if timeout is not None and (not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0):
            raise TaskDeclarationError(f"{where}: timeout={timeout!r} must be a number of seconds above 0, or None")
        rate = _check_rate(where, rate_limit, running)
        debounce, debounce_max = _check_debounce(where, debounce, debounce_max, registration)
        if not isinstance(kill_on_timeout, bool):
            raise TaskDeclarationError(f"{where}: kill_on_timeout must be True or False")
        if kill_on_timeout and timeout is None:
            raise TaskDeclarationError(f"{where}: kill_on_timeout=True needs timeout=<seconds>: the limit to stop it at")
        if name is None:
            if "<" in func.__qualname__:
                raise TaskDeclarationError(
                    f"{where}: a task must be a module-level function, so that a worker process can import it"
                )
            name = dotted_path(func)
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH:
            raise TaskDeclarationError(f"{where}: name must be a non-empty string of at most {MAX_NAME_LENGTH} characters")
        timer, kwargs = _check_schedule(where, signature, schedule, schedule_kwargs, schedule_catch_up)
        triggers = () if trigger is None else (trigger,) if not isinstance(trigger, Iterable) else tuple(trigger)
        triggers = tuple(check_trigger(where, signature, each) for each in triggers)
        self.spec = TaskSpec(
            name=name,
            func=func,
            policy=Policy(running=running, registration=registration, key_arguments=keys,
                          park_blocked=reroute_on_concurrency_control, rate=rate, debounce=debounce,
                          debounce_max=debounce_max, limit=limit, round_robin=round_robin),
            default_queue=queue,
            priority=priority,
            max_retries=retries[0], retry_for=retries[1], retry_backoff=retries[2], retry_backoff_max=retries[3],
            timeout=float(timeout) if timeout is not None else None,
            schedule=timer, schedule_kwargs=kwargs, schedule_catch_up=schedule_catch_up,
            triggers=triggers,
            kill_on_timeout=kill_on_timeout,
        )
        self.func: Callable[P, R] = func
        functools.update_wrapper(self, func)
        registry.register(self.spec)

    @staticmethod
    def _check_keys(
        where: str,
        signature: inspect.Signature,
        keys: tuple[str, ...],
        running: ConcurrencyControlType,
        registration: ConcurrencyControlType,
    ) -> None:
        uses_keys = Mode.KEYS in (running, registration)
        if uses_keys and not keys:
            raise TaskDeclarationError(f"{where}: Mode.KEYS needs key_arguments=(...) naming the arguments that form the key")
        if keys and not uses_keys:
            raise TaskDeclarationError(
                f"{where}: key_arguments={keys!r} has no effect unless running_concurrency or "
                "registration_concurrency is Mode.KEYS"
            )
        for key in keys:
            parameter = signature.parameters.get(key)
            if not isinstance(key, str) or parameter is None:
                raise TaskDeclarationError(
                    f"{where}: key argument {key!r} is not a parameter of the function "
                    f"(its parameters are {', '.join(signature.parameters) or 'none'})"
                )
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                raise TaskDeclarationError(f"{where}: key argument {key!r} cannot be a *args or **kwargs parameter")
        if len(set(keys)) != len(keys):
            raise TaskDeclarationError(f"{where}: key_arguments={keys!r} names an argument twice")

    # What the spec holds, read as the declaration spelled it.
    name = property(lambda self: self.spec.name)
    signature = property(lambda self: self.spec.signature)
    queue = property(lambda self: self.spec.queue)
    priority = property(lambda self: self.spec.priority)
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
        """Register a call for a worker to run, in the caller's transaction, and return its invocation."""
        return self.using().delay(*args, **kwargs)

    def delay_many(self, calls: Iterable[tuple[tuple[Any, ...], dict[str, Any]] | Mapping[str, Any]]) -> list["Invocation"]:
        """Register many calls at once: each an ``(args, kwargs)`` pair or a dict of keyword arguments."""
        return self.using().delay_many(calls)

    def using(
        self,
        *,
        queue: str | None = None,
        priority: int | None = None,
        run_after: datetime | timedelta | None = None,
    ) -> "Options":
        """Return this task with enqueue options overridden, for ``.delay()``."""
        where = f"{self.name}.using()"
        return Options(
            self.spec,
            queue=_check_queue(where, queue),
            priority=None if priority is None else _check_priority(where, priority),
            run_after=run_after,
        )


def _check_limit(
    where: str, limit: object, running: ConcurrencyControlType, keys: tuple[str, ...], signature: inspect.Signature
) -> int | Callable[..., int]:
    """Return the running limit declared: a whole number from 1 to MAX_LIMIT, or a function of the key arguments."""
    if limit is None:
        return 1
    if running is Mode.DISABLED:
        raise TaskDeclarationError(
            f"{where}: running_limit={limit!r} needs running_concurrency (Mode.TASK, Mode.ARGUMENTS or Mode.KEYS)"
        )
    if is_limit(limit):
        return limit  # type: ignore[return-value]
    if not callable(limit) or isinstance(limit, (bool, int, float, str, type)):
        raise TaskDeclarationError(
            f"{where}: running_limit={limit!r} must be a whole number from 1 to {MAX_LIMIT}, "
            "or a function of the key arguments returning one"
        )
    # The function is called with the arguments the scope looks at (admission.Policy.limit_for).
    takes = keys if running is Mode.KEYS else tuple(signature.parameters) if running is Mode.ARGUMENTS else ()
    try:
        inspect.signature(limit).bind(**dict.fromkeys(takes))
    except TypeError:
        raise TaskDeclarationError(
            f"{where}: running_limit={dotted_path(limit) if hasattr(limit, '__qualname__') else repr(limit)} "
            f"cannot be called with {', '.join(takes) or 'no arguments'} (what running_concurrency=Mode.{running.name} gives it)"
        ) from None
    except ValueError:
        pass  # no signature to read (a builtin): it is checked when called
    return limit


def _check_retries(
    where: str, max_retries: object, retry_for: object, backoff: object, backoff_max: object
) -> tuple[int, tuple[type[BaseException], ...], float, float]:
    if not isinstance(max_retries, int) or isinstance(max_retries, bool) or max_retries < 0:
        raise TaskDeclarationError(f"{where}: max_retries={max_retries!r} must be a whole number, 0 or more")
    kinds = (retry_for,) if isinstance(retry_for, type) else retry_for
    if not isinstance(kinds, tuple) or not all(isinstance(k, type) and issubclass(k, BaseException) for k in kinds):
        raise TaskDeclarationError(f"{where}: retry_for={retry_for!r} must be an exception class or a tuple of them")
    for name, value in (("retry_backoff", backoff), ("retry_backoff_max", backoff_max)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise TaskDeclarationError(f"{where}: {name}={value!r} must be a number of seconds, 0 or more")
    return max_retries, kinds, float(backoff), float(backoff_max)  # type: ignore[arg-type]


def _check_rate(where: str, rate_limit: object, running: ConcurrencyControlType) -> Rate | None:
    if rate_limit is None:
        return None
    try:
        rate = Rate.parse(rate_limit)
    except ValueError as exc:
        raise TaskDeclarationError(f"{where}: rate_limit={rate_limit!r} {exc}") from None
    if running == Mode.DISABLED:
        raise TaskDeclarationError(
            f"{where}: rate_limit counts the starts of each running key: it needs running_concurrency "
            "(Mode.TASK for one rate for the whole task)"
        )
    return rate


def _check_debounce(
    where: str, debounce: object, debounce_max: object, registration: ConcurrencyControlType
) -> tuple[float | None, float | None]:
    for name, value in (("debounce", debounce), ("debounce_max", debounce_max)):
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
            raise TaskDeclarationError(f"{where}: {name}={value!r} must be a number of seconds above 0, or None")
    if debounce is None:
        if debounce_max is not None:
            raise TaskDeclarationError(f"{where}: debounce_max={debounce_max!r} has no effect without debounce")
        return None, None
    if registration == Mode.DISABLED:
        raise TaskDeclarationError(
            f"{where}: debounce merges the calls of a registration key: it needs registration_concurrency "
            "(e.g. Mode.KEYS with key_arguments)"
        )
    if debounce_max is not None and debounce_max < debounce:  # type: ignore[operator]
        raise TaskDeclarationError(
            f"{where}: debounce_max={debounce_max!r} must be at least debounce={debounce!r}"
        )
    return float(debounce), None if debounce_max is None else float(debounce_max)  # type: ignore[arg-type]


def _check_schedule(
    where: str, signature: inspect.Signature, schedule: object, kwargs: object, catch_up: object
) -> tuple[Timer | None, dict[str, Any]]:
    """Return the timer and the arguments of a declared schedule, checked as a tick will call the task."""
    if not isinstance(catch_up, bool):
        raise TaskDeclarationError(f"{where}: schedule_catch_up must be True or False")
    if schedule is None:
        if kwargs is not None:
            raise TaskDeclarationError(f"{where}: schedule_kwargs has no effect without schedule=")
        return None, {}
    try:
        timer = Timer.of(schedule)
    except TimerError as exc:
        raise TaskDeclarationError(f"{where}: schedule={schedule!r}: {exc}") from None
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, Mapping):
        raise TaskDeclarationError(f"{where}: schedule_kwargs must be a dict of keyword arguments")
    arguments = dict(kwargs)
    try:
        signature.bind(**arguments)
        check_arguments(arguments, where=where)
    except ArgumentError as exc:
        raise TaskDeclarationError(f"{where}: schedule_kwargs: {exc}") from None
    except TypeError as exc:
        needs = "" if arguments else " (a scheduled task with required arguments needs schedule_kwargs={...})"
        raise TaskDeclarationError(f"{where}: a tick cannot call it with schedule_kwargs={arguments!r}: {exc}{needs}") \
            from None
    return timer, arguments


def _check_queue(where: str, queue: object) -> str | None:
    if queue is None:
        return None
    if not isinstance(queue, str) or not queue or len(queue) > MAX_QUEUE_LENGTH or "," in queue:
        raise TaskDeclarationError(
            f"{where}: queue={queue!r} must be a non-empty string of at most {MAX_QUEUE_LENGTH} characters without commas"
        )
    return queue


def _check_priority(where: str, priority: object) -> int:
    if not isinstance(priority, int) or isinstance(priority, bool) or priority not in PRIORITY_RANGE:
        raise TaskDeclarationError(f"{where}: priority={priority!r} must be an integer (higher runs first)")
    return priority


#: Every option of ``@task``, read off ``Task``: an option added there is accepted by every producer.
_OPTIONS = frozenset(inspect.signature(Task.__init__).parameters) - {"self", "func"}


def check_option_names(where: str, options: Iterable[str], *, known: Iterable[str] = _OPTIONS) -> None:
    """Raise TaskDeclarationError naming any of ``options`` that ``@task`` does not know (or not among ``known``)."""
    known = frozenset(known)
    unknown = sorted(set(options) - known)
    if unknown:
        raise TaskDeclarationError(
            f"{where} got unknown option(s) {', '.join(unknown)}; the options are {', '.join(sorted(known))}"
        )


@overload
def task(func: Callable[P, R], /) -> Task[P, R]: ...
@overload
def task(
    *,
    name: str | None = None,
    queue: str | None = None,
    priority: int = 0,
    running_concurrency: ConcurrencyControlType | str = Mode.DISABLED,
    registration_concurrency: ConcurrencyControlType | str = Mode.DISABLED,
    key_arguments: Iterable[str] | str = (),
    reroute_on_concurrency_control: bool = True,
    running_limit: int | Callable[..., int] | None = None,
    round_robin: bool = False,
    max_retries: int = 0,
    retry_for: tuple[type[BaseException], ...] | type[BaseException] = (Exception,),
    retry_backoff: float = 1.0,
    retry_backoff_max: float = 300.0,
    timeout: float | None = None,
    rate_limit: str | tuple[int, timedelta] | None = None,
    debounce: float | None = None,
    debounce_max: float | None = None,
    schedule: str | timedelta | None = None,
    schedule_kwargs: Mapping[str, Any] | None = None,
    schedule_catch_up: bool = True,
    trigger: Trigger | Iterable[Trigger] | None = None,
    kill_on_timeout: bool = False,
) -> Callable[[Callable[P, R]], Task[P, R]]: ...
def task(func: Any = None, /, **options: Any) -> Any:
    """Declare a task: ``@task`` or ``@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",))``."""
    check_option_names("@task", options)
    if func is not None:
        return Task(func, **options)
    return lambda f: Task(f, **options)
