"""A task's options, declared once: each one's type, default and description, and the validator that reads them.

``TaskOptions`` is what ``@task(**options)`` takes (``Unpack[TaskOptions]``).
Each option is ``Annotated`` with an ``Option``: its default, a line a person
reads, and, for an option that ``KEYJOBS_TASK_OPTIONS`` may not change at
deploy time, why. Read them at run time with ``OPTIONS`` (built by
``typing.get_type_hints(TaskOptions, include_extras=True)``): the backend's
accepted options, the settings' check and the documentation's reference are
derived from it, so that an option cannot be added without its description.

``build_spec()`` is the one validator: ``@task``, ``django.tasks``' task class
and ``KEYJOBS_TASK_OPTIONS`` all turn options into a ``TaskSpec`` through it,
with a ``TaskDeclarationError`` that names where the options came from.
"""

import inspect
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Annotated, Any, TypedDict

from .admission import MAX_LIMIT, Policy, Rate, is_limit
from .concurrency import ConcurrencyControlType, Mode
from .exceptions import ArgumentError, TaskDeclarationError, dotted_path
from .spec import TaskSpec
from .timers import Timer, TimerError
from .triggers import Trigger, check_trigger
from .values import check_arguments

MAX_NAME_LENGTH = 200
MAX_QUEUE_LENGTH = 100
PRIORITY_RANGE = range(-(2**31), 2**31)

#: Why the options that make a key cannot change at deploy time.
_KEYS_ARE_STORED = ("it decides what a key is, and invocations already stored keep the keys made under the old "
                    "declaration: the guards would no longer compare old and new")


@dataclass(frozen=True)
class Option:
    """How one option of ``@task`` reads: its default, a line of description, and whether settings may change it."""

    default: Any
    doc: str
    #: Why ``KEYJOBS_TASK_OPTIONS`` may not change it; empty when an operator may.
    fixed: str = ""

    @property
    def overridable(self) -> bool:
        return not self.fixed


class TaskOptions(TypedDict, total=False):
    """The options of ``@task(...)``, each with its type, default and description (``OPTIONS``)."""

    name: Annotated[str | None, Option(
        None, "The name invocations store and workers find the task by; default its dotted path.",
        fixed="an invocation finds its task by the name it stored: a new name would strand the stored ones")]
    queue: Annotated[str | None, Option(
        None, "The queue its invocations go to; default KEYJOBS_DEFAULT_QUEUE.")]
    priority: Annotated[int, Option(
        0, "The priority of its invocations: higher runs first.")]
    running_concurrency: Annotated[ConcurrencyControlType | str, Option(
        Mode.DISABLED, "Which running invocations count as one key: DISABLED, TASK, ARGUMENTS or KEYS.",
        fixed=_KEYS_ARE_STORED)]
    registration_concurrency: Annotated[ConcurrencyControlType | str, Option(
        Mode.DISABLED, "Which waiting invocations count as one key, a new call merging into the one waiting.",
        fixed=_KEYS_ARE_STORED)]
    key_arguments: Annotated[Iterable[str] | str, Option(
        (), "The arguments whose values form the key, under Mode.KEYS.", fixed=_KEYS_ARE_STORED)]
    reroute_on_concurrency_control: Annotated[bool, Option(
        True, "Work blocked by its key waits its turn (True) or is dropped (False).",
        fixed="whether a call may be dropped is the task's contract with its callers, not a tuning")]
    running_limit: Annotated[int | Callable[..., int] | None, Option(
        None, "Runs of one running key at once (default 1): a whole number, or a function of the key arguments; "
        "each invocation stores the limit it was created under.")]
    round_robin: Annotated[bool, Option(
        False, "A freed key's next invocation goes to the back of the queue, so that keys take turns.")]
    max_retries: Annotated[int, Option(
        0, "Attempts after the first when the function raises one of retry_for.")]
    retry_for: Annotated[tuple[type[BaseException], ...] | type[BaseException], Option(
        (Exception,), "The exception classes that are retried.",
        fixed="exception classes are code, which settings cannot name")]
    retry_backoff: Annotated[float, Option(
        1.0, "Seconds before the first retry, doubling for each next one (with jitter).")]
    retry_backoff_max: Annotated[float, Option(
        300.0, "The most seconds between two attempts.")]
    timeout: Annotated[float | None, Option(
        None, "Seconds a run may take before it is flagged OVERDUE (or killed, with kill_on_timeout); None: no limit.")]
    rate_limit: Annotated[str | tuple[int, timedelta] | None, Option(
        None, "Starts of one running key in any window: '10/s', '100/m', '5/10s' or (N, timedelta(...)).")]
    debounce: Annotated[float | None, Option(
        None, "Seconds a waiting invocation waits after the last call that merged into it.")]
    debounce_max: Annotated[float | None, Option(
        None, "The most seconds debounce may delay a start after the first of the calls it merged.")]
    schedule: Annotated[str | timedelta | None, Option(
        None, "Run it by itself: a cron expression (the site's time zone) or an interval.")]
    schedule_kwargs: Annotated[Mapping[str, Any] | None, Option(
        None, "The keyword arguments of every scheduled run.")]
    schedule_catch_up: Annotated[bool, Option(
        True, "Ticks missed while no runner ran: run once for all of them (True), or skip them.")]
    trigger: Annotated[Trigger | Iterable[Trigger] | None, Option(
        None, "Run it when an invocation of another task ends (on_status) or on an event (on_event).",
        fixed="a trigger names a task object, which is code, and the flow from task to task is the program's")]
    kill_on_timeout: Annotated[bool, Option(
        False, "Stop a run at its timeout by killing its worker process (runworker --processes).")]
    max_recoveries: Annotated[int, Option(
        3, "Times a run whose worker process died while running it is run again; one more death ends it FAILED.")]


