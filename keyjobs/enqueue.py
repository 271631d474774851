"""delay(): validate a call where the caller can see the error, then insert its invocation.

The insert joins the caller's transaction, so an invocation registered inside
``transaction.atomic()`` is rolled back with it and stays invisible to workers
until commit.
"""

import math
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from . import wakeups
from .conf import conf
from .exceptions import ArgumentError, KeyjobsError
from .models import Event, Invocation
from .transitions import record

if TYPE_CHECKING:
    from .declare import Options

#: How often a delay() retries after losing a race at the registration guard.
_REGISTRATION_ATTEMPTS = 20


def enqueue(options: "Options", args: tuple[Any, ...], kwargs: dict[str, Any]) -> Invocation:
    """Register one call of ``options.task``; return its invocation, or the waiting one it duplicates."""
    return _register(_build(options, args, kwargs))


def _register(invocation: Invocation) -> Invocation:
    """Insert a built invocation, or return the waiting one its registration key already has."""
    using = conf.DATABASE
    if invocation.registration_key is None:
        with transaction.atomic(using=using):
            invocation.save(using=using, force_insert=True)
            wakeups.notify(using, invocation.queue)
        return invocation
    for _ in range(_REGISTRATION_ATTEMPTS):
        with transaction.atomic(using=using):
            existing = (
                Invocation.objects.using(using)
                .waiting()
                .filter(task_name=invocation.task_name, registration_key=invocation.registration_key)
                .first()
            )
            if existing is not None:
                record(existing, Event.Kind.REUSED, using=using)
                existing.reused = True
                return existing
            try:
                # A savepoint: losing the race at the constraint must not spoil the caller's transaction.
                with transaction.atomic(using=using):
                    invocation.save(using=using, force_insert=True)
            except IntegrityError:
                invocation.pk = None
                continue
            wakeups.notify(using, invocation.queue)
            return invocation
    raise KeyjobsError(
        f"{invocation.task_name}.delay(): could not register or reuse an invocation of key "
        f"{invocation.registration_key} after {_REGISTRATION_ATTEMPTS} attempts"
    )


def enqueue_many(options: "Options", calls: Iterable[Any]) -> list[Invocation]:
    """Register many calls; each is an ``(args, kwargs)`` pair or a mapping of keyword arguments."""
    invocations = []
    for number, call in enumerate(calls):
        if isinstance(call, Mapping):
            args, kwargs = (), dict(call)
        elif isinstance(call, (tuple, list)) and len(call) == 2 and isinstance(call[1], Mapping):
            args, kwargs = tuple(call[0]), dict(call[1])
        else:
            raise ArgumentError(
                f"{options.task.name}.delay_many(): call {number} must be an (args, kwargs) pair or a dict of keyword arguments"
            )
        invocations.append(_build(options, args, kwargs))
    if any(invocation.registration_key is not None for invocation in invocations):
        # Deduplication needs each call to see the ones before it.
        with transaction.atomic(using=conf.DATABASE):
            return [_register(invocation) for invocation in invocations]
    using = conf.DATABASE
    with transaction.atomic(using=using):
        created = Invocation.objects.using(using).bulk_create(invocations, batch_size=2000)
        for queue in {invocation.queue for invocation in invocations}:
            wakeups.notify(using, queue)
    return created


def _build(options: "Options", args: tuple[Any, ...], kwargs: dict[str, Any]) -> Invocation:
    task = options.task
    where = f"{task.name}.delay()"
    try:
        bound = task.signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise ArgumentError(f"{where}: {exc}") from None
    bound.apply_defaults()
    for name, value in bound.arguments.items():
        check_json(value, where=where, path=name)
    running_key, registration_key = task.keys_for(bound.arguments)
    return Invocation(
        task_name=task.name,
        queue=options.queue,
        priority=options.priority,
        args=_plain(list(args)),
        kwargs=_plain(dict(kwargs)),
        running_key=running_key,
        registration_key=registration_key,
        run_after=_when(options.run_after),
    )


def check_json(value: Any, *, where: str, path: str, kind: str = "argument") -> None:
    """Raise ArgumentError unless ``value`` survives a JSON round trip unchanged (tuples become lists)."""
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ArgumentError(f"{where}: {kind} {path!r} is {value!r}, which JSON cannot hold")
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            check_json(item, where=where, path=f"{path}[{index}]", kind=kind)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ArgumentError(f"{where}: {kind} {path!r} has the key {key!r}; JSON object keys must be strings")
            check_json(item, where=where, path=f"{path}[{key!r}]", kind=kind)
        return
    raise ArgumentError(
        f"{where}: {kind} {path!r} is a {type(value).__module__}.{type(value).__qualname__}, which is not "
        "JSON-serializable; pass plain data (str, int, float, bool, None, list, dict), e.g. an id instead of a model instance"
    )


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _when(run_after: datetime | timedelta | None) -> datetime | None:
    if isinstance(run_after, timedelta):
        return timezone.now() + run_after
    return run_after
