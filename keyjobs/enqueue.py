"""delay(): validate a call where the caller can see the error, then insert its invocation.

The insert joins the caller's transaction, so an invocation registered inside
``transaction.atomic()`` is rolled back with it and stays invisible to workers
until commit.

Inserts skip the ORM's per-object machinery: each is one multi-row
``INSERT ... RETURNING`` built from the model's fields, with every value
prepared by its field as ``save()`` prepares it, and on PostgreSQL the same
statement queues the runners' wake-up. Outside a transaction a delay() is that
one statement, atomic by itself.
"""

import operator
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.db import IntegrityError, connections, transaction
from django.db.models import DEFERRED

from . import admission
from .admission import KeyState, Verdict
from .conf import conf
from .current import this_run
from .exceptions import ArgumentError, KeyjobsError
from .models import Event, Invocation, Value
from .status import Status, change, mark
from .store import KeyAhead, Steps, store
from .transitions import apply, record
from .values import Memo, check_arguments, outline_arguments

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

    from .spec import Cause, Options, TaskSpec

#: How often a delay() retries after losing a race at the registration guard.
_REGISTRATION_ATTEMPTS = 20

#: What the database fills in and hands back (the id, its clock readings); delay() writes the rest.
_RETURNED = Invocation._meta.db_returning_fields
_WRITTEN = [field for field in Invocation._meta.concrete_fields if field not in _RETURNED]
# getattr, not pre_save(): no field of Invocation changes its value on save (no auto_now).
_written_values = operator.attrgetter(*(field.attname for field in _WRITTEN))

_FIELDS = Invocation._meta.concrete_fields
_POSITION = {field.attname: number for number, field in enumerate(_FIELDS)}
#: A new invocation's values in field order, as Model.__init__ would default them (a generated field left unset, as
#: it leaves it); the fields whose default is made anew for each instance (a callable's: a fresh dict or list) are
#: made again by ``_new``.
_DEFAULTS = [DEFERRED if field.generated else field.get_default() for field in _FIELDS]
_FRESH = [(number, field) for number, field in enumerate(_FIELDS) if field.has_default() and callable(field.default)]


def _new(**values: Any) -> Invocation:
    """Return an unsaved invocation with ``values`` (by attribute name), the other fields at their defaults.

    What ``Invocation(**values)`` returns, built through Model.__init__'s positional path (the one ``from_db``
    takes): the keyword path pops and defaults each of the forty-odd fields in turn, half of what a
    ``delay_many()`` of no-op calls costs.
    """
    row = _DEFAULTS.copy()
    for number, field in _FRESH:
        row[number] = field.get_default()
    for name, value in values.items():
        row[_POSITION[name]] = value
    return Invocation(*row)  # type: ignore[misc]  # django-stubs types the keyword path only


#: Rows per INSERT: past a few thousand, a longer statement no longer pays.
_BATCH_SIZE = 2000

#: Values a field prepares alike every time: immutable scalars (bools keyed apart: True == 1 would
#: share 1's entry), and empty containers, keyed by their type.
_SCALARS = frozenset({str, int, type(None)})
_CONTAINERS = frozenset({list, dict})


def enqueue(options: "Options", args: tuple[Any, ...], kwargs: dict[str, Any]) -> Invocation:
    """Register one call of ``options.task``; return its invocation, or the waiting one it duplicates."""
    invocation = _build(options, args, kwargs)
    if invocation.registration_key is not None:
        return _register(invocation, options.task.policy)
    using = conf.DATABASE
    # Outside the caller's transaction only: parking locks the key's rows until commit (see below).
    steps = store(using).steps
    if (steps is not None and invocation.running_key is not None and options.task.policy.park_blocked
            and not connections[using].in_atomic_block and invocation.arguments_value_id is None):
        _insert_or_park(invocation, steps, using)
        return invocation
    _insert([invocation], conf.DATABASE)
    return invocation


