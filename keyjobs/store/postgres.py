"""PostgreSQL's store: whole steps in one statement, LISTEN/NOTIFY, and a one-statement insert.

Reached only through ``keyjobs.store.store()``, which picks it for a
PostgreSQL database; it depends on the models, the lifecycle and the portable
store it extends, never on the orchestration that calls it.
"""

import logging
import threading
from collections.abc import Callable, Collection, Sequence
from typing import Any

import psycopg
from django.db import connections
from django.db.backends.postgresql.base import ServerBindingCursor

from ..conf import conf
from ..models import Invocation
from ..status import STAMPS, Change, Status
from .interface import Claimed, KeyAhead, LockedRow, Recorded, Woken
from .portable import QUEUE_ORDER, Store, literal

logger = logging.getLogger("keyjobs.worker")

#: Runs of one statement on a connection after which psycopg prepares it (psycopg's own default).
PREPARE_THRESHOLD = 5

#: The LISTEN/NOTIFY channel; the payload is the queue name.
CHANNEL = "keyjobs"


class PostgresStore(Store):
    """The portable store, plus each step of an invocation's life in one statement (``Steps``).

    A data-modifying WITH runs to completion whether or not the main
    statement reads it, and all of a statement's parts see one snapshot: a
    race with another runner ends at the partial unique indexes, as on the
    portable path.
    """

    notifies = True

    def __init__(self, connection: Any) -> None:
        super().__init__(connection)
        self._columns_of: dict[str, list[str]] = {}
        self._recorded_sql: dict[tuple[Any, ...], str] = {}
        self._queue_orders: dict[str, str] = {}
        self.steps = self

    def ahead_in_queue(self, priority: str, registered_at: str, pk: str) -> str:
        # One row comparison (the priority negated: it runs the other way), the columns unquoted (all
        # lower case): it is part of the wake-up, which must stay within psycopg's 4 kB.
        return f"(-priority, registered_at, id) < (-{priority}, {registered_at}, {pk})"

    def one_of(self, column: str, values: Sequence[Any], *, negate: bool = False) -> tuple[str, list[Any]]:
        # One array parameter, however many values: the statement's text stays the same, and short.
        return f"{column} {'<> ALL' if negate else '= ANY'}(%s)", [list(values)]

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
        # django-stubs types these for Django's own cursor wrapper only; psycopg's cursor is what Django wraps.
        cursor = ServerBindingCursor(raw)  # type: ignore[call-arg]
        if connection.queries_logged:
            return connection.make_debug_cursor(cursor)  # type: ignore[arg-type]
        return connection.make_cursor(cursor)  # type: ignore[arg-type]

    def move(self, rows: Sequence[LockedRow], change: Change) -> None:
        events = [event for row in rows for event in change.events(row.id, row.status)]
        update, update_params = self._update([row.id for row in rows], change.values)
        insert, insert_params = self._insert_events(events)
        with self.cursor() as cursor:
            cursor.execute(f"WITH moved AS ({update}) {insert}", [*update_params, *insert_params])

    # -- Steps: each in one statement ---------------------------------------------------

    def move_checked(
        self, ids: Sequence[int], change: Change, *, only_from: Collection[str], owner_id: int | None
    ) -> list[LockedRow]:
        ctes, params = self._checked_move(ids, change, only_from=only_from, owner_id=owner_id)
        with self.cursor() as cursor:
            cursor.execute(f"WITH {ctes} SELECT id, status, runner_id FROM locked ORDER BY id", params)
            return [LockedRow(*row) for row in cursor.fetchall()]

    def claim_head(
        self, queues: Sequence[str] | None, limit: int, *, fast_tasks: Sequence[str], claim: Change
    ) -> Claimed:
        ctes, params = self._claim(queues, limit, fast_tasks=fast_tasks, claim=claim)
        sql_text = f"WITH {ctes} {self._claimed_rows()}"
        with self.cursor() as cursor:
            cursor.execute(sql_text, params)
            rows = cursor.fetchall()
            return self._claimed(rows, self._names(cursor, sql_text)[1:])

    def record_and_claim(
        self, pk: int, outcome: Change, *, owner_id: int, queues: Sequence[str] | None, fast_tasks: Sequence[str],
        claim: Change,
    ) -> Recorded:
        moving, move_params = self._checked_move([pk], outcome, only_from={Status.RUNNING}, owner_id=owner_id)
        # A runner whose outcome is refused (its work was taken from it) claims nothing.
        claiming, claim_params = self._claim(queues, 1, fast_tasks=fast_tasks, claim=claim,
                                             only_if="EXISTS (SELECT 1 FROM moved)", after="recorded")
        sql_text = (f"WITH {moving}, {claiming} "
                    + self._claimed_rows("(SELECT status FROM locked), (SELECT runner_id FROM locked), "))
        with self.cursor() as cursor:
            cursor.execute(sql_text, [*move_params, *claim_params])
            rows = cursor.fetchall()
            names = self._names(cursor, sql_text)
        # Each row: stopped, the outcome's row as it was (status, runner), then what was claimed.
        row = LockedRow(pk, rows[0][1], rows[0][2]) if rows and rows[0][1] is not None else None
        return Recorded(row, self._claimed([(row[0], *row[3:]) for row in rows], names[3:]))

    def wake_next(
        self, task_name: str, running_key: str, *, woken: Change, handed: Change | None,
        queues: Sequence[str] | None, fast_tasks: Sequence[str], claim: Change | None,
    ) -> Woken:
        q, inv = self.quote, self.invocations
        same_key = f"{q('task_name')} = %s AND {q('running_key')} = %s"
        queues = list(queues or [])
        if handed is not None:
            # Handed over only if it would be next anyway (see claim.wake_next): nothing claimable ahead of
            # its own place, if the wake-up keeps it (else of the back of the queue: nothing at all).
            ahead: tuple[str, list[Any]] | None = None
            if STAMPS[Status.REGISTERED] not in woken.values:
                ahead = (self.ahead_in_queue("f.priority", "f.registered_at", "f.id"), [])
            nothing_waits, nothing_waits_params = self.claimable_sql("1", queues, 1, lock=False, ordered=False,
                                                                     ahead=ahead)
            served, served_params = self.one_of("f.queue", queues) if queues else ("", [])
            hand, hand_params = f"(NOT EXISTS ({nothing_waits}){served and ' AND ' + served})", [*nothing_waits_params, *served_params]
            notify, notify_params = self.one_of("woken.queue", queues, negate=True) if queues else ("FALSE", [])
        else:
            hand, hand_params, notify, notify_params = "FALSE", [], "TRUE", []
        handing = handed if handed is not None else woken  # never applied when nothing is handed
        handed_set, handed_params = self._set(handing.values)
        woken_set, woken_params = self._set(woken.values)
        handed_events, handed_event_params = self._recorded("handed_recorded", "handed", handing,
                                                            first_from=Status.REROUTED)
        woken_events, woken_event_params = self._recorded("woken_recorded", "woken", woken,
                                                          first_from=Status.REROUTED, read=True)
        sql_text = (
            f"WITH first AS (SELECT * FROM {inv} "
            f"WHERE {same_key} AND {self.is_waiting} AND {self.due} "
            f"ORDER BY {self.key_order} LIMIT 1), "
            # The first in line goes on if it is parked and the key has nobody holding it.
            f"go AS (SELECT f.id, f.queue, {hand} AS hand FROM first AS f WHERE f.status = %s "
            f"AND NOT EXISTS (SELECT 1 FROM {inv} WHERE {same_key} AND {self.is_owned})), "
            f"handed AS (UPDATE {inv} AS h {handed_set} FROM go WHERE h.{q('id')} = go.id AND go.hand "
            f"AND h.{q('status')} = %s RETURNING {self._returning('h')}), "
            f"woken AS (UPDATE {inv} AS w {woken_set} FROM go WHERE w.{q('id')} = go.id AND NOT go.hand "
            f"AND w.{q('status')} = %s RETURNING w.*), "
            f"{handed_events}, {woken_events}"
            # The thread that freed the key claims next: only a runner of another queue needs waking.
            + (f", notified AS (SELECT pg_notify(%s, woken.queue) FROM woken WHERE {notify}) " if notify != "FALSE"
               else " ")
        )
        notified = "(SELECT count(*) FROM notified)" if notify != "FALSE" else "0"
        claim_params: list[Any] = []
        if claim is not None and fast_tasks:
            # Nothing handed over: the thread's next claim, in this same statement.
            claiming, claim_params = self._claim(queues, 1, fast_tasks=fast_tasks, claim=claim,
                                                 only_if="NOT EXISTS (SELECT 1 FROM handed)", after="woken_recorded")
            sql_text += (f", {claiming} SELECT {notified}, (SELECT id FROM woken), picked.* "
                         f"FROM (SELECT 1) AS one LEFT JOIN (SELECT * FROM handed UNION ALL SELECT * FROM taken) "
                         f"AS picked ON true")
        else:
            sql_text += (f"SELECT {notified}, (SELECT id FROM woken), handed.* "
                         "FROM (SELECT 1) AS one LEFT JOIN handed ON true")
        params = [
            task_name, running_key,
            *hand_params, Status.REROUTED, task_name, running_key,
            *handed_params, Status.REROUTED,
            *woken_params, Status.REROUTED,
            *handed_event_params, *woken_event_params,
            *([CHANNEL, *notify_params] if notify != "FALSE" else []),
            *claim_params,
        ]
        with self.cursor() as cursor:
            cursor.execute(sql_text, params)
            row = cursor.fetchone()
            names = self._names(cursor, sql_text)
        _, woken_id, *next_row = row
        next_up = self._invocations([next_row], columns=names[2:])[0] if next_row[0] is not None else None
        return Woken(next_up, [woken_id] if woken_id is not None else [])

    def insert_or_park(
        self, fields: Sequence[Any], row: Sequence[Any], returning: Sequence[Any], *, ahead: KeyAhead,
        parked: Change,
    ) -> tuple[tuple[Any, ...], str]:
        # admission.admit with nobody's slots known but those counted ahead: START (registered) while
        # fewer than the limit are ahead, else PARK. The share locks last until the statement commits.
        names = [field.attname for field in fields]
        status_at = names.index("status")
        casts = [field.db_type(self.connection).split("(")[0] for field in fields]
        select = [f"%s::{cast}" if n != status_at else "verdict.status" for n, cast in enumerate(casts)]
        values = [value for n, value in enumerate(row) if n != status_at]
        (event,) = parked.events(0, "")
        quote = self.quote
        sql_text = (
            f"WITH ahead AS ({self.busy_ahead_sql()}), "
            f"verdict AS MATERIALIZED (SELECT CASE WHEN count(*) >= %s THEN {literal(Status.REROUTED)} "
            f"ELSE {literal(Status.REGISTERED)} END AS status FROM ahead), "
            f"inserted AS (INSERT INTO {self.invocations} ({', '.join(quote(field.column) for field in fields)}) "
            f"SELECT {', '.join(select)} FROM verdict "
            f"RETURNING {', '.join(quote(field.column) for field in returning)}, {quote('status')} AS status), "
            f"recorded AS (INSERT INTO {self.events} ({self.event_columns}) SELECT inserted.{quote('id')}, %s, '', "
            f"{literal(Status.REROUTED)}, %s, %s, %s FROM inserted WHERE inserted.status = {literal(Status.REROUTED)} "
            "RETURNING 1), "
            f"notified AS (SELECT pg_notify(%s, %s) FROM inserted WHERE inserted.status = {literal(Status.REGISTERED)}) "
            f"SELECT inserted.*, (SELECT count(*) FROM notified), (SELECT count(*) FROM recorded) FROM inserted"
        )
        params = [ahead.task_name, ahead.running_key, ahead.priority, ahead.limit, ahead.limit, *values,
                  event[1], *event[4:], CHANNEL, row[names.index("queue")]]
        with self.cursor() as cursor:
            cursor.execute(sql_text, params)
            found = cursor.fetchone()
        return tuple(found[: len(returning)]), found[len(returning)]

    # -- the parts those statements are made of ---------------------------------------

    def _recorded(self, name: str, source: str, change: Change, *, first_from: str | None = None,
                  after: str = "", order: str = "", read: bool = False) -> tuple[str, list[Any]]:
        """The CTE ``name`` inserting ``change``'s history rows for each row of CTE ``source``.

        The first step's from is ``first_from``, else the source's ``status``
        column (the row's status before the change). ``after`` names a CTE
        whose rows these must follow in the history; ``read``, that another
        CTE reads this one's (so it returns them). Kept short: psycopg caches
        its parsing of a statement of at most 4 kB only.
        """
        shape = (name, source, change.path, first_from, after, order, read)
        sql = self._recorded_sql.get(shape)
        if sql is None:  # a few shapes per connection: built once each
            steps = change.steps()
            if first_from is not None:
                steps[0] = (first_from, steps[0][1])
            came_from = "step.came" if first_from is not None else f"COALESCE(step.came, {source}.status)"
            head = f"{name} AS (INSERT INTO {self.events} ({self.event_columns}) SELECT {source}.{self.quote('id')}, %s, "
            if len(steps) == 1 and not after:
                came = literal(first_from) if first_from is not None else f"{source}.status"
                sql = f"{head}{came}, {literal(steps[0][1])}, %s, %s, %s FROM {source}"
            else:
                values = ", ".join(f"({n}, {literal(here)}, {literal(there)})" for n, (here, there) in enumerate(steps))
                sql = (
                    f"{head}{came_from}, step.went, %s, %s, %s FROM {source} "
                    f"CROSS JOIN (VALUES {values}) AS step(n, came, went) "
                    # Reading `after` makes PostgreSQL write it first: otherwise the order is its own choice.
                    + (f"CROSS JOIN (SELECT count(*) FROM {after}) AS before " if after else "")
                    + f"ORDER BY {order or source + '.' + self.quote('id')}, step.n"
                )
            sql = self._recorded_sql[shape] = sql + (" RETURNING 1)" if read else ")")
        return sql, [change.kind, change.runner_id, change.runner_thread, change.note]

    def _checked_move(
        self, ids: Sequence[int], change: Change, *, only_from: Collection[str], owner_id: int | None
    ) -> tuple[str, list[Any]]:
        """The CTEs ``locked`` (every row as it was), ``moved`` and ``recorded``, its history."""
        q, inv = self.quote, self.invocations
        assignments, set_params = self._set(change.values)
        guard, guard_params = "", []
        if owner_id is not None:
            # All or nothing, as on the portable path: one row owned by another runner refuses the move.
            guard = (f" AND NOT EXISTS (SELECT 1 FROM locked WHERE locked.status IN ({_marks(only_from)}) "
                     f"AND locked.runner_id IS DISTINCT FROM %s)")
            guard_params = [*only_from, owner_id]
        recorded, recorded_params = self._recorded("recorded", "moved", change, read=True)
        ctes = (
            f"locked AS (SELECT {q('id')} AS id, {q('status')} AS status, {q('runner_id')} AS runner_id "
            f"FROM {inv} WHERE {q('id')} IN ({_marks(ids)}) ORDER BY {q('id')}{self.lock}), "
            f"moved AS (UPDATE {inv} AS m {assignments} FROM locked WHERE m.{q('id')} = locked.id "
            f"AND locked.status IN ({_marks(only_from)}){guard} RETURNING m.{q('id')} AS id, locked.status), "
            f"{recorded}"
        )
        return ctes, [*ids, *set_params, *only_from, *guard_params, *recorded_params]

    def _claim(
        self, queues: Sequence[str] | None, limit: int, *, fast_tasks: Sequence[str], claim: Change,
        only_if: str = "TRUE", after: str = "",
    ) -> tuple[str, list[Any]]:
        """The CTEs ``cut`` (where the claim stopped, if it did), ``taken`` and their history.

        ``after`` names a CTE whose rows the history must follow.
        """
        q, inv = self.quote, self.invocations
        candidates, params = self.claimable_sql(
            ", ".join(q(column) for column in ("id", "priority", "registered_at", "task_name", "running_key",
                                               "running_limit")),
            queues, limit)
        same_key = f"{q('task_name')} = c.task_name AND {q('running_key')} = c.running_key"
        # Ahead in key order (priority, then id): one row comparison.
        ahead = f"{self.is_waiting} AND {self.due} AND ({q('priority')}, -{q('id')}) > (c.priority, -c.id)"
        # The slot comes from the judgement: the claim's own value is the one-slot case's 0.
        assignments, set_params = self._set({name: value for name, value in claim.values.items() if name != "slot"})
        recorded, recorded_params = self._recorded("taken_recorded", "taken", claim, first_from=Status.REGISTERED,
                                                   after=after, order=self._queue_order("taken"))
        ctes = (
            f"c AS ({candidates}), "
            # admission.FAST_PATH: a task whose policy this statement implements, and no key, or a key
            # with a slot left once the work due ahead of it takes the first free ones: admission.admit()'s
            # rule and its slot (k.s), for the first candidate of a key only (two would pick the same
            # slot). Kept short: psycopg caches the parsing of 4 kB at most.
            f"j AS (SELECT c.id, row_number() OVER (ORDER BY {self._queue_order('c')}) AS n, "
            f"c.task_name = ANY(%s) AND (c.running_key IS NULL OR k.s IS NOT NULL AND row_number() OVER "
            f"(PARTITION BY c.task_name, c.running_key ORDER BY c.id) = 1) AS free, COALESCE(k.s, 0) AS slot "
            f"FROM c LEFT JOIN LATERAL (SELECT s FROM generate_series(0, c.running_limit - 1) AS s WHERE s NOT IN "
            f"(SELECT {q('slot')} FROM {inv} WHERE {same_key} AND {self.is_owned}) OFFSET (SELECT count(*) FROM "
            f"(SELECT FROM {inv} WHERE {same_key} AND {ahead} LIMIT c.running_limit) AS a) LIMIT 1) AS k ON true), "
            f"cut AS (SELECT min(n) AS n FROM j WHERE NOT free), "
            f"taken AS (UPDATE {inv} AS t {assignments}, {q('slot')} = j.slot FROM j "
            f"WHERE t.{q('id')} = j.id AND j.n < COALESCE((SELECT n FROM cut), %s) AND {only_if} "
            f"RETURNING {self._returning('t')}), "
            f"{recorded}"
        )
        return ctes, [*params, list(fast_tasks), *set_params, limit + 1, *recorded_params]

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
        order = self._queue_orders.get(table)
        if order is None:
            order = self._queue_orders[table] = self.order(QUEUE_ORDER, table)
        return order

    def _claimed_rows(self, before: str = "") -> str:
        """The main query after ``_claim``: whether the claim stopped, ``before``, then each row claimed."""
        return (f"SELECT (SELECT n FROM cut) IS NOT NULL AS stopped, {before}taken.* FROM (SELECT 1) AS one "
                f"LEFT JOIN taken ON true ORDER BY {self._queue_order('taken')}")

    def _claimed(self, rows: Sequence[Sequence[Any]], columns: Sequence[str]) -> Claimed:
        stopped = bool(rows and rows[0][0])
        return Claimed(self._invocations((row[1:] for row in rows if row[1] is not None), columns=columns), stopped)

    # -- creating, and waking idle runners ----------------------------------------------

    def insert(self, fields: Sequence[Any], rows: Sequence[Sequence[Any]], returning: Sequence[Any],
               queue: str) -> list[tuple[Any, ...]]:
        return insert_and_notify(self, fields, rows, returning, CHANNEL, queue)

    def notify(self, queue: str) -> None:
        with self.connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, %s)", [CHANNEL, queue])

    def listen(self, on_wake: Callable[[str], None], stop: threading.Event) -> threading.Thread:
        # Its own connection, never the pool's: a pooler in transaction mode cannot keep a LISTEN.
        listener = Listener(conf.LISTEN_DATABASE or self.connection.alias, CHANNEL, on_wake, stop)
        listener.start()
        return listener


