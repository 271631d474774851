"""The portable store: the statements a runner repeats for every invocation, built once from the models.

The ORM compiles a statement anew on every call, and a runner makes several
per invocation: ``python -m bench.profile`` put that compiling at most of a
worker's CPU per invocation, ten times what the database spent. These few
statements are built once per connection instead, from the models' own table
and column names and the database's own quoting, row-locking and clock
syntax, and rows are read back through the same converters the ORM applies.
Everything that does not run once per invocation stays on the ORM.

Portable: it is SQL both SQLite and PostgreSQL take, through Django's cursor;
``keyjobs.store.postgres`` adds whole steps in one statement where
PostgreSQL can.
"""

import threading
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.db import IntegrityError, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Model
from django.db.models.functions import Now
from django.db.models.sql.subqueries import UpdateQuery

from ..admission import Control, Rate
from ..models import Event, Invocation, KeyControl, RateToken, Runner, Value
from ..status import OWNED, WAITING, Change, EventRow, Status
from .interface import KeyAhead, LockedRow, Steps, WaitingRow, Window

#: Field types whose get_db_prep_save() returns a str, an int or None unchanged.
_PLAIN_TYPES = frozenset({"CharField", "TextField", "IntegerField", "PositiveIntegerField",
                          "PositiveSmallIntegerField", "SmallIntegerField", "BigIntegerField", "BigAutoField",
                          "AutoField", "ForeignKey"})

#: Compiled expressions a connection keeps: the few that come back on every call, not each retry's own delay.
EXPRESSIONS_KEPT = 64

#: Event rows per INSERT: 7 parameters each, within SQLite's 32,766 and PostgreSQL's 65,535.
EVENT_BATCH = 2000

#: The queue's order: by effective priority (its own, raised by one for each run waiting on it: waited-on work goes
#: first), then by when each invocation (last) entered the queue.
QUEUE_ORDER = (("effective_priority", " DESC"), ("registered_at", ""), ("id", ""))
#: The order of one key's invocations: by effective priority, then in the order they were enqueued.
KEY_ORDER = (("effective_priority", " DESC"), ("id", ""))


def place(invocation: Invocation, order: Sequence[tuple[str, str]]) -> list[Any]:
    """Return ``invocation``'s place in ``order``: its values of the order's columns (``Store.ahead()`` takes it)."""
    return [getattr(invocation, column) for column, _ in order]


@dataclass(frozen=True)
class Expression:
    """An SQL expression (with its parameters) where ``Store.ahead()`` would otherwise take a value."""

    sql: str
    params: tuple[Any, ...] = ()

#: SQLite's write turn within this process, per database file.
_writers: dict[str, threading.RLock] = {}