def _insert_or_park(invocation: Invocation, steps: Steps, using: str) -> None:
    """Insert a call of a running key: parked at once if its key is known busy, as a claim would park it.

    Busy means as many of the key's runs owned, or registered and due ahead
    of it in key order, as its limit (what ``admission.admit`` parks). Those
    rows stay share-locked until the insert commits: whichever of them frees
    a slot locks its own row first, so it waits for this commit and then
    wakes this invocation (the same argument as the claim's parking, see
    ``keyjobs.claim``). A claim then never has to step over the key's
    backlog. Called outside a transaction, so that the locks last one
    statement, never a caller's.

    PostgreSQL only (one statement, ``Steps.insert_or_park``): it is how many
    runners on many hosts keep a busy key's backlog off the queue's head.
    Elsewhere (SQLite: one writer at a time) the claim parks it, as it parks
    a call made inside a transaction; a check here would double what a
    keyed ``delay()`` costs there.
    """
    key = KeyAhead(invocation.task_name, invocation.running_key or "", invocation.priority, invocation.running_limit)
    parked = change(Status.REROUTED, note="parked at enqueue: its key was busy")
    connection = connections[using]
    returned, invocation.status = steps.insert_or_park(
        _WRITTEN, _rows([invocation], connection)[0], _RETURNED, ahead=key, parked=parked)
    _adopt([invocation], [returned], connection)


def build(options: "Options", args: tuple[Any, ...], kwargs: dict[str, Any]) -> Invocation:
    """Validate and bind one call as ``delay()`` does, without inserting it: for ``enqueue_built()``."""
    return _build(options, args, kwargs)


def enqueue_built(calls: Sequence[tuple[Invocation, "TaskSpec"]]) -> list[Invocation]:
    """Register built calls of any tasks at once; return, in order, each one's invocation or the one it joined.

    Those without a registration key go in one statement a queue; the others
    through their registration guard, one by one. A producer with many
    calls of different tasks (a schedules' tick) uses it, in its transaction:
    there, as ``enqueue()`` does, a call of a busy key is inserted registered
    and parked by the claim.
    """
    using = conf.DATABASE
    by_queue: dict[str, list[Invocation]] = {}
    for invocation, _ in calls:
        if invocation.registration_key is None:
            by_queue.setdefault(invocation.queue, []).append(invocation)
    for batch in by_queue.values():
        _insert(batch, using)
    return [invocation if invocation.registration_key is None else _register(invocation, spec.policy)
            for invocation, spec in calls]


def _register(invocation: Invocation, policy: admission.Policy) -> Invocation:
    """Insert a built invocation, or merge it into the waiting one its registration key already has.

    The waiting one is locked for the merge: a runner's claim skips a locked
    row, so it cannot start before the caller's transaction commits, and the
    run sees whatever the caller wrote with its delay(). With ``debounce`` a
    merge also gives it this call's arguments (the latest call wins) and moves
    its start (``admission.register``).
    """
    using = conf.DATABASE
    asked = invocation.run_after
    for _ in range(_REGISTRATION_ATTEMPTS):
        with transaction.atomic(using=using):
            existing = (
                Invocation.objects.using(using)
                .waiting()
                .filter(task_name=invocation.task_name, registration_key=invocation.registration_key)
                .locked()
                .first()
            )
            # Debounce's times are the database's clock, as created_at and the claim's "due" are; read after
            # the lock, which may wait for another caller's commit.
            now = store(using).clock() if policy.debounce is not None else None
            decision = admission.register(policy, existing, now=now)
            if existing is not None and decision.verdict is Verdict.MERGE:
                if decision.until is not None and not _debounce(existing, invocation, decision.until, using):
                    continue  # it left the waiting states before the lock (a database without row locks)
                if decision.until is None:
                    record(existing, Event.Kind.REUSED, using=using)
                existing.reused = True
                return existing
            start = admission.debounced_start(policy, first=now, now=now) if now is not None else None
            if start is not None:
                invocation.run_after = start if asked is None else max(asked, start)
            try:
                # _insert takes a savepoint: losing the race at the constraint must not spoil the caller's transaction.
                _insert([invocation], using)
            except IntegrityError:
                continue
            return invocation
    raise KeyjobsError(
        f"{invocation.task_name}.delay(): could not register or reuse an invocation of key "
        f"{invocation.registration_key} after {_REGISTRATION_ATTEMPTS} attempts"
    )