def _marks(values: Collection[Any]) -> str:
    return ", ".join(["%s"] * len(values))


class Listener(threading.Thread):
    """Listen on a separate autocommit connection and call back on each notification.

    One per runner process, made from ``using``'s settings by psycopg itself:
    outside Django's connection handling, so never one of a pool's, and
    direct to the server when ``KEYJOBS_LISTEN_DATABASE`` names such an alias.

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


def insert_and_notify(
    store: PostgresStore, fields: Sequence[Any], rows: Sequence[Sequence[Any]], returning: Sequence[Any],
    channel: str, payload: str,
) -> list[tuple[Any, ...]]:
    """Insert ``rows`` (prepared values of ``fields``) and queue a notification, in one statement.

    Return the ``returning`` columns of each inserted row. One statement is
    atomic by itself, so in autocommit a delay() is one round trip instead of
    BEGIN, INSERT, NOTIFY and COMMIT; inside the caller's transaction it joins
    it, and the notification waits for its commit.
    """
    columns = list(zip(*rows, strict=True))
    # The same object in every row (the task, the queue, the defaults) travels once; the others as an array each.
    shared = tuple(all(value is values[0] for value in values) for values in columns)
    params = [values[0] for values, once in zip(columns, shared, strict=True) if once]
    if all(shared):
        params.append(len(rows))  # generate_series(1, %s)
    else:
        params += [list(values) for values, once in zip(columns, shared, strict=True) if not once]
    # Bound on the server and prepared once a connection has run it a few times (PostgresStore.cursor):
    # a delay() is one statement, and planning it cost about as much as running it.
    with store.cursor() as cursor:
        cursor.execute(
            _insert_and_notify_sql(store.connection.alias, Invocation, tuple(fields), tuple(returning), shared),
            [*params, channel, payload],
        )
        inserted: list[tuple[Any, ...]] = cursor.fetchall()
        return inserted


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
    arrays = [f"%s::{cast}[]" for cast, once in zip(casts, shared, strict=True) if not once]
    # In the table's order: a shared column from its one parameter, the others from their arrays.
    names = iter(range(len(arrays)))
    select = [f"%s::{cast}" if once else f"u.c{next(names)}" for cast, once in zip(casts, shared, strict=True)]
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
