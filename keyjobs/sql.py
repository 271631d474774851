"""The statements a runner repeats for every invocation, built once from the models.

The ORM compiles a statement anew on every call, and a runner makes several
per invocation: ``python -m bench.profile`` put that compiling at most of a
worker's CPU per invocation, ten times what the database spent. These few
statements are built once per connection instead, from the models' own table
and column names and the database's own quoting, row-locking and clock
syntax, and rows are read back through the same converters the ORM applies.
Everything that does not run once per invocation stays on the ORM.

Portable: it is SQL both SQLite and PostgreSQL take, through Django's cursor;
``keyjobs.postgres.Statements`` joins statements where PostgreSQL can.
"""

import threading
from collections.abc import Collection, Iterable, Sequence
from typing import Any

from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Model
from django.db.models.functions import Now
from django.db.models.sql.subqueries import UpdateQuery

from .models import Event, Invocation
from .status import OWNED, WAITING, Status

#: Field types whose get_db_prep_save() returns a str, an int or None unchanged.
_PLAIN_TYPES = frozenset({"CharField", "TextField", "IntegerField", "PositiveIntegerField",
                          "PositiveSmallIntegerField", "SmallIntegerField", "BigIntegerField", "BigAutoField",
                          "AutoField", "ForeignKey"})

#: Event rows per INSERT: 7 parameters each, within SQLite's 32,766 and PostgreSQL's 65,535.
EVENT_BATCH = 2000

#: One event row: (invocation id, kind, from status, to status, runner id, runner thread, note).
EventRow = tuple[int, str, str, str, int | None, int | None, str]


#: SQLite's write turn within this process, per database file.
_writers: dict[str, threading.RLock] = {}


def statements(using: str) -> "Statements":
    """Return the statements of database ``using``, built on first use by this thread's connection."""
    connection = connections[using]
    built: Statements | None = getattr(connection, "_keyjobs_statements", None)
    if built is None:
        if connection.vendor == "postgresql":
            from .postgres import Statements as PostgresStatements

            built = PostgresStatements(connection)
        else:
            built = Statements(connection)
        connection._keyjobs_statements = built  # type: ignore[attr-defined]
    return built


