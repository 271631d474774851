"""PostgreSQL-only code: LISTEN/NOTIFY, and statements joined into one.

Imported only through ``keyjobs.wakeups`` and ``keyjobs.sql``, each of which
has the portable version beside it.
"""

import logging
import threading
from contextlib import nullcontext
from collections.abc import Callable, Collection, Sequence
from typing import Any

import psycopg
from django.db import connections
from django.db.backends.postgresql.base import ServerBindingCursor
from django.db.models import F
from django.db.models.functions import Now

from . import sql
from .sql import _literal
from .conf import conf
from .models import Invocation
from .claim import HANDED, WOKEN

logger = logging.getLogger("keyjobs.worker")

#: Runs of one statement on a connection after which psycopg prepares it (psycopg's own default).
PREPARE_THRESHOLD = 5


class Statements(sql.Statements):
    """The hot path's statements, each step of an invocation's life in one statement.

    A data-modifying WITH runs to completion whether or not the main
    statement reads it, and all of a statement's parts see one snapshot: a
    race with another runner ends at the partial unique indexes, as on the
    portable path.
    """

    one_statement_steps = True

    def __init__(self, connection: Any) -> None:
        super().__init__(connection)
        self._columns_of: dict[str, list[str]] = {}

    def writing(self) -> Any:
        return nullcontext()  # row locks: writers of different rows go at once

    def cursor(self) -> Any:
        """Return a cursor that binds parameters on the server, so that these statements can be prepared.

        Planning the claim costs PostgreSQL more than running it. Django
        turns prepared statements off (``prepare_threshold`` None) for the
        sake of connection poolers; with ``KEYJOBS_PREPARE_STATEMENTS`` these
        statements are prepared on their fifth run on a connection anyway.
        Django's other queries bind on the client, which never prepares.
        """
        connection = self.connection
        connection.ensure_connection()
        connection.validate_thread_sharing()
        raw = connection.connection
        if conf.PREPARE_STATEMENTS and raw.prepare_threshold is None:
            raw.prepare_threshold = PREPARE_THRESHOLD
        cursor = ServerBindingCursor(raw)
        return connection.make_debug_cursor(cursor) if connection.queries_logged else connection.make_cursor(cursor)

    def move(self, ids: Sequence[int], values: dict[str, Any], events: Sequence[sql.EventRow]) -> None:
        update, update_params = self._update(ids, values)
        insert, insert_params = self._insert_events(events)
        with self.cursor() as cursor:
            cursor.execute(f"WITH moved AS ({update}) {insert}", [*update_params, *insert_params])

    def move_checked(
        self, ids: Sequence[int], to: str, steps: Sequence[tuple[str | None, str]], *, only_from: Collection[str],
        owner_id: int | None, values: dict[str, Any], runner_id: int | None, runner_thread: int | None, note: str,
    ) -> list[tuple[int, str, int | None]]:
        ctes, params = self._checked_move(ids, steps, only_from=only_from, owner_id=owner_id, values=values,
                                          runner_id=runner_id, runner_thread=runner_thread, note=note)
        with self.cursor() as cursor:
            cursor.execute(f"WITH {ctes} SELECT id, status, runner_id FROM locked ORDER BY id", params)
            return [(pk, status, runner) for pk, status, runner in cursor.fetchall()]

    def take_free(
        self, queues: Sequence[str] | None, limit: int, *, known: Sequence[str], start: bool, runner_id: int,
        thread: int | None,
    ) -> tuple[list[Invocation], bool] | None:
        if not known:
            return None
        ctes, params = self._take(queues, limit, known=known, start=start, runner_id=runner_id, thread=thread)
        sql_text = f"WITH {ctes} {self._taken_rows()}"
        with self.cursor() as cursor:
            cursor.execute(sql_text, params)
            rows = cursor.fetchall()
            return self._taken(rows, self._names(cursor, sql_text)[1:])

    def record_and_take(
        self, pk: int, steps: Sequence[tuple[str | None, str]], *, only_from: Collection[str], owner_id: int,
        values: dict[str, Any], runner_id: int, runner_thread: int | None, note: str,
        queues: Sequence[str] | None, known: Sequence[str],
    ) -> tuple[tuple[str, int | None] | None, list[Invocation], bool] | None:
        if not known:
            return None
        moving, move_params = self._checked_move([pk], steps, only_from=only_from, owner_id=owner_id, values=values,
                                                 runner_id=runner_id, runner_thread=runner_thread, note=note)
        # A runner whose outcome is refused (its work was taken from it) claims nothing.
        taking, take_params = self._take(queues, 1, known=known, start=True, runner_id=runner_id,
                                         thread=runner_thread, only_if="EXISTS (SELECT 1 FROM moved)",
                                         after="recorded")
        sql_text = (f"WITH {moving}, {taking} "
                    + self._taken_rows("(SELECT status FROM locked), (SELECT runner_id FROM locked), "))
        with self.cursor() as cursor:
            cursor.execute(sql_text, [*move_params, *take_params])
            rows = cursor.fetchall()
            names = self._names(cursor, sql_text)
        # Each row: stopped, the outcome's row as it was (status, runner), then what was taken.
        found = (rows[0][1], rows[0][2]) if rows and rows[0][1] is not None else None
        return (found, *self._taken([(row[0], *row[3:]) for row in rows], names[3:]))

    # -- the parts those statements are made of ---------------------------------------

    def _checked_move(
        self, ids: Sequence[int], steps: Sequence[tuple[str | None, str]], *, only_from: Collection[str],
        owner_id: int | None, values: dict[str, Any], runner_id: int | None, runner_thread: int | None, note: str,
    ) -> tuple[str, list[Any]]:
        """The CTEs ``locked`` (every row as it was), ``moved`` and their events."""
        q, inv = self.quote, self.invocations
        assignments, set_params = self._set(values)
        guard, guard_params = "", []
        if owner_id is not None:
            # All or nothing, as on the portable path: one row owned by another runner refuses the move.
            guard = (f" AND NOT EXISTS (SELECT 1 FROM locked WHERE locked.status IN ({_marks(only_from)}) "
                     f"AND locked.runner_id IS DISTINCT FROM %s)")
            guard_params = [*only_from, owner_id]
        step_rows, step_params = _steps(steps)
        ctes = (
            f"locked AS (SELECT {q('id')} AS id, {q('status')} AS status, {q('runner_id')} AS runner_id "
            f"FROM {inv} WHERE {q('id')} IN ({_marks(ids)}) ORDER BY {q('id')}{self.lock}), "
            f"moved AS (UPDATE {inv} AS m {assignments} FROM locked WHERE m.{q('id')} = locked.id "
            f"AND locked.status IN ({_marks(only_from)}){guard} RETURNING m.{q('id')} AS id, locked.status), "
            f"recorded AS (INSERT INTO {self.events} ({self.event_columns}) "
            f"SELECT moved.id, %s, COALESCE(step.came_from, moved.status), step.went_to, %s, %s, %s "
            f"FROM moved CROSS JOIN (VALUES {step_rows}) AS step(n, came_from, went_to) ORDER BY moved.id, step.n "
            f"RETURNING 1)"
        )
        return ctes, [*ids, *set_params, *only_from, *guard_params, "TRANSITION", runner_id, runner_thread, note,
                      *step_params]

    def _take(
        self, queues: Sequence[str] | None, limit: int, *, known: Sequence[str], start: bool, runner_id: int,
        thread: int | None, only_if: str = "TRUE", after: str = "",
    ) -> tuple[str, list[Any]]:
        """The CTEs ``cut`` (where the claim stopped, if it did), ``taken`` and their events.

        ``after`` names a CTE whose rows the events must follow in the history.
        """
        q, inv = self.quote, self.invocations
        candidates, params = self.claimable_sql(
            ", ".join(q(column) for column in ("id", "priority", "registered_at", "task_name", "running_key")),
            queues, limit)
        same_key = f"{q('task_name')} = candidate.task_name AND {q('running_key')} = candidate.running_key"
        values: dict[str, Any] = {"status": "RUNNING" if start else "PENDING", "runner_id": runner_id,
                                  "runner_thread": thread, "slot": 0}
        steps: list[tuple[str | None, str]] = [("REGISTERED", "PENDING")]
        if start:
            values.update(attempts=F("attempts") + 1, started_at=Now())
            steps.append(("PENDING", "RUNNING"))
        assignments, set_params = self._set(values)
        step_rows, step_params = _steps(steps)
        ctes = (
            f"candidate AS ({candidates}), "
            # Free: a known task, and no key, or a key nobody holds with nothing due ahead of it.
            f"judged AS (SELECT candidate.id, row_number() OVER (ORDER BY candidate.priority DESC, "
            f"candidate.registered_at, candidate.id) AS n, "
            f"candidate.task_name = ANY(%s) AND (candidate.running_key IS NULL OR ("
            f"NOT EXISTS (SELECT 1 FROM {inv} WHERE {same_key} AND {self.is_owned}) AND "
            f"NOT EXISTS (SELECT 1 FROM {inv} WHERE {same_key} AND {self.is_waiting} "
            f"AND {self.due} AND {q('id')} <> candidate.id AND ({q('priority')} > candidate.priority "
            f"OR ({q('priority')} = candidate.priority AND {q('id')} < candidate.id))))) AS free FROM candidate), "
            f"cut AS (SELECT min(n) AS n FROM judged WHERE NOT free), "
            f"taken AS (UPDATE {inv} AS t {assignments} FROM judged WHERE t.{q('id')} = judged.id "
            f"AND judged.n < COALESCE((SELECT n FROM cut), %s) AND {only_if} "
            f"RETURNING {self._returning('t')}), "
            f"taken_recorded AS (INSERT INTO {self.events} ({self.event_columns}) "
            f"SELECT taken.{q('id')}, %s, step.came_from, step.went_to, %s, %s, %s FROM taken "
            f"CROSS JOIN (VALUES {step_rows}) AS step(n, came_from, went_to) "
            # Reading `after` makes PostgreSQL write it first: otherwise the order is its own choice.
            + (f"CROSS JOIN (SELECT count(*) FROM {after}) AS before " if after else "")
            + f"ORDER BY {self._queue_order('taken')}, step.n)"
        )
        return ctes, [*params, list(known), *set_params, limit + 1,
                      "TRANSITION", runner_id, thread, "", *step_params]

    def _names(self, cursor: Any, sql_text: str) -> list[str]:
        """The columns of a statement's rows: read once a statement (``description`` builds 20-odd objects)."""
        names = self._columns_of.get(sql_text)
        if names is None:
            names = self._columns_of.setdefault(sql_text, [column.name for column in cursor.description])
        return names

    def _returning(self, alias: str) -> str:
        """Every column of the table aliased ``alias``: read back by name (``_invocations(columns=...)``).

        Short on purpose: psycopg caches its parsing of a statement of at most 4 kB only.
        """
        return f"{alias}.*"

    def _queue_order(self, table: str) -> str:
        q = self.quote
        return f"{table}.{q('priority')} DESC, {table}.{q('registered_at')}, {table}.{q('id')}"

    def _taken_rows(self, before: str = "") -> str:
        """The main query after ``_take``: whether the claim stopped, ``before``, then each row taken."""
        return (f"SELECT (SELECT n FROM cut) IS NOT NULL AS stopped, {before}taken.* FROM (SELECT 1) AS one "
                f"LEFT JOIN taken ON true ORDER BY {self._queue_order('taken')}")

    def _taken(self, rows: Sequence[Sequence[Any]], columns: Sequence[str]) -> tuple[list[Invocation], bool]:
        stopped = bool(rows and rows[0][0])
        return self._invocations((row[1:] for row in rows if row[1] is not None), columns=columns), stopped

    def wake_next(
        self, task_name: str, running_key: str, *, runner_id: int | None, taker: Any, channel: str,
        known: Sequence[str] = (),
    ) -> tuple[Invocation | None, list[int]]:
        q, inv = self.quote, self.invocations
        same_key = f"{q('task_name')} = %s AND {q('running_key')} = %s"
        queues = list(taker.queues or []) if taker is not None else []
        if taker is not None:
            # Handed over only if it would be next anyway (see claim.wake_next).
            nothing_waits, nothing_waits_params = self.claimable_sql("1", queues, 1, lock=False, ordered=False)
            served = f"first.queue IN ({_marks(queues)})" if queues else "TRUE"
            hand, hand_params = f"(NOT EXISTS ({nothing_waits}) AND {served})", [*nothing_waits_params, *queues]
            notify = f"woken.queue NOT IN ({_marks(queues)})" if queues else "FALSE"
        else:
            hand, hand_params, notify = "FALSE", [], "TRUE"
        handed_set, handed_params = self._set({
            "status": "RUNNING", "runner_id": taker.runner.pk if taker is not None else None,
            "runner_thread": taker.thread if taker is not None else None, "slot": 0,
            "attempts": F("attempts") + 1, "started_at": Now(),
        })
        woken_set, woken_params = self._set({"status": "REGISTERED", "registered_at": Now()})
        steps = [("REROUTED", "REGISTERED"), ("REGISTERED", "PENDING"), ("PENDING", "RUNNING")]
        step_rows, step_params = _steps(steps)
        sql_text = (
            f"WITH first AS (SELECT {q('id')}, {q('status')}, {q('queue')} FROM {inv} "
            f"WHERE {same_key} AND {self.is_waiting} AND {self.due} "
            f"ORDER BY {self.key_order} LIMIT 1), "
            # The first in line goes on if it is parked and the key has nobody holding it.
            f"go AS (SELECT first.id, first.queue, {hand} AS hand FROM first WHERE first.status = %s "
            f"AND NOT EXISTS (SELECT 1 FROM {inv} WHERE {same_key} AND {self.is_owned})), "
            f"handed AS (UPDATE {inv} AS h {handed_set} FROM go WHERE h.{q('id')} = go.id AND go.hand "
            f"AND h.{q('status')} = %s RETURNING {self._returning('h')}), "
            f"woken AS (UPDATE {inv} AS w {woken_set} FROM go WHERE w.{q('id')} = go.id AND NOT go.hand "
            f"AND w.{q('status')} = %s RETURNING w.{q('id')} AS id, w.{q('queue')} AS queue), "
            f"handed_recorded AS (INSERT INTO {self.events} ({self.event_columns}) "
            f"SELECT handed.{q('id')}, %s, step.came_from, step.went_to, %s, %s, %s FROM handed "
            f"CROSS JOIN (VALUES {step_rows}) AS step(n, came_from, went_to) ORDER BY step.n), "
            f"woken_recorded AS (INSERT INTO {self.events} ({self.event_columns}) "
            f"SELECT woken.id, %s, %s, %s, %s, NULL, %s FROM woken RETURNING 1), "
            # The thread that freed the key claims next: only a runner of another queue needs waking.
            f"notified AS (SELECT pg_notify(%s, woken.queue) FROM woken WHERE {notify}) "
        )
        take_params: list[Any] = []
        if taker is not None and known:
            # Nothing handed over: the thread's next claim, in this same statement.
            taking, take_params = self._take(taker.queues, 1, known=known, start=True, runner_id=taker.runner.pk,
                                             thread=taker.thread, only_if="NOT EXISTS (SELECT 1 FROM handed)",
                                             after="woken_recorded")
            sql_text += (f", {taking} SELECT (SELECT count(*) FROM notified), (SELECT id FROM woken), picked.* "
                         f"FROM (SELECT 1) AS one LEFT JOIN (SELECT * FROM handed UNION ALL SELECT * FROM taken) "
                         f"AS picked ON true")
        else:
            sql_text += ("SELECT (SELECT count(*) FROM notified), (SELECT id FROM woken), handed.* "
                         "FROM (SELECT 1) AS one LEFT JOIN handed ON true")
        params = [
            task_name, running_key,
            *hand_params, "REROUTED", task_name, running_key,
            *handed_params, "REROUTED",
            *woken_params, "REROUTED",
            "TRANSITION", taker.runner.pk if taker is not None else None, taker.thread if taker is not None else None,
            HANDED, *step_params,
            "TRANSITION", "REROUTED", "REGISTERED", runner_id, WOKEN,
            channel, *(queues if taker is not None else []),
            *take_params,
        ]
        with self.cursor() as cursor:
            cursor.execute(sql_text, params)
            row = cursor.fetchone()
            names = self._names(cursor, sql_text)
        _, woken_id, *next_row = row
        handed = self._invocations([next_row], columns=names[2:])[0] if next_row[0] is not None else None
        return handed, [woken_id] if woken_id is not None else []