def _debounce(existing: Invocation, call: Invocation, until: datetime, using: str) -> bool:
    """Merge ``call`` into the waiting, locked invocation ``existing``: its arguments, its start at ``until``.

    The arguments bring their running key and the limit stored for it. A
    parked invocation whose running key changes is registered again (keeping
    its place): it was parked behind its old key's owners, who would wake it
    there, and the claim decides it under its new key instead.

    Return False if ``existing`` is not waiting any more: the status writer
    checks that itself, for a database without row locks (SQLite), where a
    claim may have come between the look and this write.
    """
    merged = {"args": call.args, "kwargs": call.kwargs, "arguments_value_id": call.arguments_value_id,
              "arguments_outline": call.arguments_outline, "running_key": call.running_key,
              "running_limit": call.running_limit, "run_after": until}
    note = f"merged a later call: its arguments, and its start at {until.isoformat(timespec='milliseconds')}"
    _hold([call], using)
    if not apply([existing.pk], mark(Event.Kind.DEBOUNCED, merged, note=note), using=using,
                 only_from={existing.status}):
        return False
    if existing.status == Status.REROUTED and call.running_key != existing.running_key:
        apply([existing.pk], change(Status.REGISTERED, keep_place=True, note="its running key changed by a merge"),
              using=using, only_from={Status.REROUTED})
        existing.status = Status.REGISTERED
        store(using).notify(existing.queue)
    for name, value in merged.items():
        setattr(existing, name, value)
    return True


def enqueue_many(options: "Options", calls: Iterable[Any]) -> list[Invocation]:
    """Register many calls; each is an ``(args, kwargs)`` pair or a mapping of keyword arguments."""
    invocations = []
    memo = Memo()  # a value passed to many calls is measured, written and hashed once
    now = store(conf.DATABASE).clock() if isinstance(options.run_after, timedelta) else None  # once for them all
    for number, call in enumerate(calls):
        if isinstance(call, Mapping):
            args, kwargs = (), dict(call)
        elif isinstance(call, (tuple, list)) and len(call) == 2 and isinstance(call[1], Mapping):
            args, kwargs = tuple(call[0]), dict(call[1])
        else:
            raise ArgumentError(
                f"{options.task.name}.delay_many(): call {number} must be an (args, kwargs) pair or a dict of keyword arguments"
            )
        invocations.append(_build(options, args, kwargs, memo, now=now))
    if any(invocation.registration_key is not None for invocation in invocations):
        # Deduplication needs each call to see the ones before it.
        with transaction.atomic(using=conf.DATABASE):
            return [_register(invocation, options.task.policy) for invocation in invocations]
    if not invocations:
        return invocations
    using = conf.DATABASE
    parked = _park_behind_their_key(options.task, invocations)
    with transaction.atomic(using=using) if parked else nullcontext():
        _insert(invocations, using)
        if parked:
            store(using).insert_events([
                event for invocation, first in parked for event in
                change(Status.REROUTED, note=f"parked at enqueue behind #{first.pk} of its key, enqueued with it")
                .events(invocation.pk, "")
            ])
    return invocations


def _park_behind_their_key(task: "TaskSpec", invocations: list[Invocation]) -> list[tuple[Invocation, Invocation]]:
    """Create parked each invocation that admission would park behind earlier ones of the same call.

    Return (parked invocation, first of its key) pairs. Those admitted stay
    registered and wake the next when they end, as a claim that found its
    key busy would have arranged: the queue then holds each key's head only,
    and no claim has to step over the rest. Admission sees only the call
    itself (the key's owners are decided at the claim), so a key's first
    ``limit`` calls (the limit each stored) are admitted: ``delay_many()``
    fills every slot of a key at once. Not for a task that drops blocked work,
    which is decided when the work comes up.
    """
    policy = task.policy
    if not policy.park_blocked:
        return []
    of_key: dict[str, list[Invocation]] = {}
    parked = []
    for invocation in invocations:
        key = invocation.running_key
        if key is None:
            continue
        earlier = of_key.setdefault(key, [])
        if admission.admit(policy, KeyState(ahead=len(earlier), limit=invocation.running_limit)).verdict is Verdict.PARK:
            invocation.status = Status.REROUTED
            parked.append((invocation, earlier[0]))
        earlier.append(invocation)
    return parked


def _insert(invocations: list[Invocation], using: str) -> None:
    """Insert built invocations of one queue, wake its runners on commit, and set what the database filled in.

    As many rows a statement as the database takes. Inside a transaction, in a
    savepoint: a failed insert leaves the caller's transaction usable.
    """
    connection = connections[using]
    if any(invocation.arguments_value_id is not None for invocation in invocations):
        # The values first, in the invocations' transaction: they commit or roll back together.
        with transaction.atomic(using=using):
            _hold(invocations, using)
            _insert_rows_of(invocations, using, connection)
        return
    _insert_rows_of(invocations, using, connection)


