"""PostgreSQL's store: whole steps in one statement, LISTEN/NOTIFY, and a one-statement insert.

Reached only through ``keyjobs.store.store()``, which picks it for a
PostgreSQL database; it depends on the models, the lifecycle and the portable
store it extends, never on the orchestration that calls it.
"""

import functools
import logging
import re
import threading
from collections.abc import Callable, Collection, Sequence
from typing import Any

import psycopg
from django.db import connections, transaction
from django.db.backends.postgresql.base import CursorMixin

from .. import faults
from ..conf import conf
from ..models import Invocation, KeyControl, Value
from ..status import STAMPS, Change, Status
from .interface import Claimed, KeyAhead, LockedRow, Recorded, Woken
from .portable import KEY_ORDER, QUEUE_ORDER, Expression, Store, literal

logger = logging.getLogger(__name__)

#: Runs of one statement on a connection after which psycopg prepares it (psycopg's own default).
PREPARE_THRESHOLD = 5

#: Statement texts whose conversion to PostgreSQL's own placeholders is kept (``NativeCursor``): a few dozen
#: shapes are expected.
CONVERSIONS_KEPT = 1000
_PLACEHOLDER = re.compile(r"%\((\w+)\)s|%s|%%")


@functools.lru_cache(maxsize=CONVERSIONS_KEPT)
def native(query: str) -> tuple[str, tuple[str, ...]]:
    """Return ``query`` with PostgreSQL's own placeholders (``$1``...) for psycopg's (``%s`` or ``%(name)s``), and
    the name of each, in order, if they are named (a name used twice is one placeholder); kept per text."""
    names: list[str] = []
    positional = 0

    def placeholder(match: re.Match[str]) -> str:
        nonlocal positional
        if match.group(0) == "%%":
            return "%"
        if match.group(1) is None:
            positional += 1
            return f"${positional}"
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    text = _PLACEHOLDER.sub(placeholder, query)
    if names and positional:
        raise ValueError("a statement mixes named and positional placeholders")
    return text, tuple(names)


