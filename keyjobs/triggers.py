"""Trigger declarations: ``on_status()`` and ``on_event()``, for ``@task(trigger=...)``.

- ``@task(trigger=on_status(sync_account, Status.SUCCESS))``: when an
  invocation of ``sync_account`` ends SUCCESS, the triggered task is enqueued
  in the same transaction that records that outcome. It is called with
  keyword arguments only: every argument of the finished invocation by
  parameter name (defaults filled in), plus ``result`` (its return value) on
  SUCCESS or ``error`` (its error message) on FAILED, each passed only if the
  triggered function has a parameter of that name (or ``**kwargs``).
- ``@task(trigger=on_event("account.updated"))`` and
  ``emit("account.updated", account_id="acme")``: every subscribed task is
  enqueued in the caller's transaction, with the keyword arguments its
  function accepts.

A declaration, checked when the task is declared; what fires them, once the
outcome is recorded or the event emitted, is ``keyjobs.firing``.
"""

import inspect
from dataclasses import dataclass
from typing import Any

from .exceptions import KeyjobsError, TaskDeclarationError
from .spec import TaskSpec
from .status import Status

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
    return OnEvent(check_event(event, where=f"on_event({event!r})", error=TaskDeclarationError))


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


def check_event(event: object, *, where: str, error: type[KeyjobsError]) -> str:
    """Return ``event`` if it can name an event; ``error``, naming ``where``, if not."""
    if not isinstance(event, str) or not event.strip() or len(event) > MAX_EVENT_LENGTH:
        raise error(f"{where}: an event is a non-empty string of at most {MAX_EVENT_LENGTH} characters")
    return event
