"""Triggers: tasks enqueued by another invocation's outcome (``on_status``) or by an event (``on_event``, ``emit``).

A producer like a schedule: each triggered call goes through ``enqueue`` with
its cause recorded on the invocation (``cause_invocation`` and
``cause_status``, or ``cause_event``).

- ``@task(trigger=on_status(sync_account, Status.SUCCESS))``: when an
  invocation of ``sync_account`` ends SUCCESS, the triggered task is enqueued
  in the same transaction that records that outcome (``fire()``, called by
  ``keyjobs.execute``). It is called with keyword arguments only: every
  argument of the finished invocation by parameter name (defaults filled in),
  plus ``result`` (its return value) on SUCCESS or ``error`` (its error
  message) on FAILED, each passed only if the triggered function has a
  parameter of that name (or ``**kwargs``).
- ``@task(trigger=on_event("account.updated"))`` and
  ``emit("account.updated", account_id="acme")``: every subscribed task is
  enqueued in the caller's transaction, with the keyword arguments its
  function accepts.

Subscribers are found in the registry of the process that records the
outcome or emits the event: declare them in a module every runner imports
(an app's ``tasks.py``).
"""

import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.db import transaction

from . import registry
from .conf import conf
from .exceptions import ArgumentError, KeyjobsError, TaskDeclarationError
from .spec import Cause, Options, TaskSpec
from .status import Status
from .values import check_arguments

if TYPE_CHECKING:
    # Imported where used: ``keyjobs`` exports on_status and emit before Django's apps are ready.
    from .models import Invocation

logger = logging.getLogger("keyjobs.worker")

#: The outcomes a status trigger may follow: those a run records.
TRIGGERING = (Status.SUCCESS, Status.FAILED)
#: What a status trigger adds to the finished invocation's arguments, by outcome.
ADDED = {Status.SUCCESS: "result", Status.FAILED: "error"}
MAX_EVENT_LENGTH = 200


@dataclass(frozen=True)
class OnStatus:
    """Run when an invocation of ``task_name`` ends in one of ``statuses``."""

    task_name: str
    statuses: frozenset[Status]
    #: What the triggered task may receive: the triggering task's parameters, plus result or error.
    provided: frozenset[str]


@dataclass(frozen=True)
class OnEvent:
    """Run on every ``emit(event, ...)``."""

    event: str


Trigger = OnStatus | OnEvent


def on_status(task: Any, *statuses: Any) -> OnStatus:
    """Return a trigger on ``task``'s outcomes (default SUCCESS): for ``@task(trigger=...)``."""
    spec = getattr(task, "spec", task)
    if not isinstance(spec, TaskSpec):
        raise TaskDeclarationError(f"on_status({task!r}): the first argument must be a task declared with @task")
    chosen = set()
    for status in statuses or (Status.SUCCESS,):
        if status not in TRIGGERING:
            raise TaskDeclarationError(
                f"on_status({spec.name}, {status!r}): a trigger follows a recorded outcome, "
                f"{' or '.join(f'Status.{s.name}' for s in TRIGGERING)}"
            )
        chosen.add(Status(status))
    parameters = frozenset(name for name, parameter in spec.signature.parameters.items()
                           if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD))
    return OnStatus(spec.name, frozenset(chosen), parameters | {ADDED[status] for status in chosen})


def on_event(event: Any) -> OnEvent:
    """Return a trigger on an event name, for ``@task(trigger=...)``; ``emit()`` fires it."""
    return OnEvent(_check_event(event, where=f"on_event({event!r})", error=TaskDeclarationError))


def check_trigger(where: str, signature: inspect.Signature, trigger: object) -> Trigger:
    """Return ``trigger`` if a task of ``signature`` can be called by it; TaskDeclarationError if not."""
    if not isinstance(trigger, OnStatus | OnEvent):
        raise TaskDeclarationError(f"{where}: trigger={trigger!r} must be on_status(...) or on_event(...)")
    if isinstance(trigger, OnStatus):
        required = [name for name, parameter in signature.parameters.items()
                    if parameter.default is parameter.empty
                    and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)]
        missing = [name for name in required if name not in trigger.provided]
        if missing:
            raise TaskDeclarationError(
                f"{where}: on_status({trigger.task_name}) cannot give the required argument(s) "
                f"{', '.join(missing)}; a triggered task receives {', '.join(sorted(trigger.provided))}"
            )
        positional_only = [name for name, parameter in signature.parameters.items()
                           if parameter.kind is parameter.POSITIONAL_ONLY]
        if positional_only:
            raise TaskDeclarationError(f"{where}: a triggered task receives keyword arguments; "
                                       f"{', '.join(positional_only)} is positional-only")
    return trigger