def _insert_rows_of(invocations: list[Invocation], using: str, connection: "BaseDatabaseWrapper") -> None:
    if not connection.features.can_return_rows_from_bulk_insert:
        with transaction.atomic(using=using):
            for invocation in invocations:
                invocation.save(using=using, force_insert=True)
            store(using).notify(invocations[0].queue)
        return
    # One call (a delay()) needs no batch size: the database's limits hold one row.
    size = 1 if len(invocations) == 1 else max(1, min(_BATCH_SIZE, connection.ops.bulk_batch_size(
        _WRITTEN, invocations)))
    # Alone, one statement is atomic by itself: a delay() in autocommit is one round trip.
    alone = len(invocations) <= size and not connection.in_atomic_block
    with nullcontext() if alone else transaction.atomic(using=using):
        for start in range(0, len(invocations), size):
            batch = invocations[start : start + size]
            _adopt(batch, _insert_rows(connection, _rows(batch, connection), batch[0].queue), connection)


def _hold(invocations: list[Invocation], using: str) -> None:
    """Store the distinct out-of-line values of ``invocations`` (once a batch), kept from the prune until commit."""
    held: dict[str, Value] = {}
    for invocation in invocations:
        if invocation.arguments_value_id is not None and invocation.arguments_value_id not in held:
            held[invocation.arguments_value_id] = invocation.arguments_value  # type: ignore[assignment]
    if held:
        store(using).hold_values(list(held.values()))


def _insert_rows(connection: "BaseDatabaseWrapper", rows: list[list[Any]], queue: str) -> list[tuple[Any, ...]]:
    """Insert rows of ``_WRITTEN`` values in one statement, waking runners of ``queue``; return their ``_RETURNED``."""
    return store(connection.alias).insert(_WRITTEN, rows, _RETURNED, queue)


#: Each connection's prepared scalar values, a dict a column (``_rows``), emptied past ``_PREPARED_KEPT``.
_prepared: dict[str, list[dict[Any, Any]]] = {}
_PREPARED_KEPT = 256


def _rows(invocations: list[Invocation], connection: "BaseDatabaseWrapper") -> list[list[Any]]:
    """Return each built invocation's values for ``_WRITTEN``, prepared by its field as save() would."""
    # Calls repeat most values (the task, the queue, the defaults, the [] and {} of calls without
    # arguments): prepare each distinct one once a column, and keep them from one call to the next
    # (a few hundred a column at most: a key or a note is seldom seen twice).
    prepared = _prepared.get(connection.alias)
    if prepared is None or any(len(seen) > _PREPARED_KEPT for seen in prepared):
        prepared = _prepared[connection.alias] = [{} for _ in _WRITTEN]
    rows = []
    for invocation in invocations:
        row = []
        for field, seen, value in zip(_WRITTEN, prepared, _written_values(invocation), strict=True):
            kind = type(value)
            if kind in _SCALARS:
                key = value
            elif kind in _CONTAINERS and not value:
                key = kind
            elif kind is bool:
                key = (bool, value)  # apart from 1 and 0, which equal True and False
            else:
                row.append(field.get_db_prep_save(value, connection))
                continue
            if key not in seen:
                seen[key] = field.get_db_prep_save(value, connection)
            row.append(seen[key])
        rows.append(row)
    return rows


def _adopt(invocations: list[Invocation], rows: list[tuple[Any, ...]], connection: "BaseDatabaseWrapper") -> None:
    """Set on inserted invocations what the database returned, read as the ORM reads it, and mark them saved."""
    db = store(connection.alias)
    # SQLite documents the order of RETURNING rows as arbitrary; ids grow in insert order on both databases.
    rows = sorted(rows)
    for field, values in zip(_RETURNED, zip(*rows, strict=True), strict=True):
        # The rows of a statement share their clock reading: read each distinct value once.
        read = {value: db.read(field.attname, value) for value in set(values)}
        for invocation, value in zip(invocations, values, strict=True):
            setattr(invocation, field.attname, read[value])
    for invocation in invocations:
        invocation._state.adding = False
        invocation._state.db = connection.alias