def _steps(steps: Sequence[tuple[str | None, str]]) -> tuple[str, list[Any]]:
    """The VALUES rows of a path, numbered: (n, from, to); a from of None means the row's own status.

    Literals, not parameters: psycopg caches its parsing of a statement of
    at most 50 parameters (and 4 kB) only.
    """
    rows = ", ".join(f"({n}, {_literal(came_from)}, {_literal(went_to)})" for n, (came_from, went_to) in enumerate(steps))
    return rows, []


def _marks(values: Collection[Any]) -> str:
    return ", ".join(["%s"] * len(values))


def notify(using: str, channel: str, payload: str) -> None:
    """Queue a notification; PostgreSQL delivers it when the transaction commits."""
    with connections[using].cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, %s)", [channel, payload])


class Listener(threading.Thread):
    """Listen on a separate autocommit connection and call back on each notification.

    If the connection drops, reconnect with a growing pause; polling covers the gap.
    """

    def __init__(self, using: str, channel: str, on_wake: Callable[[str], None], stop: threading.Event) -> None:
        super().__init__(name="keyjobs-listener", daemon=True)
        self.using = using
        self.channel = channel
        self.on_wake = on_wake
        self.stop = stop
        self.listening = threading.Event()

    def run(self) -> None:
        pause = 0.1
        while not self.stop.is_set():
            try:
                self._listen()
                pause = 0.1
            except psycopg.Error as exc:
                self.listening.clear()
                logger.warning("keyjobs: lost the LISTEN connection (%s); retrying in %.1fs", exc, pause)
                self.stop.wait(pause)
                pause = min(pause * 2, 5.0)

    def _listen(self) -> None:
        params = connections[self.using].get_connection_params()
        with psycopg.connect(**params, autocommit=True) as connection:
            connection.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(self.channel)))
            self.listening.set()
            while not self.stop.is_set():
                for notification in connection.notifies(timeout=0.5):
                    self.on_wake(notification.payload)