class Statements:
    """The hot path's SQL for one connection; see the module docstring."""

    #: Whether whole steps are single statements here (``move_checked``, ``take_free``, ...).
    one_statement_steps = False

    def __init__(self, connection: BaseDatabaseWrapper) -> None:
        self.connection = connection
        ops, features = connection.ops, connection.features
        quote = ops.quote_name
        self.quote = quote
        self.invocations = quote(Invocation._meta.db_table)
        self.events = quote(Event._meta.db_table)
        self.fields = list(Invocation._meta.concrete_fields)
        self.attnames = [field.attname for field in self.fields]
        self.column_list = [quote(field.column) for field in self.fields]
        #: By field name and attname: (quoted column, field, whether a str/int/None goes to it unprepared).
        self._columns = {
            name: (quote(field.column), field, field.get_internal_type() in _PLAIN_TYPES)
            for field in self.fields for name in {field.name, field.attname}
        }
        self.columns = ", ".join(self.column_list)
        self.converters = []
        for field in self.fields:
            column = field.get_col(Invocation._meta.db_table)
            found = ops.get_db_converters(column) + column.get_db_converters(connection)
            self.converters.append([(converter, column) for converter in found])
        self._converters_of = dict(zip(self.attnames, self.converters))
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
        self.due = f"({quote('run_after')} IS NULL OR {quote('run_after')} <= {self.now})"
        # The statuses as literals, exactly as the partial indexes' conditions spell them: a
        # database uses a partial index only where it can prove the query implies its condition,
        # which SQLite (always) and PostgreSQL (in a prepared statement's generic plan) cannot
        # with the statuses as parameters.
        self.is_registered = f"{quote('status')} = {_literal(Status.REGISTERED)}"
        self.is_waiting = f"{quote('status')} IN ({', '.join(map(_literal, sorted(WAITING)))})"
        self.is_owned = f"{quote('status')} IN ({', '.join(map(_literal, sorted(OWNED)))})"
        #: The order of one key's invocations, and the order of the queue (see ``claimable``).
        self.key_order = f"{quote('priority')} DESC, {quote('id')}"
        self.queue_order = f"{quote('priority')} DESC, {quote('registered_at')}, {quote('id')}"
        self.event_columns = ", ".join(quote(column) for column in (
            "invocation_id", "kind", "from_status", "to_status", "runner_id", "runner_thread", "note"))
        self._expressions: dict[str, tuple[str, list[Any]]] = {}
        self._orders: dict[tuple[str, ...], list[int]] = {}

    def cursor(self) -> Any:
        """Return a cursor for these statements."""
        return self.connection.cursor()

    def writing(self) -> Any:
        """Return a context that holds this process's turn to write, where the database has one writer.

        SQLite lets one transaction write at a time and makes the others
        retry on a timer (1 ms, 2 ms, 5 ms ... up to 100 ms): threads of one
        runner queue here instead and go in turn. Other processes still meet
        SQLite's lock.
        """
        name = self.connection.settings_dict["NAME"]
        turn = _writers.get(name)
        if turn is None:
            turn = _writers.setdefault(name, threading.RLock())  # setdefault: one lock even if two threads race
        return turn

    # -- reading -----------------------------------------------------------

    def _rows(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        with self.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall()

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

    def claimable(self, queues: Sequence[str] | None, limit: int) -> list[Invocation]:
        """Lock (skipping locked ones) and return the first ``limit`` claimable invocations, in claim order.

        Registered and due, by priority, then by when each entered the queue
        (``registered_at``), not by id: the next invocation of a key that has
        just freed goes behind the work already waiting, so that a key with a
        deep backlog takes its turn with the others instead of holding a
        runner thread for as long as its backlog lasts.
        """
        return self._invocations(self._rows(*self.claimable_sql(self.columns, queues, limit)))

    def claimable_exists(self, queues: Sequence[str] | None) -> bool:
        """Return whether anything is waiting to be claimed from ``queues`` (all when empty)."""
        return bool(self._rows(*self.claimable_sql("1", queues, 1, lock=False, ordered=False)))

    def claimable_sql(
        self, columns: str, queues: Sequence[str] | None, limit: int, *, lock: bool = True, ordered: bool = True
    ) -> tuple[str, list[Any]]:
        """Return the claim's query (see ``claimable``), the one the tests EXPLAIN."""
        where, params = f"{self.is_registered} AND {self.due}", []
        if queues:
            where += f" AND {self.quote('queue')} IN ({', '.join(['%s'] * len(queues))})"
            params += list(queues)
        return (f"SELECT {columns} FROM {self.invocations} WHERE {where} "
                f"{'ORDER BY ' + self.queue_order if ordered else ''} LIMIT {int(limit)}"
                f"{self.lock_skip if lock else ''}"), params

    def lock_invocation(self, pk: int, status: str) -> Invocation | None:
        """Lock and return invocation ``pk`` if it is still in ``status``."""
        sql = (f"SELECT {self.columns} FROM {self.invocations} WHERE {self.quote('id')} = %s "
               f"AND {self.quote('status')} = %s{self.lock}")
        found = self._invocations(self._rows(sql, [pk, status]))
        return found[0] if found else None

    def lock_rows(self, ids: Sequence[int]) -> list[tuple[int, str, int | None]]:
        """Lock invocations ``ids``; return (id, status, runner id) of each, in id order."""
        q = self.quote
        sql = (f"SELECT {q('id')}, {q('status')}, {q('runner_id')} FROM {self.invocations} "
               f"WHERE {q('id')} IN ({', '.join(['%s'] * len(ids))}) ORDER BY {q('id')}{self.lock}")
        return [(pk, status, runner_id) for pk, status, runner_id in self._rows(sql, list(ids))]

    def owned_slots(self, task_name: str, running_key: str, *, lock: bool) -> set[int]:
        """Return the slots held by the owners of a key, locking the owners' rows with ``lock``."""
        q = self.quote
        sql = (f"SELECT {q('slot')} FROM {self.invocations} WHERE {q('task_name')} = %s "
               f"AND {q('running_key')} = %s AND {self.is_owned}{self.lock if lock else ''}")
        return {slot for (slot,) in self._rows(sql, [task_name, running_key])}

    def waiting_in_key_order(
        self, task_name: str, running_key: str, limit: int, *, before: Invocation | None = None
    ) -> list[tuple[int, str, str]]:
        """Return (id, status, queue) of a key's first due waiting invocations, in key order.

        With ``before``, only those ahead of that invocation.
        """
        q = self.quote
        where = f"{q('task_name')} = %s AND {q('running_key')} = %s AND {self.is_waiting} AND {self.due}"
        params: list[Any] = [task_name, running_key]
        if before is not None:
            where += (f" AND {q('id')} <> %s AND ({q('priority')} > %s OR ({q('priority')} = %s AND {q('id')} < %s))")
            params += [before.pk, before.priority, before.priority, before.pk]
        sql = (f"SELECT {q('id')}, {q('status')}, {q('queue')} FROM {self.invocations} WHERE {where} "
               f"ORDER BY {self.key_order} LIMIT {int(limit)}")
        return [(pk, status, queue) for pk, status, queue in self._rows(sql, params)]

    def registered_behind(self, head: Invocation, limit: int) -> list[tuple[int, str, int | None]]:
        """Lock (skipping locked ones) the due registered invocations after ``head`` in its key.

        Return (id, status, runner id) of each, in key order.
        """
        q = self.quote
        sql = (f"SELECT {q('id')}, {q('status')}, {q('runner_id')} FROM {self.invocations} "
               f"WHERE {q('task_name')} = %s AND {q('running_key')} = %s AND {self.is_registered} AND {self.due} "
               f"AND ({q('priority')} < %s OR ({q('priority')} = %s AND {q('id')} > %s)) "
               f"ORDER BY {self.key_order} LIMIT {int(limit)}{self.lock_skip}")
        params = [head.task_name, head.running_key, head.priority, head.priority, head.pk]
        return [(pk, status, runner_id) for pk, status, runner_id in self._rows(sql, params)]

    # -- whole steps in one statement (PostgreSQL; None here: the caller takes the general path) --

    def move_checked(
        self, ids: Sequence[int], to: str, steps: Sequence[tuple[str | None, str]], *, only_from: Collection[str],
        owner_id: int | None, values: dict[str, Any], runner_id: int | None, runner_thread: int | None, note: str,
    ) -> list[tuple[int, str, int | None]] | None:
        """Lock ``ids``, move those in ``only_from`` (all owned by ``owner_id`` if given) and record ``steps``.

        Return (id, status, runner id) of every row as it was, or None where
        the database cannot do it in one statement.
        """
        return None

    def take_free(
        self, queues: Sequence[str] | None, limit: int, *, known: Sequence[str], start: bool, runner_id: int,
        thread: int | None,
    ) -> tuple[list[Invocation], bool] | None:
        """Claim the head of the queue up to the first invocation that needs a decision, in one statement.

        That is an invocation of a task not in ``known``, or of a running key
        that is held or has work ahead of it. Return (the invocations claimed,
        whether such an invocation stopped the claim), or None where the
        database cannot do it in one statement.
        """
        return None

    def record_and_take(
        self, pk: int, steps: Sequence[tuple[str | None, str]], *, only_from: Collection[str], owner_id: int,
        values: dict[str, Any], runner_id: int, runner_thread: int | None, note: str,
        queues: Sequence[str] | None, known: Sequence[str],
    ) -> tuple[tuple[str, int | None] | None, list[Invocation], bool] | None:
        """``move_checked`` of one invocation, then ``take_free`` of one for the same runner thread, at once.

        Return ((status, runner id) of the moved row as it was, or None if it
        is gone; what was claimed; whether the claim stopped), or None where
        the database cannot do it in one statement.
        """
        return None

    def wake_next(
        self, task_name: str, running_key: str, *, runner_id: int | None, taker: Any, channel: str,
        known: Sequence[str] = (),
    ) -> tuple[Invocation | None, list[int]] | None:
        """``claim.wake_next`` for a key of one place, in one statement; see there.

        With ``known`` task names, a taker that is handed nothing claims the
        queue's head instead, in that same statement. Return (the invocation
        the taker runs next, the ids woken), or None where the database
        cannot do it in one statement.
        """
        return None

    # -- writing -----------------------------------------------------------

    def move(self, ids: Sequence[int], values: dict[str, Any], events: Sequence[EventRow]) -> None:
        """Write ``values`` (field name to value or expression) to invocations ``ids`` and insert ``events``."""
        for sql, params in (self._update(ids, values), self._insert_events(events)):
            with self.cursor() as cursor:
                cursor.execute(sql, params)

    def insert_events(self, events: Sequence[EventRow]) -> None:
        """Insert history rows that go with no status change here (an invocation created parked)."""
        with self.cursor() as cursor:
            for start in range(0, len(events), EVENT_BATCH):
                cursor.execute(*self._insert_events(events[start : start + EVENT_BATCH]))

    def _update(self, ids: Sequence[int], values: dict[str, Any]) -> tuple[str, list[Any]]:
        assignments, params = self._set(values)
        return (f"UPDATE {self.invocations} {assignments} "
                f"WHERE {self.quote('id')} IN ({', '.join(['%s'] * len(ids))})"), [*params, *ids]

    def _set(self, values: dict[str, Any]) -> tuple[str, list[Any]]:
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
        # The same few expressions come back on every call (the clock, one more attempt).
        cache_key = repr(value)
        if cache_key not in self._expressions:
            resolved = value.resolve_expression(self.update_query, allow_joins=False, for_save=True)
            sql, params = self.compiler.compile(resolved)
            # Unqualified, as SET may name the row's own columns: valid whatever alias the statement
            # gives the table (the one-statement steps alias it to stay short).
            self._expressions[cache_key] = (sql.replace(f"{self.invocations}.", ""), list(params))
        return self._expressions[cache_key]

    def _insert_events(self, rows: Sequence[EventRow]) -> tuple[str, list[Any]]:
        # In order, in one statement: the ids follow the rows. The database stamps their time.
        one = "(" + ", ".join(["%s"] * 7) + ")"
        sql = f"INSERT INTO {self.events} ({self.event_columns}) VALUES {', '.join([one] * len(rows))}"
        return sql, [value for row in rows for value in row]


def _literal(status: str | None) -> str:
    """Return a status as an SQL string literal (statuses are our own upper-case names, never user data)."""
    if status is None:
        return "NULL"
    assert status.replace("_", "").isalpha() and status.isupper(), status
    return f"'{status}'"
