"""Statistics kept cheap at scale: a rollup per task and per key per minute, read from the history by a timed duty.

The monitor's Tasks and Keys pages and the metrics endpoint read these rows
(``TaskMinute``, ``KeyMinute``, ``TaskTotal``), never the history itself: a
window of a day is at most 1,440 rows per task however many invocations ran.

Why a duty, and not a write in the transaction that records an outcome: an
outcome is the hot path (on PostgreSQL one statement records it and claims
the thread's next invocation). An upsert there would add a statement, or a
CTE to every one-statement step, and every thread finishing a task in the
same minute would update the same row, queueing the runners' outcomes behind
its row lock. The duty adds nothing to recording an outcome: it reads what
the history already holds, a batch every heartbeat, and writes each row it
touches once per batch.

The history is read by id past a mark (``RollupMark``). Ids are handed out
when a row is inserted, not when its transaction commits: on PostgreSQL an
id below the mark may still become visible later. Such an id is remembered
as a gap and read again on every round until it shows up or ``GRACE``
passes (a rolled-back insert leaves a gap for good). On SQLite, whose
writers take turns, ids commit in order and gaps never fill.

What is counted, by the minute of the history row (the database's clock):

- enqueued: an invocation created (by the minute of its ``created_at``);
- started, and its wait: a change to RUNNING not from PAUSED; the wait of a
  first start (no start before it) is the time since the invocation was
  created, debounce and ``run_after`` included;
- a run's end (to SUCCESS, FAILED, RETRY or CANCELLED from RUNNING or
  PAUSED) and its duration since its start;
- succeeded, failed, retried (to RETRY), cancelled, dropped (to
  CONCURRENCY_CONTROLLED_FINAL) and parked (to REROUTED), however reached;
  merged (a REUSED or DEBOUNCED row) and deferred (a DEFERRED row).
"""

import time
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connections, transaction
from django.db.models import Case, Count, Exists, F, OuterRef, Q, Subquery, When
from django.db.models.functions import Coalesce, Now
from django.utils import timezone

from .conf import conf
from .models import (
    BUCKETS_MS,
    COUNTERS,
    DURATION_BUCKETS,
    WAIT_BUCKETS,
    Event,
    Invocation,
    KeyMinute,
    RollupMark,
    TaskMinute,
    TaskTotal,
)
from .status import OWNED, WAITING, Status
from .store import raw_rows, store

#: Seconds an id below the mark that is not visible yet is looked for again (a transaction still open).
GRACE = 120.0
#: The most such ids remembered; past it the oldest are given up.
MAX_GAPS = 2000
#: History rows read at most per batch, and batches per round.
BATCH = 5000
ROUNDS = 4
#: Seconds between two samples of the queue's depth per task.
DEPTH_EVERY = 15.0
#: Seconds between two prunes of the minutes past their keeping (``prune()``), by a runner's duty.
PRUNE_EVERY = 600.0

ENDS = [Status.SUCCESS, Status.FAILED, Status.RETRY, Status.CANCELLED]
RUN = [Status.RUNNING, Status.PAUSED]
_PER_STATUS = {Status.SUCCESS: "succeeded", Status.FAILED: "failed", Status.RETRY: "retried",
               Status.CANCELLED: "cancelled", Status.CONCURRENCY_CONTROLLED_FINAL: "dropped",
               Status.REROUTED: "parked"}
_PER_KIND = {Event.Kind.REUSED: "merged", Event.Kind.DEBOUNCED: "merged", Event.Kind.DEFERRED: "deferred"}


def bucket(ms: float) -> int:
    """Return the index of the histogram bucket of ``ms`` milliseconds (``BUCKETS_MS``, then the rest): the first
    whose bound is at least ``ms``."""
    return bisect_left(BUCKETS_MS, ms)