# -- enqueue fast path --


def insert_and_notify(
    using: str, model: Any, fields: Sequence[Any], rows: Sequence[Sequence[Any]], returning: Sequence[Any],
    channel: str, payload: str,
) -> list[tuple[Any, ...]]:
    """Insert ``rows`` (prepared values of ``fields``) and queue a notification, in one statement.

    Return the ``returning`` columns of each inserted row. One statement is
    atomic by itself, so in autocommit a delay() is one round trip instead of
    BEGIN, INSERT, NOTIFY and COMMIT; inside the caller's transaction it joins
    it, and the notification waits for its commit.
    """
    columns = list(zip(*rows))
    # The same object in every row (the task, the queue, the defaults) travels once; the others as an array each.
    shared = tuple(all(value is values[0] for value in values) for values in columns)
    params = [values[0] for values, once in zip(columns, shared) if once]
    if all(shared):
        params.append(len(rows))  # generate_series(1, %s)
    else:
        params += [list(values) for values, once in zip(columns, shared) if not once]
    # Bound on the server and prepared once a connection has run it a few times (Statements.cursor):
    # a delay() is one statement, and planning it cost about as much as running it.
    with sql.statements(using).cursor() as cursor:
        cursor.execute(
            _insert_and_notify_sql(using, model, tuple(fields), tuple(returning), shared),
            [*params, channel, payload],
        )
        return cursor.fetchall()