def _read_options() -> dict[str, Option]:
    found = {}
    for name, hint in typing.get_type_hints(TaskOptions, include_extras=True).items():
        (option,) = [meta for meta in getattr(hint, "__metadata__", ()) if isinstance(meta, Option)]
        found[name] = option
    return found


#: Every option of ``@task``, by name, in the order ``TaskOptions`` declares them.
OPTIONS: Mapping[str, Option] = _read_options()


def check_names(where: str, options: Iterable[str], *, known: Iterable[str] = OPTIONS) -> None:
    """Raise TaskDeclarationError naming any of ``options`` that ``@task`` does not know (or not among ``known``)."""
    known = frozenset(known)
    unknown = sorted(set(options) - known)
    if unknown:
        raise TaskDeclarationError(
            f"{where} got unknown option(s) {', '.join(unknown)}; the options are {', '.join(sorted(known))}"
        )


def check_settable(where: str, names: Iterable[str]) -> None:
    """Raise TaskDeclarationError naming any of ``names`` that is no option, or one settings may not change."""
    check_names(where, names)
    for name in names:
        if OPTIONS[name].fixed:
            raise TaskDeclarationError(f"{where}: {name} cannot be changed by settings: {OPTIONS[name].fixed}")


def override(spec: TaskSpec, changes: object) -> TaskSpec:
    """Return ``spec`` declared with ``changes`` (its ``KEYJOBS_TASK_OPTIONS``) too, checked as ``@task`` checks.

    TaskDeclarationError, naming the setting, if they cannot apply: not a
    dict, an option that is not one or that settings may not change, a value
    ``@task`` would refuse, or a spec that was not built from options.
    """
    where = f"KEYJOBS_TASK_OPTIONS[{spec.name!r}]"
    if not isinstance(changes, Mapping) or not all(isinstance(name, str) for name in changes):
        raise TaskDeclarationError(f"{where} must be a dict of @task options by name, not {changes!r}")
    check_settable(where, changes)
    if spec.options is None:
        raise TaskDeclarationError(f"{where}: {spec.name} is a spec built by hand, not declared with @task options")
    return replace(build_spec(spec.func, {**spec.options, **changes}, where=where), workflow=spec.workflow)