def _build(
    options: "Options", args: tuple[Any, ...], kwargs: dict[str, Any], memo: Memo | None = None,
    now: datetime | None = None,
) -> Invocation:
    task = options.task
    where = f"{task.name}.delay()"
    arguments = _bind(task, args, kwargs, where)
    if check_arguments(arguments, where=where, memo=memo) > conf.INLINE_VALUE_BYTES:
        return _outlined(options, args, kwargs, where, arguments, memo, now)
    running_key, registration_key = task.keys_for(arguments)
    return _new(
        running_limit=task.policy.limit_for(arguments, where=where) if running_key is not None else 1,
        task_name=task.name,
        queue=options.queue,
        priority=options.priority,
        args=_plain(args),
        kwargs=_plain(kwargs),
        running_key=running_key,
        registration_key=registration_key,
        run_after=_when(options.run_after, now),
        **_cause_fields(options.cause),
        parent_id=_parent_id(options.cause),
    )


def _outlined(options: "Options", args: tuple[Any, ...], kwargs: dict[str, Any], where: str,
              arguments: dict[str, Any], memo: Memo | None, now: datetime | None) -> Invocation:
    """Build a call whose arguments take more than ``KEYJOBS_INLINE_VALUE_BYTES``: its largest out of line."""
    task = options.task
    running_key, registration_key = task.keys_for(arguments)
    outlined = outline_arguments(args, kwargs, keys=_key_places(task, args, kwargs), where=where, memo=memo)
    invocation = _new(
        running_limit=task.policy.limit_for(arguments, where=where) if running_key is not None else 1,
        task_name=task.name,
        queue=options.queue,
        priority=options.priority,
        args=_plain(outlined.args if outlined else args),
        kwargs=_plain(outlined.kwargs if outlined else kwargs),
        running_key=running_key,
        registration_key=registration_key,
        run_after=_when(options.run_after, now),
        **_cause_fields(options.cause),
        parent_id=_parent_id(options.cause),
    )
    if outlined is not None:
        value = outlined.value
        invocation.arguments_value = Value(digest=value.digest, data=value.data, size=value.size)
        invocation.arguments_outline = outlined.outline
    return invocation


def _key_places(task: "TaskSpec", args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[tuple[str, str], str]:
    """Return where a call's key arguments are in its args and kwargs (they stay in the row), with their names."""
    parameters = task.signature.parameters
    names = task.policy.key_names(parameters)
    if not names:
        return {}
    positional = [parameter.name for parameter in parameters.values()
                  if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)]
    rest = next((parameter.name for parameter in parameters.values() if parameter.kind is parameter.VAR_POSITIONAL), "")
    extra = next((parameter.name for parameter in parameters.values() if parameter.kind is parameter.VAR_KEYWORD), "")
    places = {("args", str(index)): positional[index] if index < len(positional) else rest for index in range(len(args))}
    places.update({("kwargs", name): name if name in parameters else extra for name in kwargs})
    return {place: name for place, name in places.items() if name in names}


def _parent_id(cause: "Cause | None") -> int | None:
    """Return the invocation whose run delays this call, if any: a tick's or a trigger's cause says why instead."""
    run = this_run()
    return run.invocation.pk if run is not None and cause is None else None


def _cause_fields(cause: "Cause | None") -> dict[str, Any]:
    if cause is None:
        return {}
    return {"cause_schedule_id": cause.schedule_id, "cause_tick": cause.tick, "cause_event": cause.event,
            "cause_invocation_id": cause.invocation_id, "cause_status": cause.status}


def _bind(task: "TaskSpec", args: tuple[Any, ...], kwargs: dict[str, Any], where: str) -> dict[str, Any]:
    """Return the call's arguments by parameter name, defaults applied; ArgumentError if they do not fit."""
    if not (args or kwargs or task.signature.parameters):
        return {}  # an empty call of a function without parameters: nothing to bind
    try:
        bound = task.signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise ArgumentError(f"{where}: {exc}") from None
    bound.apply_defaults()
    return dict(bound.arguments)


def _plain(value: Any) -> Any:
    """Return a copy of ``value`` with every tuple made a list, as it reads back from JSON."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _when(run_after: datetime | timedelta | None, now: datetime | None) -> datetime | None:
    """Return when a call asked to run: a delay counts from ``now``, else from the database's clock."""
    if isinstance(run_after, timedelta):
        return (now if now is not None else store(conf.DATABASE).clock()) + run_after
    return run_after