@dataclass
class Tally:
    """What one rollup row gains from a batch."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    runs: int = 0
    duration_ms: int = 0
    waits: int = 0
    wait_ms: int = 0
    wait_max_ms: int = 0
    durations: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS_MS) + 1))
    wait_buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS_MS) + 1))

    def run(self, ms: int) -> None:
        self.runs += 1
        self.duration_ms += ms
        self.durations[bucket(ms)] += 1

    def wait(self, ms: int) -> None:
        self.waits += 1
        self.wait_ms += ms
        self.wait_max_ms = max(self.wait_max_ms, ms)
        self.wait_buckets[bucket(ms)] += 1

    def columns(self) -> dict[str, int]:
        return {**self.counts, "runs": self.runs, "duration_ms": self.duration_ms, "waits": self.waits,
                "wait_ms": self.wait_ms, "wait_max_ms": self.wait_max_ms,
                **dict(zip(DURATION_BUCKETS, self.durations, strict=True)),
                **dict(zip(WAIT_BUCKETS, self.wait_buckets, strict=True))}


@dataclass
class Batch:
    """The tallies of a batch: per (task, minute), per (task, key, minute) and per task."""

    tasks: defaultdict[tuple[str, datetime], Tally] = field(default_factory=lambda: defaultdict(Tally))
    keys: defaultdict[tuple[str, str, datetime], Tally] = field(default_factory=lambda: defaultdict(Tally))
    totals: defaultdict[str, Tally] = field(default_factory=lambda: defaultdict(Tally))

    def tallies(self, task_name: str, key: str | None, at: datetime) -> list[Tally]:
        minute = at.replace(second=0, microsecond=0)
        found = [self.tasks[task_name, minute], self.totals[task_name]]
        if key is not None:
            found.append(self.keys[task_name, key, minute])
        return found


def _ms(later: datetime, earlier: datetime) -> int:
    return max(0, round((later - earlier).total_seconds() * 1000))


def roll_up(*, using: str) -> int:
    """Add what the history gained since the last round to the rollup; return how many rows it went through.

    One runner at a time: the marks are locked (skipped if another runner holds them).
    """
    read = 0
    for _ in range(ROUNDS):
        with transaction.atomic(using=using):
            marks = _lock_marks(using)
            if marks is None:
                return read
            batch = Batch()
            now = time.time()
            created, seen = _read(marks["invocations"], Invocation.objects.using(using), _creations(using), now)
            read += seen
            for _, task_name, raw_key, created_at in created:
                for tally in batch.tallies(task_name, raw_key, _moment(created_at)):
                    tally.counts["enqueued"] += 1
            events, looked = _read(marks["events"], Event.objects.using(using), _changes(using), now)
            read += looked
            for row in events:
                _count(batch, row)
            _write(batch, using)
            for mark in marks.values():
                mark.save(using=using)
        if seen < BATCH and looked < BATCH:
            break
    return read


def _count(batch: Batch, row: tuple[Any, ...]) -> None:
    _, kind, came, went, at, task_name, raw_key, created_at, first_start, run_began = row
    at = _moment(at)
    tallies = batch.tallies(task_name, raw_key, at)
    name = _PER_KIND.get(kind)
    if kind == Event.Kind.TRANSITION:
        name = _PER_STATUS.get(went)
        if went == Status.RUNNING and came != Status.PAUSED:
            name = "started"
            if first_start:
                for tally in tallies:
                    tally.wait(_ms(at, _moment(created_at)))
        elif went in ENDS and came in RUN and run_began is not None:
            for tally in tallies:
                tally.run(_ms(at, _moment(run_began)))
        if went == Status.REROUTED and came == Status.REROUTED:
            name = None
    if name is not None:
        for tally in tallies:
            tally.counts[name] += 1


def _moment(value: datetime | str) -> datetime:
    """Return a moment as the database driver hands it over, as a datetime: SQLite's are text (Django's converters,
    which would make them aware one by one, are skipped; the minutes are made aware once each, ``_minute``)."""
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def _creations(using: str) -> Any:
    return (Invocation.objects.using(using)
            .annotate(raw_key=Coalesce("running_key", "registration_key"))
            .values_list("id", "task_name", "raw_key", "created_at"))


#: The history rows that count (``_count``): the others (a claim's REGISTERED to PENDING, a wake-up's REROUTED to
#: REGISTERED, ...) are never read, only their ids, to move the mark past them.
COUNTED = (Q(kind__in=list(_PER_KIND))
           | Q(kind=Event.Kind.TRANSITION, to_status__in=[Status.RUNNING, *_PER_STATUS]))


def _changes(using: str) -> Any:
    history = Event.objects.using(using)
    earlier_starts = history.filter(invocation_id=OuterRef("invocation_id"), id__lt=OuterRef("id"),
                                    kind=Event.Kind.TRANSITION, to_status=Status.RUNNING).exclude(
        from_status=Status.PAUSED)
    is_start = Q(kind=Event.Kind.TRANSITION, to_status=Status.RUNNING) & ~Q(from_status=Status.PAUSED)
    is_end = Q(kind=Event.Kind.TRANSITION, to_status__in=ENDS, from_status__in=RUN)
    # Each looked up only where it is needed (a CASE runs its subquery for the rows it applies to).
    return history.filter(COUNTED).annotate(
        task_name=F("invocation__task_name"),
        raw_key=Coalesce("invocation__running_key", "invocation__registration_key"),
        created_at=F("invocation__created_at"),
        first_start=Case(When(is_start, then=~Exists(earlier_starts)), default=None),
        run_began=Case(When(is_end, then=Subquery(earlier_starts.order_by("-id").values("at")[:1])), default=None),
    ).values_list("id", "kind", "from_status", "to_status", "at", "task_name", "raw_key", "created_at",
                  "first_start", "run_began")


def _lock_marks(using: str) -> dict[str, RollupMark] | None:
    """Lock both marks for this round (made on the first); None if another runner is rolling up."""
    marks = RollupMark.objects.using(using)
    marks.bulk_create([RollupMark(name="events"), RollupMark(name="invocations")], ignore_conflicts=True)
    features = connections[using].features
    if not features.has_select_for_update:
        # SQLite: take the database's write lock before reading, so that two runners never read the same rows.
        marks.filter(name="events").update(last_id=F("last_id"))
    found = {mark.name: mark for mark in marks.select_for_update(
        skip_locked=features.has_select_for_update_skip_locked).filter(name__in=["events", "invocations"])}
    return found if len(found) == 2 else None


def _read(mark: RollupMark, table: Any, rows: Any, now: float) -> tuple[list[tuple[Any, ...]], int]:
    """Return the rows of ``rows`` past ``mark`` and of its gaps now visible, in id order, and how many ids of
    ``table`` it looked at; move the mark past them.

    The batch's ids are found first, on the primary key alone: asked for with its joins and lookups, the
    planner may join and look up every row past the mark before it sorts and cuts the batch. The rows are read
    as the driver hands them over (``values_list`` without Django's converters: ``_moment``).
    """
    gaps = {int(pk): since for pk, since in mark.gaps.items()}
    ids = list(table.filter(Q(id__gt=mark.last_id) | Q(id__in=list(gaps))).order_by("id")
               .values_list("id", flat=True)[:BATCH])
    found: list[tuple[Any, ...]] = []
    if ids:
        query = rows.filter(Q(id__gt=mark.last_id, id__lte=ids[-1])
                            | Q(id__in=[pk for pk in ids if pk <= mark.last_id])).order_by("id")
        found = raw_rows(query)
    # Seen: every id found, counted or not (a row committed between the two statements is read, not a gap).
    seen = {*ids, *(row[0] for row in found)}
    top = max(seen, default=mark.last_id)
    for pk in seen:
        gaps.pop(pk, None)
    if top > mark.last_id:
        # A new mark's first round: the ids well below the first row read predate the rollup (pruned, or never
        # committed); only those just below it may be transactions still open.
        bottom = mark.last_id if mark.last_id or gaps else max(0, min(seen) - MAX_GAPS // 2 - 1)
        for pk in range(bottom + 1, top):
            if pk not in seen:
                gaps[pk] = now
    kept = sorted(((pk, since) for pk, since in gaps.items() if now - since < GRACE), key=lambda gap: -gap[1])
    mark.gaps = {str(pk): since for pk, since in kept[:MAX_GAPS]}
    mark.last_id = max(top, mark.last_id)
    return found, len(ids)


def _minute(minute: datetime) -> datetime:
    """Return a minute read from SQLite's text (naive, and UTC where Django stores moments in UTC) as Django would."""
    return minute.replace(tzinfo=UTC) if minute.tzinfo is None and settings.USE_TZ else minute


def _write(batch: Batch, using: str) -> None:
    _upsert(TaskMinute, ("task_name", "minute"),
            [((task_name, _minute(minute)), tally) for (task_name, minute), tally in batch.tasks.items()], using)
    _upsert(KeyMinute, ("task_name", "key", "minute"),
            [((task_name, key, _minute(minute)), tally) for (task_name, key, minute), tally in batch.keys.items()],
            using)
    _upsert(TaskTotal, ("task_name",), [((task_name,), tally) for task_name, tally in batch.totals.items()], using)


def _upsert(model: Any, unique: Sequence[str], rows: Iterable[tuple[tuple[Any, ...], Tally]], using: str) -> None:
    """Add each tally to its row, made if missing: INSERT ... ON CONFLICT DO UPDATE, which both databases take."""
    rows = list(rows)
    if not rows:
        return
    connection = connections[using]
    quote = connection.ops.quote_name
    table = quote(model._meta.db_table)
    names = list(rows[0][1].columns())
    fields = [model._meta.get_field(name) for name in (*unique, *names)]
    added = ", ".join(
        f"{quote(name)} = CASE WHEN EXCLUDED.{quote(name)} > {table}.{quote(name)} THEN EXCLUDED.{quote(name)} "
        f"ELSE {table}.{quote(name)} END" if name == "wait_max_ms" else
        f"{quote(name)} = {table}.{quote(name)} + EXCLUDED.{quote(name)}"
        for name in names
    )
    # One row a statement, many statements at once (psycopg pipelines them, SQLite reuses its prepared one): a
    # VALUES list of thousands of placeholders costs the driver more to parse than the database to run.
    sql = (f"INSERT INTO {table} ({', '.join(quote(field_.column) for field_ in fields)}) "
           f"VALUES ({', '.join(['%s'] * len(fields))}) "
           f"ON CONFLICT ({', '.join(quote(name) for name in unique)}) DO UPDATE SET {added}")
    # Only the minute needs preparing (a datetime): the rest are names and counts, sent as they are.
    prepared = [(index, field_) for index, field_ in enumerate(fields) if field_.get_internal_type() == "DateTimeField"]
    params = []
    for values, tally in rows:
        row = [*values, *tally.columns().values()]
        for index, field_ in prepared:
            row[index] = field_.get_db_prep_save(row[index], connection)
        params.append(row)
    # The store's cursor: on PostgreSQL it binds on the server, so the statement is planned once, not per row.
    with store(using).cursor() as cursor:
        cursor.executemany(sql, params)


def sample_depth(*, using: str, now: datetime | None = None) -> None:
    """Record each task's waiting and owned invocations now, on its row of this minute (queue depth over time)."""
    minute = (now or timezone.now()).replace(second=0, microsecond=0)
    counts: dict[str, list[int]] = {}
    for task_name, waiting, owned in (
        Invocation.objects.using(using).filter(status__in=sorted(WAITING | OWNED)).order_by()
        .values_list("task_name").annotate(waiting=Count("id", filter=Q(status__in=sorted(WAITING))),
                                           owned=Count("id", filter=Q(status__in=sorted(OWNED))))
    ):
        counts[task_name] = [waiting, owned]
    rows = TaskMinute.objects.using(using)
    # A task with nothing left waiting is sampled at 0 too, if it had a row lately: an empty queue is a depth.
    for task_name in rows.filter(minute__gte=minute - timedelta(minutes=15)).values_list("task_name", flat=True).distinct():
        counts.setdefault(task_name, [0, 0])
    with transaction.atomic(using=using):
        for task_name, (waiting, owned) in counts.items():
            updated = rows.filter(task_name=task_name, minute=minute).update(waiting_now=waiting, owned_now=owned)
            if not updated:
                rows.bulk_create([TaskMinute(task_name=task_name, minute=minute, waiting_now=waiting,
                                             owned_now=owned)], ignore_conflicts=True)


def prune(*, using: str, batch: int = BATCH) -> int:
    """Delete a batch of the rollup's minutes older than they are kept; return how many (0: none was left).

    Per task, ``KEYJOBS_ROLLUP_KEEP``; per key, ``KEYJOBS_KEY_ROLLUP_KEEP`` (the database's clock). The
    totals per task (``TaskTotal``, the metrics' counters) are never pruned.
    """
    deleted = 0
    for model, keep in ((TaskMinute, conf.ROLLUP_KEEP), (KeyMinute, conf.KEY_ROLLUP_KEEP)):
        rows = model.objects.using(using)
        old = list(rows.filter(minute__lt=Now() - keep).order_by("minute").values_list("pk", flat=True)[:batch])
        if old:
            deleted += rows.filter(pk__in=old).delete()[0]
    return deleted