def build_spec(func: Callable[..., Any], options: Mapping[str, Any], *, where: str) -> TaskSpec:
    """Return the spec of ``func`` declared with ``options``; TaskDeclarationError, naming ``where``, if they are wrong."""
    check_names(where, options)
    given: dict[str, Any] = {name: options.get(name, option.default) for name, option in OPTIONS.items()}
    if not inspect.isfunction(func):
        raise TaskDeclarationError(f"{where}: a task must be a function, not {type(func).__name__}")
    try:
        running = Mode.parse(given["running_concurrency"], option="running_concurrency")
        registration = Mode.parse(given["registration_concurrency"], option="registration_concurrency")
    except TypeError as exc:
        raise TaskDeclarationError(f"{where}: {exc}") from None
    key_arguments = given["key_arguments"]
    keys = (key_arguments,) if isinstance(key_arguments, str) else tuple(key_arguments)
    signature = inspect.signature(func)
    _check_keys(where, signature, keys, running, registration)
    if not isinstance(given["reroute_on_concurrency_control"], bool):
        raise TaskDeclarationError(f"{where}: reroute_on_concurrency_control must be True or False")
    limit = _check_limit(where, given["running_limit"], running, keys, signature)
    round_robin = given["round_robin"]
    if not isinstance(round_robin, bool):
        raise TaskDeclarationError(f"{where}: round_robin={round_robin!r} must be True or False")
    if round_robin and running is Mode.DISABLED:
        raise TaskDeclarationError(f"{where}: round_robin=True needs running_concurrency (it orders keys' turns)")
    queue = check_queue(where, given["queue"])
    priority = check_priority(where, given["priority"])
    retries = _check_retries(where, given["max_retries"], given["retry_for"], given["retry_backoff"],
                             given["retry_backoff_max"])
    timeout = given["timeout"]
    if timeout is not None and (not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0):
        raise TaskDeclarationError(f"{where}: timeout={timeout!r} must be a number of seconds above 0, or None")
    rate = _check_rate(where, given["rate_limit"], running)
    debounce, debounce_max = _check_debounce(where, given["debounce"], given["debounce_max"], registration)
    kill_on_timeout = given["kill_on_timeout"]
    if not isinstance(kill_on_timeout, bool):
        raise TaskDeclarationError(f"{where}: kill_on_timeout must be True or False")
    if kill_on_timeout and timeout is None:
        raise TaskDeclarationError(f"{where}: kill_on_timeout=True needs timeout=<seconds>: the limit to stop it at")
    max_recoveries = given["max_recoveries"]
    if not isinstance(max_recoveries, int) or isinstance(max_recoveries, bool) or max_recoveries < 0:
        raise TaskDeclarationError(f"{where}: max_recoveries={max_recoveries!r} must be a whole number, 0 or more")
    name = given["name"]
    if name is None:
        if "<" in func.__qualname__:
            raise TaskDeclarationError(
                f"{where}: a task must be a module-level function, so that a worker process can import it"
            )
        name = dotted_path(func)
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH:
        raise TaskDeclarationError(f"{where}: name must be a non-empty string of at most {MAX_NAME_LENGTH} characters")
    timer, kwargs = _check_schedule(where, signature, given["schedule"], given["schedule_kwargs"],
                                    given["schedule_catch_up"])
    trigger = given["trigger"]
    triggers = () if trigger is None else (trigger,) if not isinstance(trigger, Iterable) else tuple(trigger)
    return TaskSpec(
        name=name,
        func=func,
        policy=Policy(running=running, registration=registration, key_arguments=keys,
                      park_blocked=given["reroute_on_concurrency_control"], rate=rate, debounce=debounce,
                      debounce_max=debounce_max, limit=limit, round_robin=round_robin),
        default_queue=queue,
        priority=priority,
        max_retries=retries[0], retry_for=retries[1], retry_backoff=retries[2], retry_backoff_max=retries[3],
        timeout=float(timeout) if timeout is not None else None,
        schedule=timer, schedule_kwargs=kwargs, schedule_catch_up=given["schedule_catch_up"],
        triggers=tuple(check_trigger(where, signature, each) for each in triggers),
        kill_on_timeout=kill_on_timeout,
        max_recoveries=max_recoveries,
        options=dict(options),
    )


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


def check_queue(where: str, queue: object) -> str | None:
    """Return ``queue`` if it can name a queue (None: the default); TaskDeclarationError, naming ``where``, if not."""
    if queue is None:
        return None
    if not isinstance(queue, str) or not queue or len(queue) > MAX_QUEUE_LENGTH or "," in queue:
        raise TaskDeclarationError(
            f"{where}: queue={queue!r} must be a non-empty string of at most {MAX_QUEUE_LENGTH} characters without commas"
        )
    return queue


def check_priority(where: str, priority: object) -> int:
    """Return ``priority`` if it is a priority; TaskDeclarationError, naming ``where``, if not."""
    if not isinstance(priority, int) or isinstance(priority, bool) or priority not in PRIORITY_RANGE:
        raise TaskDeclarationError(f"{where}: priority={priority!r} must be an integer (higher runs first)")
    return priority
