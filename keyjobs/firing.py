"""Firing triggers (a producer, like a schedule): what an outcome or an ``emit()`` enqueues.

Each triggered call goes through ``enqueue`` with its cause recorded on the
invocation (``cause_invocation`` and ``cause_status``, or ``cause_event``).
``fire()`` is called by ``keyjobs.execute`` in the transaction that records
an outcome; ``emit()`` joins the caller's transaction. The declarations they
follow (``on_status``, ``on_event``) are ``keyjobs.triggers``'.

Subscribers are found in the registry of the process that records the
outcome or emits the event: declare them in a module every runner imports
(an app's ``tasks.py``).
"""

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from django.db import transaction

from . import faults, registry
from .conf import conf
from .exceptions import ArgumentError, dotted_path
from .spec import Cause, Options, TaskSpec
from .status import Status
from .triggers import ADDED, OnStatus, check_event
from .values import check_arguments, storable_text

if TYPE_CHECKING:
    # Imported where used: ``keyjobs`` exports emit() before Django's apps are ready.
    from .models import Invocation

logger = logging.getLogger(__name__)


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

    Each subscriber is looked for and enqueued in a savepoint of its own, so
    that a failure (its ``running_limit`` function raises, the database
    refuses the look or the row) undoes nothing else: the outcome stands, the
    other subscribers are enqueued, and the failure is logged and recorded
    in the history of ``invocation`` (``Event.Kind.TRIGGER_FAILED``). Only a
    failure a retry can fix (``faults.is_transient``) is raised, for the
    whole recording to be retried.
    """
    subscribers = triggered_by(invocation.task_name, status)
    if not subscribers:
        return []
    from .enqueue import enqueue
    from .models import Event, Invocation
    provided = dict(_arguments_of(invocation))
    added = ADDED[Status(status)]
    provided[added] = values.get("return_value" if added == "result" else "error")
    made = []
    for spec in subscribers:
        cause = Cause(invocation_id=invocation.pk, status=status)
        try:
            # A savepoint: a refused call must not undo the outcome, nor a refused look for the call made already.
            with transaction.atomic(using=using):
                if Invocation.objects.using(using).filter(
                        cause_invocation_id=invocation.pk, cause_status=status, task_name=spec.name).exists():
                    continue
                made.append(enqueue(Options(spec, cause=cause), (), accepted(spec, provided)))
        except Exception as exc:
            if faults.is_transient(exc):
                raise
            logger.error("invocation #%s (%s) could not trigger %s: %s", invocation.pk, status, spec.name,
                         exc, exc_info=exc, extra=invocation.log_extra())
            Event.objects.using(using).create(
                invocation_id=invocation.pk, kind=Event.Kind.TRIGGER_FAILED, from_status=status, to_status=status,
                note=storable_text(f"could not trigger {spec.name}: {dotted_path(type(exc))}: {exc}", limit=4000),
            )
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
    check_event(event, where=where, error=ArgumentError)
    check_arguments(kwargs, where=where)
    subscribers = subscribed_to(event)
    if not subscribers:
        return []
    from .enqueue import enqueue

    with transaction.atomic(using=conf.DATABASE):
        return [enqueue(Options(spec, cause=Cause(event=event)), (), accepted(spec, kwargs)) for spec in subscribers]