class NativeCursor(CursorMixin, psycopg.RawCursor):
    """A cursor that binds on the server and hands PostgreSQL its own placeholders, converted once per text.

    psycopg parses a statement's ``%(name)s`` placeholders on every run of
    a text longer than 4 kB (``psycopg._queries.MAX_CACHED_STATEMENT_LENGTH``):
    0.1 ms for a step of 6 kB, the wake-up that claims the thread's next. The
    store's statements are few and run thousands of times a second: their
    conversion is kept here instead, whatever their length. Django's cursor
    wrapper sits above it, so execute wrappers see the statement as written.
    """

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        if params is None or not isinstance(query, str):
            return super().execute(query, params, **kwargs)
        text, names = native(query)
        return super().execute(text, [params[name] for name in names] if names else params, **kwargs)

    def executemany(self, query: Any, params_seq: Any, **kwargs: Any) -> Any:
        text, names = native(query)
        if names:
            params_seq = [[params[name] for name in names] for params in params_seq]
        return super().executemany(text, params_seq, **kwargs)

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
        self._insert_or_park_columns: dict[tuple[Any, ...], tuple[list[tuple[str, str]], str, str]] = {}
        self.steps = self

    def order_column(self, column: str) -> str:
        # Unquoted (the orders' columns are all lower case): the orders are written many times in the
        # wake-up and the claim.
        return column

    def ahead(
        self, order: Sequence[tuple[str, str]], place: Sequence[Any], *, behind: bool = False
    ) -> tuple[str, list[Any]]:
        # One row comparison, each value read once: a descending column (a number) negated on both sides,
        # since a row comparison runs one way.
        columns: list[str] = []
        values: list[str] = []
        params: list[Any] = []
        for (column, direction), value in zip(order[:len(place)], place, strict=True):
            negated = direction == " DESC"
            column = self.order_column(column)
            columns.append(f"-{column}" if negated else column)
            if isinstance(value, Expression):
                values.append(f"-{value.sql}" if negated else value.sql)
                params += value.params
            else:
                values.append("%s")
                params.append(-value if negated else value)
        whole = len(place) == len(order)
        operator = ">" if behind else "<" if whole else "<="
        return f"({', '.join(columns)}) {operator} ({', '.join(values)})", params

    def _under_control(self, task_name: str, running_key: str) -> str:
        """``control_in_force`` in a step's statement: the key is one of CTE ``controlled``'s (``_controls``), read
        once per statement."""
        return f"({task_name}, {running_key}) IN (TABLE controlled)"

    def _controls(self) -> str:
        """The CTE ``controlled``: the keys with an operator's control in force (``KeyControl``), which
        ``_under_control`` reads."""
        table = KeyControl._meta.db_table  # unquoted, as its columns: all lower case
        return f"controlled AS (SELECT task_name, running_key FROM {table} WHERE paused OR until > now())"

    def one_of(self, column: str, values: Sequence[Any], *, negate: bool = False) -> tuple[str, list[Any]]:
        # One array parameter, however many values: the statement's text stays the same, and short. Whole
        # numbers (ids) go as the array's text, which psycopg passes on as it is: as a list, it adapts each one
        # in Python (40 ms for the 10,000 ids of a busy timeline).
        if all(type(value) is int for value in values):
            return f"{column} {'<> ALL' if negate else '= ANY'}(%s::bigint[])", [f"{{{','.join(map(str, values))}}}"]
        return f"{column} {'<> ALL' if negate else '= ANY'}(%s)", [list(values)]

    def checking_references_at_once(self) -> None:
        """Django declares PostgreSQL's foreign keys DEFERRABLE INITIALLY DEFERRED: checked at the commit, a refusal
        could not be caught where it happens. For this transaction they are checked at each statement."""
        with self.cursor() as cursor:
            cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")

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
        cursor = NativeCursor(raw)
        if connection.queries_logged:
            return connection.make_debug_cursor(cursor)  # type: ignore[arg-type]
        return connection.make_cursor(cursor)  # type: ignore[arg-type]

    def move(self, rows: Sequence[LockedRow], change: Change) -> None:
        events = [event for row in rows for event in change.events(row.id, row.status)]
        ids = [row.id for row in rows]
        update, update_params = self._update(ids, change.values)
        insert, insert_params = self._insert_events(events)
        with self.cursor() as cursor:
            for sql, params in self.counting_waiters(
                    ids, change, [(f"WITH moved AS ({update}) {insert}", [*update_params, *insert_params])]):
                cursor.execute(sql, params)

    # -- Steps: each in one statement ---------------------------------------------------

    def move_checked(
        self, ids: Sequence[int], change: Change, *, only_from: Collection[str], owner_id: int | None
    ) -> list[LockedRow]:
        if "waiting_on" in change.values:
            # A wait that starts or ends also counts the waiters of what it waits on (``counting_waiters``):
            # rows one statement could reach twice. Rare enough (a pause, a resume) for a few statements.
            with transaction.atomic(using=self.connection.alias, savepoint=False):
                rows = self.lock_rows(ids)
                expected = [row for row in rows if row.status in only_from]
                if expected and (owner_id is None or all(row.runner_id == owner_id for row in expected)):
                    self.move(expected, change)
                return rows
        p = Named()
        ctes = self._checked_move(p, ids, change, only_from=only_from, owner_id=owner_id)
        with self.cursor() as cursor:
            cursor.execute(f"WITH {ctes} SELECT id, status, runner_id FROM locked ORDER BY id", p.values)
            return [LockedRow(*row) for row in cursor.fetchall()]

    def claim_head(
        self, queues: Sequence[str] | None, limit: int, *, fast_tasks: Sequence[str], claim: Change
    ) -> Claimed:
        p = Named()
        sql_text = f"WITH {self._claim(p, queues, limit, fast_tasks=fast_tasks, claim=claim)} {self._claimed_rows()}"
        with self.cursor() as cursor:
            cursor.execute(sql_text, p.values)
            rows = cursor.fetchall()
            return self._claimed(rows, self._names(cursor, sql_text)[1:])

    def record_and_claim(
        self, pk: int, outcome: Change, *, owner_id: int, queues: Sequence[str] | None, fast_tasks: Sequence[str],
        claim: Change,
    ) -> Recorded:
        p = Named()
        moving = self._checked_move(p, [pk], outcome, only_from={Status.RUNNING}, owner_id=owner_id)
        # A runner whose outcome is refused (its work was taken from it) claims nothing.
        claiming = self._claim(p, queues, 1, fast_tasks=fast_tasks, claim=claim,
                               only_if="EXISTS (SELECT 1 FROM moved)", after="recorded")
        sql_text = (f"WITH {moving}, {claiming} "
                    + self._claimed_rows("(SELECT status FROM locked), (SELECT runner_id FROM locked), "))
        with self.cursor() as cursor:
            cursor.execute(sql_text, p.values)
            rows = cursor.fetchall()
            names = self._names(cursor, sql_text)
        # Each row: stopped, the outcome's row as it was (status, runner), then what was claimed.
        row = LockedRow(pk, rows[0][1], rows[0][2]) if rows and rows[0][1] is not None else None
        return Recorded(row, self._claimed([(row[0], *row[3:]) for row in rows], names[3:]))

    def wake_next(
        self, task_name: str, running_key: str, *, woken: Change, handed: Change | None,
        queues: Sequence[str] | None, fast_tasks: Sequence[str] = (), claim: Change | None = None,
    ) -> Woken:
        q, inv = self.quote, self.invocations
        p = Named()
        same_key = f"{q('task_name')} = {p('task_name', task_name)} AND {q('running_key')} = {p('running_key', running_key)}"
        waiting = f"FROM {inv} WHERE {same_key} AND {self.is_waiting} AND {self.due} ORDER BY {self.key_order}"
        queues = list(queues or [])
        if handed is not None:
            # Handed over only if it would be next anyway (see claim.wake_next): nothing claimable ahead of
            # its own place, if the wake-up keeps it (else of the back of the queue: nothing at all).
            ahead: tuple[str, list[Any]] | None = None
            if STAMPS[Status.REGISTERED] not in woken.values:
                ahead = self.ahead(QUEUE_ORDER, [Expression(f"first.{column}") for column, _ in QUEUE_ORDER])
            claimable_ahead = p.part("ahead", *self.claimable_sql("1", queues, 1, lock=False, ordered=False,
                                                                 condition=ahead))
            # Never to a runner declared lost (``may_claim_sql``): a recovery would not find it.
            hand = (f"first.place = 1 AND NOT EXISTS ({claimable_ahead}) "
                    f"AND {p('owner', handed.values['runner_id']).join(self.may_claim_sql().split('%s'))}")
            if queues:
                hand += f" AND first.queue = ANY({p('queues', queues)})"
            # The thread that freed the key claims next, and a claim that takes work wakes a colleague:
            # only a runner of another queue needs waking.
            notify = f"woken.queue <> ALL({p('queues', queues)})" if queues else "FALSE"
        else:
            hand, notify = "FALSE", "TRUE"
        handing = handed if handed is not None else woken  # never applied when nothing is handed
        # The slot comes from the free slots: the hand-off's own value is the one-slot case's 0.
        handed_set = p.part("handed", *self._set({name: value for name, value in handing.values.items()
                                                   if name != "slot"}))
        woken_set = p.part("woken", *self._set(woken.values))
        handed_events = p.part("handed_event", *self._recorded("handed_recorded", "handed", handing,
                                                               first_from=Status.REROUTED))
        woken_events = p.part("woken_event", *self._recorded("woken_recorded", "woken", woken,
                                                             first_from=Status.REROUTED, read=True))
        rerouted = literal(Status.REROUTED)
        # An operator's control on the key: the general path decides it (admission.FAST_PATH).
        controlled = self._under_control(p("task_name", task_name), p("running_key", running_key))
        sql_text = (
            f"WITH {self._controls()}, "
            # The key's free slots, lowest first, under the limit its next invocation stored.
            f"free_slot AS (SELECT slot, row_number() OVER (ORDER BY slot) AS place "
            f"FROM generate_series(0, (SELECT {q('running_limit')} {waiting} LIMIT 1) - 1) AS slot "
            f"WHERE slot NOT IN (SELECT {q('slot')} FROM {inv} WHERE {same_key} AND {self.is_owned})), "
            # As many of its next invocations as it has free slots, in key order: each parked one goes on.
            f"next_up AS (SELECT id, queue, status, {', '.join(column for column, _ in QUEUE_ORDER[:-1])}, "
            f"row_number() OVER (ORDER BY {self.key_order}) AS place {waiting} "
            f"LIMIT (SELECT count(*) FROM free_slot)), "
            f"going_on AS (SELECT first.id, free_slot.slot, {hand} AS hand "
            f"FROM next_up AS first JOIN free_slot USING (place) WHERE first.status = {rerouted} AND NOT {controlled}), "
            # The rows by primary key (= ANY(ARRAY(...))): joined on going_on alone, whose size the planner
            # cannot know (a series up to a subquery's limit), it hashed every parked row of the table to meet
            # one (1 ms a wake-up behind a backlog of 3,000).
            f"handed AS (UPDATE {inv} AS h {handed_set}, {q('slot')} = going_on.slot FROM going_on "
            f"WHERE h.{q('id')} = going_on.id AND h.{q('id')} = ANY(ARRAY(SELECT id FROM going_on WHERE hand)) "
            f"AND going_on.hand AND h.{q('status')} = {rerouted} RETURNING {self._returning('h')}), "
            f"woken AS (UPDATE {inv} AS w {woken_set} FROM going_on "
            f"WHERE w.{q('id')} = going_on.id AND w.{q('id')} = ANY(ARRAY(SELECT id FROM going_on WHERE NOT hand)) "
            f"AND NOT going_on.hand AND w.{q('status')} = {rerouted} RETURNING w.*), "
            f"{handed_events}, {woken_events}, "
            f"notified AS (SELECT pg_notify({p('channel', CHANNEL)}, woken.queue) FROM woken WHERE {notify})"
        )
        picked = "handed"
        if handed is not None and claim is not None and fast_tasks:
            # Nothing handed over: the thread's next claim from the queue, in this same statement.
            sql_text += ", " + self._claim(p, queues, 1, fast_tasks=fast_tasks, claim=claim, controls=False,
                                           only_if="NOT EXISTS (SELECT 1 FROM handed)", after="woken_recorded")
            picked = "(SELECT * FROM handed UNION ALL SELECT * FROM taken)"
        # Rows another waker of the key took first (it woke them): the caller looks again.
        sql_text += (" SELECT (SELECT count(*) FROM notified), (SELECT array_agg(id ORDER BY id) FROM woken), "
                     "(SELECT count(*) FROM going_on) - (SELECT count(*) FROM handed) - (SELECT count(*) FROM woken), "
                     f"{controlled}, picked.* FROM (SELECT 1) AS one LEFT JOIN {picked} AS picked ON true")
        with self.cursor() as cursor:
            cursor.execute(sql_text, p.values)
            row = cursor.fetchone()
            names = self._names(cursor, sql_text)
        _, woken_ids, missed, under_control, *next_row = row
        next_up = self._invocations([next_row], columns=names[4:])[0] if next_row[0] is not None else None
        return Woken(next_up, list(woken_ids or []), missed=bool(missed), controlled=bool(under_control))

    def insert_or_park(
        self, fields: Sequence[Any], row: Sequence[Any], returning: Sequence[Any], *, ahead: KeyAhead,
        parked: Change,
    ) -> tuple[tuple[Any, ...], str]:
        # admission.admit with nobody's slots known but those counted ahead: START (registered) while
        # fewer than the limit are ahead, else PARK. The share locks last until the statement commits.
        p = Named()
        busy = p.part("busy", *self.busy_ahead_sql(ahead))
        columns = self._insert_or_park_columns.get((tuple(fields), tuple(returning)))
        if columns is None:
            # The casts and the column lists of a delay(), worked out once: db_type() rebuilds its text on every call.
            columns = self._insert_or_park_columns[tuple(fields), tuple(returning)] = (
                [(field.attname, field.db_type(self.connection).split("(")[0]) for field in fields],
                ", ".join(self.quote(field.column) for field in fields),
                ", ".join(self.quote(field.column) for field in returning),
            )
        casts, inserted_columns, returned_columns = columns
        select = [f"{p(name, value)}::{cast}" if name != "status" else "verdict.status"
                  for (name, cast), value in zip(casts, row, strict=True)]
        (event,) = parked.events(0, "")
        _, kind, _, _, runner_id, runner_thread, note = event
        quote = self.quote
        registered, rerouted = literal(Status.REGISTERED), literal(Status.REROUTED)
        sql_text = (
            f"WITH {self._controls()}, ahead AS ({busy}), "
            # A key under an operator's control is registered: the claim decides it (admission.FAST_PATH).
            f"verdict AS MATERIALIZED (SELECT CASE WHEN count(*) >= {p('limit', ahead.limit)} AND NOT "
            f"{self._under_control(p('control_task', ahead.task_name), p('control_key', ahead.running_key))} "
            f"THEN {rerouted} "
            f"ELSE {registered} END AS status FROM ahead), "
            f"inserted AS (INSERT INTO {self.invocations} ({inserted_columns}) SELECT {', '.join(select)} FROM verdict "
            f"RETURNING {returned_columns}, {quote('status')} AS status), "
            f"recorded AS (INSERT INTO {self.events} ({self.event_columns}) SELECT inserted.{quote('id')}, "
            f"{p('event_kind', kind)}, '', {rerouted}, {p('event_runner_id', runner_id)}, "
            f"{p('event_runner_thread', runner_thread)}, {p('event_note', note)} "
            f"FROM inserted WHERE inserted.status = {rerouted} RETURNING 1), "
            # The payload is the queue: the inserted column's own parameter.
            f"notified AS (SELECT pg_notify({p('channel', CHANNEL)}, {p('queue', p.values['queue'])}) "
            f"FROM inserted WHERE inserted.status = {registered}) "
            f"SELECT inserted.*, (SELECT count(*) FROM notified), (SELECT count(*) FROM recorded) FROM inserted"
        )
        with self.cursor() as cursor:
            cursor.execute(sql_text, p.values)
            found = cursor.fetchone()
        return tuple(found[: len(returning)]), found[len(returning)]

    # -- the parts those statements are made of ---------------------------------------

    def _recorded(self, name: str, source: str, change: Change, *, first_from: str | None = None,
                  after: str = "", order: str = "", read: bool = False) -> tuple[str, list[Any]]:
        """The CTE ``name`` inserting ``change``'s history rows for each row of CTE ``source``.

        The first step's from is ``first_from``, else the source's ``status``
        column (the row's status before the change). ``after`` names a CTE
        whose rows these must follow in the history; ``read``, that another
        CTE reads this one's (so it returns them). Written with positional
        parameters, named by the statement that takes it in (``Named.part``).
        """
        shape = (name, source, change.path, first_from, after, order, read)
        sql = self._recorded_sql.get(shape)
        if sql is None:  # a few shapes per connection: built once each
            steps = change.steps()
            if first_from is not None:
                steps[0] = (first_from, steps[0][1])
            came_from = ("step.from_status" if first_from is not None
                         else f"COALESCE(step.from_status, {source}.status)")
            head = f"{name} AS (INSERT INTO {self.events} ({self.event_columns}) SELECT {source}.{self.quote('id')}, %s, "
            if len(steps) == 1 and not after:
                came = literal(first_from) if first_from is not None else f"{source}.status"
                went = literal(steps[0][1]) if steps[0][1] is not None else f"{source}.status"  # a mark's: its own
                sql = f"{head}{came}, {went}, %s, %s, %s FROM {source}"
            else:
                values = ", ".join(f"({n}, {literal(here)}, {literal(there)})" for n, (here, there) in enumerate(steps))
                sql = (
                    f"{head}{came_from}, step.to_status, %s, %s, %s FROM {source} "
                    f"CROSS JOIN (VALUES {values}) AS step(n, from_status, to_status) "
                    # Reading `after` makes PostgreSQL write it first: otherwise the order is its own choice.
                    + (f"CROSS JOIN (SELECT count(*) FROM {after}) AS before " if after else "")
                    + f"ORDER BY {order or source + '.' + self.quote('id')}, step.n"
                )
            sql = self._recorded_sql[shape] = sql + (" RETURNING 1)" if read else ")")
        return sql, [change.kind, change.runner_id, change.runner_thread, change.note]

    def _checked_move(
        self, p: "Named", ids: Sequence[int], change: Change, *, only_from: Collection[str], owner_id: int | None
    ) -> str:
        """The CTEs ``locked`` (every row as it was), ``moved`` and ``recorded``, its history; parameters in ``p``."""
        q, inv = self.quote, self.invocations
        assignments = p.part("moved", *self._set(change.values))
        only = ", ".join(p(f"only_from_{number}", status) for number, status in enumerate(sorted(only_from), 1))
        guard = ""
        if owner_id is not None:
            # All or nothing, as on the portable path: one row owned by another runner refuses the move.
            guard = (f" AND NOT EXISTS (SELECT 1 FROM locked WHERE locked.status IN ({only}) "
                     f"AND locked.runner_id IS DISTINCT FROM {p('owner', owner_id)})")
        recorded = p.part("recorded", *self._recorded("recorded", "moved", change, read=True))
        return (
            f"locked AS (SELECT {q('id')} AS id, {q('status')} AS status, {q('runner_id')} AS runner_id "
            f"FROM {inv} WHERE {q('id')} IN ({', '.join(p(f'id_{n}', pk) for n, pk in enumerate(ids, 1))}) "
            f"ORDER BY {q('id')}{self.lock}), "
            f"moved AS (UPDATE {inv} AS m {assignments} FROM locked WHERE m.{q('id')} = locked.id "
            f"AND locked.status IN ({only}){guard} RETURNING m.{q('id')} AS id, locked.status), "
            f"{recorded}"
        )

    def _claim(
        self, p: "Named", queues: Sequence[str] | None, limit: int, *, fast_tasks: Sequence[str], claim: Change,
        only_if: str = "TRUE", after: str = "", controls: bool = True,
    ) -> str:
        """The CTEs ``controlled`` (the keys under an operator's control), ``candidates``, ``judged``, ``stopped``
        (where the claim stopped, if it did), ``taken`` and their history; parameters in ``p``.

        ``after`` names a CTE whose rows the history must follow. Nothing is taken for a runner that may not
        claim (``may_claim_sql``). Without ``controls``, the statement has ``controlled`` already.
        """
        q, inv = self.quote, self.invocations
        candidates = p.part("candidate", *self.claimable_sql(
            ", ".join(q(column) for column in ("id", *(column for column, _ in QUEUE_ORDER[:-1]), "task_name",
                                               "running_key", "running_limit")),
            queues, limit))
        same_key = f"{q('task_name')} = candidate.task_name AND {q('running_key')} = candidate.running_key"
        in_line = p.part("in_line", *self.ahead(
            KEY_ORDER, [Expression(f"candidate.{column}") for column, _ in KEY_ORDER]))
        ahead = f"{self.is_waiting} AND {self.due} AND {in_line}"
        # The slot comes from the judgement: the claim's own value is the one-slot case's 0.
        assignments = p.part("taken", *self._set({name: value for name, value in claim.values.items()
                                                   if name != "slot"}))
        recorded = p.part("taken_event", *self._recorded("taken_recorded", "taken", claim,
                                                          first_from=Status.REGISTERED, after=after,
                                                          order=self._queue_order("taken")))
        may_claim = p("runner", claim.values["runner_id"]).join(self.may_claim_sql().split("%s"))
        return (
            f"candidates AS ({candidates}), {self._controls() + ', ' if controls else ''}"
            # admission.FAST_PATH: a task whose policy this statement implements, and no key, or a key
            # with a slot left once the work due ahead of it takes the first free ones: admission.admit()'s
            # rule and its slot (free.slot), for the first candidate of a key only (two would pick the same
            # slot).
            f"judged AS (SELECT candidate.id, row_number() OVER (ORDER BY {self._queue_order('candidate')}) AS place, "
            f"candidate.task_name = ANY({p('fast_tasks', list(fast_tasks))}) AND (candidate.running_key IS NULL "
            f"OR free.slot IS NOT NULL AND row_number() OVER (PARTITION BY candidate.task_name, "
            f"candidate.running_key ORDER BY {self.order(KEY_ORDER, 'candidate')}) = 1 "
            f"AND NOT {self._under_control('candidate.task_name', 'candidate.running_key')}) AS startable, "
            f"COALESCE(free.slot, 0) AS slot "
            f"FROM candidates AS candidate LEFT JOIN LATERAL (SELECT slot FROM generate_series(0, "
            f"candidate.running_limit - 1) AS slot WHERE slot NOT IN (SELECT {q('slot')} FROM {inv} "
            f"WHERE {same_key} AND {self.is_owned}) OFFSET (SELECT count(*) FROM (SELECT FROM {inv} "
            f"WHERE {same_key} AND {ahead} LIMIT candidate.running_limit) AS due_ahead) LIMIT 1) AS free ON true), "
            f"stopped AS (SELECT min(place) AS place FROM judged WHERE NOT startable), "
            f"taken AS (UPDATE {inv} AS t {assignments}, {q('slot')} = judged.slot FROM judged "
            f"WHERE t.{q('id')} = judged.id AND judged.place < COALESCE((SELECT place FROM stopped), "
            f"{p('past_limit', limit + 1)}) AND {only_if} AND {may_claim} RETURNING {self._returning('t')}), "
            f"{recorded}"
        )

    def _names(self, cursor: Any, sql_text: str) -> list[str]:
        """The columns of a statement's rows: read once a statement (``description`` builds 20-odd objects)."""
        names = self._columns_of.get(sql_text)
        if names is None:
            names = self._columns_of.setdefault(sql_text, [column.name for column in cursor.description])
        return names

    def _returning(self, alias: str) -> str:
        """Every column of the table aliased ``alias``: read back by name (``_invocations(columns=...)``)."""
        return f"{alias}.*"

    def _queue_order(self, table: str) -> str:
        order = self._queue_orders.get(table)
        if order is None:
            order = self._queue_orders[table] = self.order(QUEUE_ORDER, table)
        return order

    def _claimed_rows(self, before: str = "") -> str:
        """The main query after ``_claim``: whether the claim stopped, ``before``, then each row claimed."""
        return (f"SELECT (SELECT place FROM stopped) IS NOT NULL AS stopped, {before}taken.* FROM (SELECT 1) AS one "
                f"LEFT JOIN taken ON true ORDER BY {self._queue_order('taken')}")

    def _claimed(self, rows: Sequence[Sequence[Any]], columns: Sequence[str]) -> Claimed:
        stopped = bool(rows and rows[0][0])
        return Claimed(self._invocations((row[1:] for row in rows if row[1] is not None), columns=columns), stopped)

    # -- creating, and waking idle runners ----------------------------------------------

    def insert(self, fields: Sequence[Any], rows: Sequence[Sequence[Any]], returning: Sequence[Any],
               queue: str) -> list[tuple[Any, ...]]:
        return insert_and_notify(self, fields, rows, returning, CHANNEL, queue)

    # -- large values --------------------------------------------------------------------------------------

    def hold_values(self, values: Sequence[Value]) -> None:
        """Store ``values`` not stored yet; keep each from ``prune_values`` until this transaction ends.

        A stored one is share-locked (FOR KEY SHARE: many calls hold a value
        at once, and only the prune's FOR UPDATE waits), without sending its
        data again. A missing one is inserted; if a concurrent call inserted
        it first, ``DO UPDATE ... WHERE false`` writes nothing but locks it.
        The prune skips locked values, and one it locked first is deleted
        before this insert goes on, which then stores it again.
        """
        quote = self.quote
        table = quote(Value._meta.db_table)
        digest = quote("digest")
        with self.connection.cursor() as cursor:
            cursor.execute(f"SELECT {digest} FROM {table} WHERE {digest} = ANY(%s) FOR KEY SHARE",
                           [[value.digest for value in values]])
            held = {row[0] for row in cursor.fetchall()}
            missing = [value for value in values if value.digest not in held]
            if missing:
                cursor.execute(
                    f"INSERT INTO {table} ({digest}, {quote('data')}, {quote('size')}) VALUES "
                    + ", ".join(["(%s, %s, %s)"] * len(missing))
                    + f" ON CONFLICT ({digest}) DO UPDATE SET {quote('size')} = EXCLUDED.{quote('size')} WHERE false",
                    [part for value in missing for part in (value.digest, value.data, value.size)],
                )

    def notify(self, queue: str) -> None:
        with self.connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, %s)", [CHANNEL, queue])

    def listen(self, on_wake: Callable[[str], None], stop: threading.Event) -> threading.Thread:
        # Its own connection, never the pool's: a pooler in transaction mode cannot keep a LISTEN.
        listener = Listener(conf.LISTEN_DATABASE or self.connection.alias, CHANNEL, on_wake, stop)
        listener.start()
        return listener