class Store:
    """The hot path's SQL for one connection; see the module docstring."""

    #: Whole steps in one statement, where the database has them (``keyjobs.store.postgres``).
    steps: Steps | None = None
    #: Whether the database wakes idle runners itself (LISTEN/NOTIFY); else they poll.
    notifies = False

    def __init__(self, connection: BaseDatabaseWrapper) -> None:
        self.connection = connection
        ops, features = connection.ops, connection.features
        quote = ops.quote_name
        self.quote = quote
        self.invocations = quote(Invocation._meta.db_table)
        self.events = quote(Event._meta.db_table)
        self.fields = list(Invocation._meta.concrete_fields)
        self.attnames = [field.attname for field in self.fields]
        # Concrete fields always have a column.
        self.column_list = [quote(field.column or "") for field in self.fields]
        #: By field name and attname: (quoted column, field, whether a str/int/None goes to it unprepared).
        self._columns = {
            name: (quote(field.column or ""), field, field.get_internal_type() in _PLAIN_TYPES)
            for field in self.fields for name in {field.name, field.attname}
        }
        self.columns = ", ".join(self.column_list)
        self.converters = []
        for field in self.fields:
            column = field.get_col(Invocation._meta.db_table)
            found = ops.get_db_converters(column) + column.get_db_converters(connection)
            self.converters.append([(converter, column) for converter in found])
        self._converters_of = dict(zip(self.attnames, self.converters, strict=True))
        self.update_query = UpdateQuery(Invocation)
        self.compiler = self.update_query.get_compiler(connection=connection)
        self.now, _ = self.compiler.compile(Now())
        no_key = features.has_select_for_no_key_update
        if features.has_select_for_update:
            self.lock = " " + ops.for_update_sql(no_key=no_key)
            self.lock_skip = " " + ops.for_update_sql(
                skip_locked=features.has_select_for_update_skip_locked, no_key=no_key
            )
        else:
            # SQLite has no row locks: its IMMEDIATE transactions take the database's write lock instead.
            self.lock = self.lock_skip = ""
        #: A shared row lock, skipping rows others lock (so it never waits, and never deadlocks): the
        #: status of a row it takes cannot change meanwhile.
        self.lock_share = (" FOR SHARE SKIP LOCKED" if features.has_select_for_update_skip_locked
                           else " FOR SHARE" if features.has_select_for_update else "")
        #: How a claim locks its runner's row until it commits (``may_claim_sql``): the weakest lock a recovery's
        #: FOR UPDATE waits for, which neither a heartbeat nor the runner's other claims wait for.
        self.lock_runner = (" FOR KEY SHARE" if no_key else " FOR SHARE" if features.has_select_for_update else "")
        self.due = f"({quote('run_after')} IS NULL OR {quote('run_after')} <= {self.now})"
        # The statuses as literals, exactly as the partial indexes' conditions spell them: a
        # database uses a partial index only where it can prove the query implies its condition,
        # which SQLite (always) and PostgreSQL (in a prepared statement's generic plan) cannot
        # with the statuses as parameters.
        self.is_registered = f"{quote('status')} = {literal(Status.REGISTERED)}"
        self.is_waiting = f"{quote('status')} IN ({', '.join(map(literal, sorted(WAITING)))})"
        self.is_owned = f"{quote('status')} IN ({', '.join(map(literal, sorted(OWNED)))})"
        #: The order of one key's invocations, and the order of the queue (see ``claimable``).
        self.key_order = self.order(KEY_ORDER)
        self.queue_order = self.order(QUEUE_ORDER)
        self.event_columns = ", ".join(quote(column) for column in (
            "invocation_id", "kind", "from_status", "to_status", "runner_id", "runner_thread", "note"))
        self._expressions: dict[str, tuple[str, list[Any]]] = {}
        self._expressions_by_id: dict[int, tuple[Any, tuple[str, list[Any]]]] = {}
        self._orders: dict[tuple[str, ...], list[int]] = {}
        self._inserts: dict[tuple[Any, ...], str] = {}
        self._retries_due: str | None = None
        self.controls = quote(KeyControl._meta.db_table)
        #: Whether the invocation of the outer query has an operator's control in force on its key: a column of the
        #: claim's candidates, so that a key without one costs no statement.
        self._controlled = self.control_in_force(f"{self.invocations}.{quote('task_name')}",
                                                 f"{self.invocations}.{quote('running_key')}")
        self._key_control: str | None = None
        #: ``ahead``'s renderings, per shape of place (a few: the queue's and the key's orders, by who asks).
        self._ahead: dict[tuple[Any, ...], tuple[str, list[int]]] = {}

    def order(self, order: Sequence[tuple[str, str]], table: str | None = None) -> str:
        """Return an ORDER BY list of ``order``'s columns, of ``table`` if given."""
        prefix = f"{table}." if table else ""
        return ", ".join(f"{prefix}{self.order_column(column)}{direction}" for column, direction in order)

    def order_column(self, column: str) -> str:
        """Return a column of an order as the statements name it."""
        return self.quote(column)

    def one_of(self, column: str, values: Sequence[Any], *, negate: bool = False) -> tuple[str, list[Any]]:
        """Return a condition that ``column`` is (``negate``: is not) one of ``values``, and its parameters."""
        return f"{column} {'NOT IN' if negate else 'IN'} ({', '.join(['%s'] * len(values))})", list(values)

    def cursor(self) -> Any:
        """Return a cursor for these statements."""
        return self.connection.cursor()

    def let_go(self) -> None:
        """Give this thread's connection back to Django's pool, where the database has one (``OPTIONS["pool"]``).

        For a thread about to do something other than query (run a task's own
        code, sleep until its next duty): it takes a connection again, cheaply,
        with its next query. Without a pool that would be a new connection each
        time, so the connection is kept; and never inside a transaction.
        """
        if self.pooled and not self.connection.in_atomic_block:
            self.connection.close()

    @property
    def pooled(self) -> bool:
        """Whether closing this connection gives it back to Django's pool, to be taken again cheaply."""
        return getattr(self.connection, "pool", None) is not None

    def writing(self) -> Any:
        """Return a context that holds this process's turn to write, where the database has one writer.

        SQLite lets one transaction write at a time and makes the others
        retry on a timer (1 ms, 2 ms, 5 ms ... up to 100 ms): threads of one
        runner queue here instead and go in turn. Other processes still meet
        SQLite's lock. A database with row locks needs no turn.
        """
        if self.lock:
            return nullcontext()
        name = self.connection.settings_dict["NAME"]
        turn = _writers.get(name)
        if turn is None:
            turn = _writers.setdefault(name, threading.RLock())  # setdefault: one lock even if two threads race
        return turn

    # -- reading -----------------------------------------------------------

    def _rows(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        with self.cursor() as cursor:
            cursor.execute(sql, params)
            rows: list[tuple[Any, ...]] = cursor.fetchall()
            return rows

    def read(self, attname: str, value: Any) -> Any:
        """Return a column's value as the ORM reads it (through the converters of field ``attname``)."""
        for converter, column in self._converters_of[attname]:
            value = converter(value, column, self.connection)
        return value

    def _invocations(self, rows: Iterable[Sequence[Any]], columns: Sequence[str] | None = None) -> list[Invocation]:
        """Build invocations from rows of every column: in field order, or named by ``columns``."""
        using = self.connection.alias
        order = self._order(tuple(columns)) if columns is not None else None
        found = []
        for row in rows:
            values = list(row) if order is None else [row[index] for index in order]
            for index, converters in enumerate(self.converters):
                for converter, column in converters:
                    values[index] = converter(values[index], column, self.connection)
            found.append(Invocation.from_db(using, self.attnames, values))
        return found

    def _order(self, columns: tuple[str, ...]) -> list[int]:
        """Where each field's column is among ``columns`` (worked out once for each list of columns)."""
        order = self._orders.get(columns)
        if order is None:
            order = self._orders[columns] = [columns.index(field.column) for field in self.fields]
        return order

    def may_claim_sql(self) -> str:
        """The condition that runner ``%s`` may take work: it has not stopped, nor been declared lost.

        Its row stays locked until the claim commits: a recovery, which locks
        the row to declare the runner lost, either comes after the claim and
        finds what it took, or before it, and the claim takes nothing. (SQLite
        writes one transaction at a time.)
        """
        q = self.quote
        return (f"EXISTS (SELECT 1 FROM {q(Runner._meta.db_table)} WHERE {q('id')} = %s "
                f"AND {q('stopped_at')} IS NULL{self.lock_runner})")

    def may_claim(self, runner_id: int) -> bool:
        """Return whether runner ``runner_id`` may take work (``may_claim_sql``); call it in the claim's transaction."""
        return bool(self._rows(f"SELECT {self.may_claim_sql()}", [runner_id])[0][0])

    def claimable(self, queues: Sequence[str] | None, limit: int, *, runner_id: int) -> list[Invocation]:
        """Lock (skipping locked ones) and return the first ``limit`` claimable invocations, in claim order, if runner
        ``runner_id`` may take work (``may_claim_sql``, in the same statement); none if it may not.

        Registered and due, by priority, then by when each entered the queue
        (``registered_at``), not by id: the next invocation of a key that has
        just freed goes behind the work already waiting, so that a key with a
        deep backlog takes its turn with the others instead of holding a
        runner thread for as long as its backlog lasts.

        Each is marked ``controlled`` if an operator's control is in force on
        its key (``KeyControl``), read in the same statement.
        """
        rows = self._rows(*self.claimable_sql(f"{self.columns}, {self._controlled}", queues, limit,
                                              condition=(self.may_claim_sql(), [runner_id])))
        found = self._invocations(row[:-1] for row in rows)
        for invocation, row in zip(found, rows, strict=True):
            invocation.controlled = bool(row[-1])
        return found

    def control_in_force(self, task_name: str, running_key: str) -> str:
        """Return the condition that the key these SQL expressions name has a control in force: paused, or an
        override whose time has not come (the database's clock)."""
        q = self.quote
        return (f"EXISTS (SELECT 1 FROM {self.controls} AS kc WHERE kc.{q('task_name')} = {task_name} "
                f"AND kc.{q('running_key')} = {running_key} AND (kc.{q('paused')} OR kc.{q('until')} > {self.now}))")

    def key_control(self, task_name: str, running_key: str) -> Control | None:
        """Return the operator's control in force on a key (``KeyControl``), None if there is none."""
        rows = self._rows(self.key_control_sql(), [task_name, running_key])
        return control_of(rows[0]) if rows else None

    def key_slots(self, task_name: str, running_key: str) -> tuple[set[int], Control | None]:
        """Return the slots a key's owners hold (unlocked) and the control in force on it, in one statement."""
        rows = self._rows(self.key_slots_sql(), [task_name, running_key, task_name, running_key])
        held = {row[1] for row in rows if row[0] == 0}
        controls = [row[2:] for row in rows if row[0] == 1]
        return held, control_of(controls[0]) if controls else None

    def key_slots_sql(self) -> str:
        """Return ``key_slots``'s query, the one the tests EXPLAIN: its parameters, the task and the key, twice.

        Two queries side by side, each through its own index. Joined (``LEFT
        JOIN ... ON 1 = 1``), SQLite flattened the owners' query, lost its
        order, and read every invocation of the key through ``keyjobs_by_key``
        (0.3 ms a wake-up behind a backlog of 2,000; see ``owned_slots_sql``).
        """
        return (f"SELECT 1, NULL, control.* FROM ({self.key_control_sql()}) AS control UNION ALL "
                f"SELECT 0, owners.slot, NULL, NULL, NULL, NULL, NULL FROM ({self.owned_slots_sql()}) AS owners")

    def key_control_sql(self) -> str:
        """Return ``key_control``'s query: its parameters, the task and the key."""
        if self._key_control is None:
            q = self.quote
            self._key_control = (
                f"SELECT {q('paused')} AS paused, CASE WHEN {q('until')} > {self.now} THEN 1 ELSE 0 END AS live, "
                f"{q('running_limit')} AS lim, {q('rate_count')} AS rate_count, {q('rate_window')} AS rate_window "
                f"FROM {self.controls} WHERE {q('task_name')} = %s AND {q('running_key')} = %s "
                f"AND ({q('paused')} OR {q('until')} > {self.now})")
        return self._key_control

    def claimable_exists(self, queues: Sequence[str] | None, *, ahead_of: int | None = None) -> bool:
        """Return whether anything is waiting to be claimed from ``queues`` (all when empty).

        With ``ahead_of``, only what is ahead of that invocation's place in the queue counts.
        """
        ahead = None
        if ahead_of is not None:
            q = self.quote
            ahead = self.ahead(QUEUE_ORDER, [
                *(Expression(f"(SELECT {q(column)} FROM {self.invocations} WHERE {q('id')} = %s)", (ahead_of,))
                  for column, _ in QUEUE_ORDER[:-1]), ahead_of])
        return bool(self._rows(*self.claimable_sql("1", queues, 1, lock=False, ordered=False, condition=ahead)))

    def ahead(
        self, order: Sequence[tuple[str, str]], place: Sequence[Any], *, behind: bool = False
    ) -> tuple[str, list[Any]]:
        """Return the condition (and its parameters) that a row is ahead of ``place`` in ``order`` (``behind``: after it).

        The one rendering of ``QUEUE_ORDER`` and ``KEY_ORDER`` as a comparison.
        ``place`` holds a value or an ``Expression`` for each of the order's
        first columns; given fewer than all, it is the place after every row
        equal to it in those (where a row not yet inserted goes, its id the
        largest). Here, nested comparisons (each value read more than once);
        a store may render it as one row comparison instead. Rendered once
        per shape of ``place``: its parameters are then laid out by number.
        """
        shape = (tuple(order), tuple(value.sql if isinstance(value, Expression) else None for value in place), behind)
        rendered = self._ahead.get(shape)
        if rendered is None:
            if len(self._ahead) >= EXPRESSIONS_KEPT:
                self._ahead.clear()
            rendered = self._ahead[shape] = self._render_ahead(order, [
                value.sql if isinstance(value, Expression) else "%s" for value in place], behind)
        condition, numbers = rendered
        params: list[Any] = []
        for number in numbers:
            value = place[number]
            if isinstance(value, Expression):
                params += value.params
            else:
                params.append(value)
        return condition, params

    def _render_ahead(self, order: Sequence[tuple[str, str]], sqls: list[str], behind: bool) -> tuple[str, list[int]]:
        """Return ``ahead``'s condition for a place whose values are ``sqls``, and which value each of its
        parameters comes from, in order."""
        condition, numbers = "", []
        for number, ((column, direction), sql) in reversed(list(enumerate(zip(order[:len(sqls)], sqls, strict=True)))):
            after = (direction == " DESC") != behind
            strict = behind or len(sqls) == len(order) or number < len(sqls) - 1
            operator = (">" if after else "<") + ("" if strict else "=")
            column = self.order_column(column)
            if not condition:
                condition, numbers = f"{column} {operator} {sql}", [number]
            else:
                condition = f"({column} {operator} {sql} OR {column} = {sql} AND {condition})"
                numbers = [number, number, *numbers]
        return condition, numbers

    def claimable_sql(
        self, columns: str, queues: Sequence[str] | None, limit: int, *, lock: bool = True, ordered: bool = True,
        condition: tuple[str, list[Any]] | None = None,
    ) -> tuple[str, list[Any]]:
        """Return the claim's query (see ``claimable``), the one the tests EXPLAIN; ``condition``: a further one, and
        its parameters."""
        where, params = f"{self.is_registered} AND {self.due}", []
        if condition is not None:
            where += f" AND {condition[0]}"
            params += condition[1]
        if queues:
            # A list, not an array: PostgreSQL reads keyjobs_claim_by_queue in order only for `queue IN (...)`.
            where += f" AND {self.quote('queue')} IN ({', '.join(['%s'] * len(queues))})"
            params += list(queues)
        return (f"SELECT {columns} FROM {self.invocations} WHERE {where} "
                f"{'ORDER BY ' + self.queue_order if ordered else ''} LIMIT {int(limit)}"
                f"{self.lock_skip if lock else ''}"), params

    def retries_due(self) -> bool:
        """Return whether a retry's delay is over (the duty that registers them again asks, as often as runners poll)."""
        if self._retries_due is None:
            self._retries_due = (f"SELECT 1 FROM {self.invocations} WHERE {self.quote('status')} = "
                                 f"{literal(Status.RETRY)} AND {self.due} LIMIT 1")
        return bool(self._rows(self._retries_due, []))

    def lock_invocation(self, pk: int, status: str) -> Invocation | None:
        """Lock and return invocation ``pk`` if it is still in ``status``."""
        sql = (f"SELECT {self.columns} FROM {self.invocations} WHERE {self.quote('id')} = %s "
               f"AND {self.quote('status')} = %s{self.lock}")
        found = self._invocations(self._rows(sql, [pk, status]))
        return found[0] if found else None

    def lock_rows(self, ids: Sequence[int]) -> list[LockedRow]:
        """Lock invocations ``ids``; return (id, status, runner id) of each, in id order."""
        q = self.quote
        sql = (f"SELECT {q('id')}, {q('status')}, {q('runner_id')} FROM {self.invocations} "
               f"WHERE {q('id')} IN ({', '.join(['%s'] * len(ids))}) ORDER BY {q('id')}{self.lock}")
        return [LockedRow(*row) for row in self._rows(sql, list(ids))]

    def owned_slots(self, task_name: str, running_key: str, *, lock: bool) -> set[int]:
        """Return the slots held by the owners of a key, locking the owners' rows with ``lock``."""
        return {slot for (slot,) in self._rows(self.owned_slots_sql(lock=lock), [task_name, running_key])}

    def owned_slots_sql(self, *, lock: bool = False) -> str:
        """Return ``owned_slots``'s query, the one the tests EXPLAIN.

        In slot order: that makes the partial unique index of owners
        (``keyjobs_one_owner_per_running_key``, a few rows) the only index
        that serves it as well as it can. Without it, SQLite chose between
        that index and ``keyjobs_by_key`` (every invocation of the key) by
        their order in the schema, which a migration rebuilding the table
        changes: with a key's backlog of 6,000, each look took 30 times longer.
        """
        q = self.quote
        return (f"SELECT {q('slot')} FROM {self.invocations} WHERE {q('task_name')} = %s "
                f"AND {q('running_key')} = %s AND {self.is_owned} ORDER BY {q('slot')}{self.lock if lock else ''}")

    def waiting_in_key_order(
        self, task_name: str, running_key: str, limit: int | None, *, before: Invocation | None = None
    ) -> list[WaitingRow]:
        """Return a key's first due waiting invocations, in key order: ``limit`` of them, or (None) as many as the
        first one's stored ``running_limit`` (all a key's wake-up may need, in one look).

        With ``before``, only those ahead of that invocation.
        """
        q = self.quote
        where = f"{q('task_name')} = %s AND {q('running_key')} = %s AND {self.is_waiting} AND {self.due}"
        params: list[Any] = [task_name, running_key]
        if before is not None:
            ahead, ahead_params = self.ahead(KEY_ORDER, place(before, KEY_ORDER))
            where += f" AND {ahead}"
            params += ahead_params
        if limit is None:
            # COALESCE: with nothing waiting, SQLite refuses a LIMIT of NULL.
            count = (f"COALESCE((SELECT {q('running_limit')} FROM {self.invocations} WHERE {where} "
                     f"ORDER BY {self.key_order} LIMIT 1), 0)")
            params += params
        else:
            count = str(int(limit))
        sql = (f"SELECT {q('id')}, {q('status')}, {q('queue')}, {q('running_limit')} FROM {self.invocations} WHERE {where} "
               f"ORDER BY {self.key_order} LIMIT {count}")
        return [WaitingRow(*row) for row in self._rows(sql, params)]

    def busy_ahead_sql(self, ahead: KeyAhead) -> tuple[str, list[Any]]:
        """Lock (shared) and list, up to its limit, the key's owners and the due unparked invocations ahead of ``ahead``.

        What a new invocation of the key would find taking the key's slots
        ahead of it (``Steps.insert_or_park`` runs it): ahead in key order of
        a row not yet inserted. Parked ones are not
        counted, since an orphan (its waker died) would wait for the timed
        duty, where a registered invocation's claim wakes it at once. The
        share lock keeps each row counted from changing status until the
        statement's transaction ends; a row another transaction is changing is
        skipped, not counted: the count errs towards "not busy", which is
        always safe (a registered invocation is claimed, never lost).
        """
        q = self.quote
        in_line, in_line_params = self.ahead(KEY_ORDER, [ahead.priority])
        return (f"SELECT {q('id')} FROM {self.invocations} WHERE {q('task_name')} = %s AND {q('running_key')} = %s "
                f"AND ({self.is_owned} OR ({q('status')} IN ({literal(Status.REGISTERED)}, {literal(Status.RETRY)}) "
                f"AND {self.due} AND {in_line})) LIMIT %s{self.lock_share}"), [
            ahead.task_name, ahead.running_key, *in_line_params, ahead.limit]

    def registered_behind(self, head: Invocation, limit: int) -> list[LockedRow]:
        """Lock (skipping locked ones) the due registered invocations after ``head`` in its key, in key order."""
        q = self.quote
        behind, behind_params = self.ahead(KEY_ORDER, place(head, KEY_ORDER), behind=True)
        sql = (f"SELECT {q('id')}, {q('status')}, {q('runner_id')} FROM {self.invocations} "
               f"WHERE {q('task_name')} = %s AND {q('running_key')} = %s AND {self.is_registered} AND {self.due} "
               f"AND {behind} ORDER BY {self.key_order} LIMIT {int(limit)}{self.lock_skip}")
        return [LockedRow(*row) for row in self._rows(sql, [head.task_name, head.running_key, *behind_params])]

    # -- rate windows ------------------------------------------------------

    def take_start(self, task_name: str, running_key: str, rate: "Rate") -> Window:
        """Take one of the key's ``rate.count`` start tokens last used at least ``rate.window`` seconds ago.

        The token is taken by a conditional UPDATE, the arbiter of a race:
        runners skip a token another has locked, and one that waited for it
        finds, on the database's second look, that it no longer qualifies.
        Call it inside the claim's transaction, so that a claim undone gives
        its token back. One statement, unless the key has no tokens yet.
        """
        params = [task_name, running_key, rate.count]
        for made in (False, True):
            sql, horizon_params = self._take_start_sql(rate.window)
            rows = self._rows(sql, [*params, *horizon_params, *horizon_params])
            if rows:
                return Window(self.read("started_at", rows[0][0]), None)
            oldest, tokens = self._rows(self._tokens_sql(), params)[0]
            if made or tokens >= rate.count:
                break
            # The key's first start (or a limit since raised): its tokens, once, whoever races to make them.
            RateToken.objects.using(self.connection.alias).bulk_create(
                [RateToken(task_name=task_name, running_key=running_key, number=number)
                 for number in range(rate.count)], ignore_conflicts=True)
        if oldest is None:  # every token is being taken by a claim not yet committed: look again shortly
            return Window(None, self.clock() + timedelta(seconds=min(rate.window, 0.05)), contended=True)
        return Window(None, self.read("started_at", oldest) + timedelta(seconds=rate.window))

    def _take_start_sql(self, window: float) -> tuple[str, list[Any]]:
        q = self.quote
        horizon, horizon_params = self._expression(Now() - timedelta(seconds=window))
        free = f"({q('used_at')} IS NULL OR {q('used_at')} <= {horizon})"
        tokens = q(RateToken._meta.db_table)
        return (f"UPDATE {tokens} SET {q('used_at')} = {self.now} WHERE {q('id')} = ("
                f"SELECT {q('id')} FROM {tokens} WHERE {q('task_name')} = %s AND {q('running_key')} = %s "
                f"AND {q('number')} < %s AND {free} ORDER BY {q('used_at')} IS NOT NULL, {q('used_at')}, "
                f"{q('number')} LIMIT 1{self.lock_skip}) AND {free} RETURNING {q('used_at')}"), horizon_params

    def _tokens_sql(self) -> str:
        q = self.quote
        return (f"SELECT MIN({q('used_at')}), COUNT(*) FROM {q(RateToken._meta.db_table)} "
                f"WHERE {q('task_name')} = %s AND {q('running_key')} = %s AND {q('number')} < %s")

    def clock(self) -> Any:
        """Return the database's clock."""
        return self.read("created_at", self._rows(f"SELECT {self.now}", [])[0][0])

    # -- writing -----------------------------------------------------------

    def move(self, rows: Sequence[LockedRow], change: Change) -> None:
        """Apply ``change`` to locked invocations ``rows`` and insert its history rows."""
        events = [event for row in rows for event in change.events(row.id, row.status)]
        ids = [row.id for row in rows]
        statements = [self._update(ids, change.values), self._insert_events(events)]
        with self.cursor() as cursor:
            for sql, params in self.counting_waiters(ids, change, statements):
                cursor.execute(sql, params)

    def counting_waiters(
        self, ids: Sequence[int], change: Change, statements: list[tuple[str, list[Any]]]
    ) -> list[tuple[str, list[Any]]]:
        """Return ``statements`` (that write ``change`` to locked rows ``ids``), with the count of waiters kept.

        The one place ``Invocation.waiters`` is written: a change that writes
        ``waiting_on`` (a wait that starts, ends, or is recovered or cancelled
        with its run) takes its rows off the count of what they waited on
        before, and adds them to the count of what they wait on now, in the
        change's transaction. Relative updates under each counted row's lock,
        so that waits starting and ending at once add up.
        """
        if "waiting_on" not in change.values:
            return statements
        q, inv = self.quote, self.invocations
        marks = ", ".join(["%s"] * len(ids))
        # Before the change: each row's old wait, read while its lock is held.
        before = (f"UPDATE {inv} SET {q('waiters')} = {q('waiters')} - (SELECT count(*) FROM {inv} AS w "
                  f"WHERE w.{q('waiting_on_id')} = {inv}.{q('id')} AND w.{q('id')} IN ({marks})) "
                  f"WHERE {q('id')} IN (SELECT {q('waiting_on_id')} FROM {inv} WHERE {q('id')} IN ({marks}))",
                  [*ids, *ids])
        waited = change.values["waiting_on"]
        waited = waited.pk if isinstance(waited, Model) else waited
        if waited is None:
            return [before, *statements]
        after = (f"UPDATE {inv} SET {q('waiters')} = {q('waiters')} + %s WHERE {q('id')} = %s", [len(ids), waited])
        return [before, *statements, after]

    def insert_events(self, events: Sequence[EventRow]) -> None:
        """Insert history rows that go with no status change here (an invocation created parked)."""
        with self.cursor() as cursor:
            for start in range(0, len(events), EVENT_BATCH):
                cursor.execute(*self._insert_events(events[start : start + EVENT_BATCH]))

    def _update(self, ids: Sequence[int], values: Any) -> tuple[str, list[Any]]:
        assignments, params = self._set(values)
        return (f"UPDATE {self.invocations} {assignments} "
                f"WHERE {self.quote('id')} IN ({', '.join(['%s'] * len(ids))})"), [*params, *ids]

    def _set(self, values: Any) -> tuple[str, list[Any]]:
        """Return the SET clause writing ``values`` (field name to value or expression), and its parameters."""
        assignments, params = [], []
        for name, value in values.items():
            column, field, plain = self._columns[name]
            if hasattr(value, "resolve_expression"):
                sql, expression_params = self._expression(value)
                assignments.append(f"{column} = {sql}")
                params += expression_params
                continue
            if isinstance(value, Model):
                value = value.pk
            assignments.append(f"{column} = %s")
            # A text or number column takes a str, an int or None as it is: what save() would send.
            params.append(value if plain and (value is None or type(value) in (str, int)) else
                          field.get_db_prep_save(value, self.connection))
        return "SET " + ", ".join(assignments), params

    def _expression(self, value: Any) -> tuple[str, list[Any]]:
        # The same few expressions come back on every call (the clock, one more attempt), mostly as
        # the very same objects (status.NOW, status.ONE_MORE_ATTEMPT): known by identity at once.
        known = self._expressions_by_id.get(id(value))
        if known is not None and known[0] is value:
            return known[1]
        cache_key = repr(value)
        compiled = self._expressions.get(cache_key)
        if compiled is None:
            resolved = value.resolve_expression(self.update_query, allow_joins=False, for_save=True)
            sql, params = self.compiler.compile(resolved)
            # Unqualified, as SET may name the row's own columns: valid whatever alias the statement
            # gives the table (the one-statement steps alias it to stay short).
            compiled = (sql.replace(f"{self.invocations}.", ""), list(params))
            if len(self._expressions) >= EXPRESSIONS_KEPT:
                return compiled  # one of many (a retry's delay after the clock): compiled each time, never kept
            self._expressions[cache_key] = compiled
        if len(self._expressions_by_id) < EXPRESSIONS_KEPT:
            # Kept with the object itself, so that its id cannot be reused by another while cached.
            self._expressions_by_id[id(value)] = (value, compiled)
        return compiled

    def _insert_events(self, rows: Sequence[EventRow]) -> tuple[str, list[Any]]:
        # In order, in one statement: the ids follow the rows. The database stamps their time.
        one = "(" + ", ".join(["%s"] * 7) + ")"
        sql = f"INSERT INTO {self.events} ({self.event_columns}) VALUES {', '.join([one] * len(rows))}"
        return sql, [value for row in rows for value in row]


    # -- creating ----------------------------------------------------------

    def insert(self, fields: Sequence[Any], rows: Sequence[Sequence[Any]], returning: Sequence[Any],
               queue: str) -> list[tuple[Any, ...]]:
        """Insert invocations (rows of prepared values of ``fields``) in one statement; return ``returning``.

        Runners of ``queue`` are woken once the transaction commits, where the
        database wakes runners at all.
        """
        with self.cursor() as cursor:
            cursor.execute(self._insert_sql(tuple(fields), tuple(returning), len(rows)),
                           [value for row in rows for value in row])
            inserted: list[tuple[Any, ...]] = cursor.fetchall()
            return inserted

    def _insert_sql(self, fields: tuple[Any, ...], returning: tuple[Any, ...], rows: int) -> str:
        """Return the INSERT ... RETURNING of ``rows`` invocations (built once for each shape)."""
        sql = self._inserts.get((fields, returning, rows))
        if sql is None:
            quote = self.quote
            row = f"({', '.join(['%s'] * len(fields))})"
            sql = self._inserts[fields, returning, rows] = (
                f"INSERT INTO {self.invocations} ({', '.join(quote(field.column) for field in fields)}) "
                f"VALUES {', '.join([row] * rows)} RETURNING {', '.join(quote(field.column) for field in returning)}"
            )
        return sql

    # -- waking idle runners -------------------------------------------------

    def notify(self, queue: str) -> None:
        """Wake runners of ``queue`` once the current transaction commits, where the database can."""

    def listen(self, on_wake: Callable[[str], None], stop: threading.Event) -> threading.Thread | None:
        """Call ``on_wake(queue)`` for every wake-up until ``stop`` is set; None where the database has none."""
        return None

    # -- large values, out of the queue's rows (``keyjobs.values``) -----------------------------------------

    def hold_values(self, values: Sequence[Value]) -> None:
        """Store ``values`` that are not stored yet, and keep all of them from ``prune_values`` until commit.

        Call it in the transaction that inserts the invocations referring to
        them, before inserting them. Here (SQLite), the transaction holds the
        database's write lock from its start (``IMMEDIATE``): no prune comes
        between this and the commit.
        """
        Value.objects.using(self.connection.alias).bulk_create(values, ignore_conflicts=True)

    def checking_references_at_once(self) -> None:
        """Have this transaction's foreign keys checked at each statement's end, not at its commit.

        SQLite checks them at each statement already.
        """

    def prune_values(self, batch: int) -> int:
        """Delete at most ``batch`` values no invocation refers to, in one transaction; return how many.

        A value being held by a ``delay()`` (``hold_values``) is skipped (a
        row lock on PostgreSQL; the write lock here); the foreign keys refuse
        the rest, so an invocation never points at nothing. On PostgreSQL a
        ``delay()`` that commits its reference after the batch's statement
        began is not seen by it (read committed) and its foreign key refuses
        the whole batch: checked at the statement (``checking_references_at_once``),
        not at the commit, the batch's values are then deleted one statement
        each, and the one referred to since is left.
        """
        alias = self.connection.alias
        unreferenced = Value.objects.using(alias).unreferenced()
        with transaction.atomic(using=alias):
            self.checking_references_at_once()
            chosen = unreferenced.select_for_update(skip_locked=True).values("pk")[:batch]
            try:
                with transaction.atomic(using=alias):  # a savepoint: a refusal leaves the locks taken
                    return unreferenced.filter(pk__in=chosen)._raw_delete(alias)
            except IntegrityError:
                deleted = 0
                for pk in [row["pk"] for row in chosen]:
                    with suppress(IntegrityError), transaction.atomic(using=alias):
                        deleted += unreferenced.filter(pk=pk)._raw_delete(alias)
                return deleted


def control_of(row: Sequence[Any]) -> Control:
    """Return the control a row of ``Store.key_control`` reads: (paused, the override in force, limit, rate)."""
    paused, live, limit, count, window = row
    return Control(paused=bool(paused), limit=limit if live else None,
                   rate=Rate(count, window) if live and count is not None else None)


def literal(status: str | None) -> str:
    """Return a status as an SQL string literal (statuses are our own upper-case names, never user data)."""
    if status is None:
        return "NULL"
    assert status.replace("_", "").isalpha() and status.isupper(), status
    return f"'{status}'"