#: The statements insert_and_notify() built, by database, table, columns and which columns are shared:
#: a few per database, since only the arguments, keys and run_after vary between the rows of a call.
_insert_and_notify_statements: dict[tuple[Any, ...], str] = {}


def _insert_and_notify_sql(
    using: str, model: Any, fields: tuple[Any, ...], returning: tuple[Any, ...], shared: tuple[bool, ...]
) -> str:
    key = (using, model, fields, returning, shared)
    if key in _insert_and_notify_statements:
        return _insert_and_notify_statements[key]
    connection = connections[using]
    quote = connection.ops.quote_name
    # Arrays, as bulk_create sends rows here: psycopg parses a VALUES list of thousands of
    # placeholders slower than PostgreSQL inserts the rows. Unsized types (varchar, not
    # varchar(200)): a cast must never truncate.
    casts = [field.db_type(connection).split("(")[0] for field in fields]
    arrays = [f"%s::{cast}[]" for cast, once in zip(casts, shared) if not once]
    # In the table's order: a shared column from its one parameter, the others from their arrays.
    names = iter(range(len(arrays)))
    select = [f"%s::{cast}" if once else f"u.c{next(names)}" for cast, once in zip(casts, shared)]
    source = (
        f"UNNEST({', '.join(arrays)}) AS u({', '.join(f'c{n}' for n in range(len(arrays)))})"
        if arrays else "generate_series(1, %s)"
    )
    insert = (
        f"INSERT INTO {quote(model._meta.db_table)} ({', '.join(quote(field.column) for field in fields)}) "
        f"SELECT {', '.join(select)} FROM {source} RETURNING {', '.join(quote(field.column) for field in returning)}"
    )
    # MATERIALIZED: the notification is queued once, however many rows the insert returns.
    sql = (
        f"WITH inserted AS ({insert}), notified AS MATERIALIZED (SELECT pg_notify(%s, %s)) "
        "SELECT inserted.* FROM inserted, notified"
    )
    _insert_and_notify_statements[key] = sql
    return sql