_index: tuple[int, dict[tuple[str, str], list[TaskSpec]], dict[str, list[TaskSpec]]] = (-1, {}, {})


def _subscribers() -> tuple[dict[tuple[str, str], list[TaskSpec]], dict[str, list[TaskSpec]]]:
    global _index
    generation, by_status, by_event = _index
    if generation != registry.generation():
        by_status, by_event = {}, {}
        for spec in sorted(registry.all_tasks().values(), key=lambda spec: spec.name):
            for trigger in spec.triggers:
                if isinstance(trigger, OnStatus):
                    for status in trigger.statuses:
                        by_status.setdefault((trigger.task_name, status), []).append(spec)
                else:
                    by_event.setdefault(trigger.event, []).append(spec)
        _index = (registry.generation(), by_status, by_event)
    return by_status, by_event


def triggered_by(task_name: str, status: str) -> list[TaskSpec]:
    """Return the tasks an invocation of ``task_name`` ending in ``status`` triggers (a cheap look-up)."""
    return _subscribers()[0].get((task_name, status), [])


def subscribed_to(event: str) -> list[TaskSpec]:
    """Return the tasks subscribed to ``event``."""
    return _subscribers()[1].get(event, [])


def fire(invocation: "Invocation", status: str, values: Mapping[str, Any], *, using: str) -> list["Invocation"]:
    """Enqueue what ``invocation`` ending in ``status`` triggers; call it in the transaction that records the outcome.

    Each subscribed task gets one invocation per (invocation, status): a
    recording retried after an outage finds the first one (and the partial
    unique constraint ``keyjobs_one_trigger_per_outcome`` refuses a second).
    ``values`` are those the outcome writes (its ``return_value`` or ``error``).
    """
    subscribers = triggered_by(invocation.task_name, status)
    if not subscribers:
        return []
    from .enqueue import enqueue
    from .models import Invocation
    provided = dict(_arguments_of(invocation))
    added = ADDED[Status(status)]
    provided[added] = values.get("return_value" if added == "result" else "error")
    already = set(
        Invocation.objects.using(using)
        .filter(cause_invocation_id=invocation.pk, cause_status=status, task_name__in=[s.name for s in subscribers])
        .values_list("task_name", flat=True)
    )
    made = []
    for spec in subscribers:
        if spec.name in already:
            continue
        try:
            with transaction.atomic(using=using):  # a savepoint: a refused call must not undo the outcome
                made.append(enqueue(Options(spec, cause=Cause(invocation_id=invocation.pk, status=status)),
                                    (), accepted(spec, provided)))
        except KeyjobsError as exc:
            logger.error("keyjobs: invocation #%s (%s) could not trigger %s: %s", invocation.pk, status, spec.name, exc)
    return made


def _arguments_of(invocation: "Invocation") -> dict[str, Any]:
    """Return the finished invocation's arguments by parameter name, defaults filled in."""
    args, kwargs = invocation.args, invocation.kwargs
    try:
        bound = registry.get(invocation.task_name).signature.bind(*args, **kwargs)
    except (TypeError, LookupError):
        return dict(kwargs) if isinstance(kwargs, dict) else {}
    bound.apply_defaults()
    return dict(bound.arguments)


def accepted(spec: TaskSpec, offered: Mapping[str, Any]) -> dict[str, Any]:
    """Return the keyword arguments of ``offered`` that ``spec``'s function takes (all of them for ``**kwargs``)."""
    parameters = spec.signature.parameters
    if any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters.values()):
        return dict(offered)
    return {name: value for name, value in offered.items()
            if name in parameters and parameters[name].kind is not parameters[name].VAR_POSITIONAL}


def emit(event: str, /, **kwargs: Any) -> list["Invocation"]:
    """Enqueue every task subscribed to ``event`` with the keyword arguments it takes, in the caller's transaction."""
    where = f"emit({event!r})"
    _check_event(event, where=where, error=ArgumentError)
    check_arguments(kwargs, where=where)
    subscribers = subscribed_to(event)
    if not subscribers:
        return []
    from .enqueue import enqueue

    with transaction.atomic(using=conf.DATABASE):
        return [enqueue(Options(spec, cause=Cause(event=event)), (), accepted(spec, kwargs)) for spec in subscribers]


def _check_event(event: object, *, where: str, error: type[KeyjobsError]) -> str:
    if not isinstance(event, str) or not event.strip() or len(event) > MAX_EVENT_LENGTH:
        raise error(f"{where}: an event is a non-empty string of at most {MAX_EVENT_LENGTH} characters")
    return event