class Named:
    """The parameters of one statement, each under a name (``%(name)s``): no list to keep in the text's order."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def __call__(self, name: str, value: Any) -> str:
        """Return the placeholder of ``value`` named ``name`` (a name given twice holds one value)."""
        assert name not in self.values or self.values[name] == value, name
        self.values[name] = value
        return f"%({name})s"

    def part(self, prefix: str, sql: str, params: Sequence[Any]) -> str:
        """Return ``sql``, a part written with positional ``%s``, its parameters named ``prefix_1``, ``prefix_2``..."""
        key = (prefix, sql)
        named = _named_parts.get(key)
        if named is None:  # a part is named once a process: the steps run it thousands of times a second
            if len(_named_parts) > 1000:  # a few dozen shapes are expected; never let a new one grow it for ever
                _named_parts.clear()
            pieces = sql.split("%s")
            named = _named_parts.setdefault(key, (
                "".join(f"{piece}%({prefix}_{number})s" for number, piece in enumerate(pieces[:-1], 1))
                + pieces[-1], len(pieces) - 1))
        text, count = named
        assert count == len(params), (prefix, sql)
        for number, value in enumerate(params, 1):
            self.values[f"{prefix}_{number}"] = value
        return text


#: ``Named.part``'s texts, by prefix and positional text, with their number of parameters.
_named_parts: dict[tuple[str, str], tuple[str, int]] = {}


class Listener(threading.Thread):
    """Listen on a separate autocommit connection and call back on each notification.

    One per runner process, made from ``using``'s settings by psycopg itself:
    outside Django's connection handling, so never one of a pool's, and
    direct to the server when ``KEYJOBS_LISTEN_DATABASE`` names such an alias.

    Whatever ends a connection (a dropped connection, a bad setting, a
    callback that raised), it is logged and another is made after a growing
    pause (``faults.retrying``), until the runner stops; polling covers the gap.
    """

    def __init__(self, using: str, channel: str, on_wake: Callable[[str], None], stop: threading.Event) -> None:
        super().__init__(name="keyjobs-listener", daemon=True)
        self.using = using
        self.channel = channel
        self.on_wake = on_wake
        self.stop = stop
        self.listening = threading.Event()

    def run(self) -> None:
        # As long as the runner runs: it polls meanwhile, so any error is worth another connection.
        while not self.stop.is_set():
            faults.retrying("listen for wake-ups", self._listen, using=self.using, retry_for=lambda exc: True,
                            keep_trying=lambda: not self.stop.is_set(), wait=self.stop.wait)

    def _listen(self) -> None:
        params = connections[self.using].get_connection_params()
        try:
            with psycopg.connect(**params, autocommit=True) as connection:
                connection.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(self.channel)))
                self.listening.set()
                while not self.stop.is_set():
                    for notification in connection.notifies(timeout=0.5):
                        self.on_wake(notification.payload)
        finally:
            self.listening.clear()


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
