"""What the monitor's pages read: one function per page, each returning a named result.

Each page is a plain query over the append-only event history (indexed on
``at``) or over the status indexes of the invocations, bounded in time and in
rows; tests pin how many queries each one takes. Whether a runner is alive is
``RunnerQuerySet``'s to say, on the database's clock.
"""

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypedDict, TypeVar

from django.db import connections
from django.db.models import Count, F, Max, Min, Q, QuerySet, Sum
from django.db.models.functions import Coalesce, Now, TruncMinute
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from .. import registry
from ..concurrency import key_label
from ..conf import conf
from ..models import (
    BUCKETS_MS,
    COUNTERS,
    DURATION_BUCKETS,
    WAIT_BUCKETS,
    Event,
    Invocation,
    KeyAction,
    KeyControl,
    KeyMinute,
    RateToken,
    RunLog,
    Runner,
    Schedule,
    TaskMinute,
    TaskTotal,
)
from ..status import HANDED, OWNED, WAITING, Status
from ..store import raw_rows, store
from .display import epoch_ms, natural, runner_label, short_task

#: The timeline reads at most this many events (20,000 invocations of five history rows each, counted per step
#: past ``RUN_BUDGET``); a busier window is cut to its most recent part, and says so.
MAX_EVENTS = 120_000
DEFAULT_MINUTES = 15
#: The longest window the timeline accepts, in minutes (a week).
MAX_MINUTES = 7 * 24 * 60
#: Minutes of throughput and of busy keys on the dashboard.
THROUGHPUT_MINUTES = 15
#: How many finished and dropped invocations the key view lists, newest first.
KEY_HISTORY = 200
#: Keys at their limit the dashboard lists at most.
KEYS_AT_LIMIT = 20


# -- the timeline ---------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """The span of time the timeline shows; ``follows_now`` when it is "the last N minutes"."""

    start: datetime
    end: datetime
    minutes: int | None = None

    @property
    def follows_now(self) -> bool:
        return self.minutes is not None

    @classmethod
    def last(cls, minutes: int, now: datetime) -> "Window":
        """Return the window of the last ``minutes`` minutes before ``now``."""
        return cls(now - timedelta(minutes=minutes), now, minutes)

    @classmethod
    def from_query(cls, params: Any, now: datetime) -> "Window":
        """Read ``minutes``, or ``from`` and ``to``, from query parameters; raise ValueError if they make no window."""
        start_text, end_text = params.get("from", "").strip(), params.get("to", "").strip()
        if start_text or end_text:
            start = _parse_moment(start_text, "from") if start_text else None
            end = _parse_moment(end_text, "to") if end_text else now
            if start is None:
                start = end - timedelta(minutes=DEFAULT_MINUTES)
            if end <= start:
                raise ValueError("'to' must be after 'from'")
            if end - start > timedelta(minutes=MAX_MINUTES):
                raise ValueError(f"a window is at most {MAX_MINUTES // 1440} days long")
            return cls(start, end)
        try:
            minutes = int(params.get("minutes", DEFAULT_MINUTES))
        except ValueError:
            raise ValueError("'minutes' must be a whole number") from None
        if not 1 <= minutes <= MAX_MINUTES:
            raise ValueError(f"'minutes' must be from 1 to {MAX_MINUTES}")
        return cls.last(minutes, now)

    def as_query(self) -> dict[str, str]:
        """Return the query parameters that name this window again."""
        if self.follows_now:
            return {"minutes": str(self.minutes)}
        return {"from": self.start.isoformat(), "to": self.end.isoformat()}


def _parse_moment(text: str, name: str) -> datetime:
    try:
        moment = parse_datetime(text)
    except ValueError:
        moment = None
    if moment is None:
        raise ValueError(f"{name!r} is not a date and time: {text!r}")
    if timezone.is_naive(moment):
        # What a datetime-local input sends: the wall clock of the site's time zone.
        moment = timezone.make_aware(moment)
    return moment


class Run(TypedDict):
    """A bar: from a RUNNING event to the invocation's next status change (``end`` None while it runs)."""

    id: int
    start: int | None
    end: int | None
    status: str
    thread_lane: int
    key_lane: int
    #: The stretches the run was PAUSED, waiting on another invocation: [start, end or None while paused].
    pauses: list[list[int | None]]
    #: The invocation whose run delayed this one, if any.
    parent: int | None


class Marker(TypedDict):
    """A moment: an invocation parked (``rerouted``), ``dropped``, deduplicated (``reused``), ``debounced`` or ``cancelled``."""

    id: int
    at: int
    kind: str
    key_lane: int


class ThreadLane(TypedDict):
    id: str
    label: str
    runner: int | None
    thread: int | None


class KeyLane(TypedDict):
    id: str
    task: str
    key: str
    raw_key: str
    label: str


class Lanes(TypedDict):
    thread: list[ThreadLane]
    key: list[KeyLane]


class Timeline(TypedDict):
    """What the timeline page's script reads, as JSON; times in epoch milliseconds."""

    now: int
    start: int
    end: int
    follows_now: bool
    runs: list[Run]
    markers: list[Marker]
    lanes: Lanes
    truncated: bool
    limit: int
    active: bool
    #: More runs or markers than the page draws one by one: counted per lane and step instead (``condense``).
    aggregated: bool
    #: Per lane mode: [lane, step, index into ``band_statuses``, runs]; a run counts in every step it overlaps.
    bands: dict[str, list[list[int]]]
    band_statuses: list[str]
    #: [key lane, step, index into ``band_kinds``, markers].
    marker_bands: list[list[int]]
    band_kinds: list[str]
    step_ms: int
    #: Key lanes folded into one per task (the least busy keys), when there were more than ``KEY_LANES``.
    folded_keys: int


def timeline_events(window: Window, *, task: str = "", key: str = "", using: str | None = None) -> QuerySet[Any]:
    """Return the rows of the events the timeline draws in ``window``, newest first (the index on ``at``).

    The events alone: their invocations' task and keys are read by id afterwards (``_of_invocations``). Joined
    here, PostgreSQL hashed the whole invocations table to meet a window's few thousand events (0.5 s of a
    million). A task or key asked for still filters through the join, which its index then narrows.
    """
    events = Event.objects.using(using or conf.DATABASE).filter(at__gte=window.start, at__lte=window.end).filter(
        Q(kind=Event.Kind.TRANSITION)
        & (
            Q(to_status=Status.RUNNING)
            | Q(from_status__in=[Status.RUNNING, Status.PAUSED])
            | Q(to_status__in=[Status.REROUTED, Status.CONCURRENCY_CONTROLLED_FINAL, Status.CANCELLED])
        )
        | Q(kind__in=[Event.Kind.REUSED, Event.Kind.DEBOUNCED])
    )
    if task:
        events = events.filter(invocation__task_name=task)
    if key:
        events = events.filter(Q(invocation__running_key=key) | Q(invocation__registration_key=key))
    # Newest first, so that a cut keeps the end of the window, where the eye is.
    return events.order_by("-at").values_list(
        "id", "invocation_id", "kind", "from_status", "to_status", "at", "runner_id", "runner_thread",
    )


def _of_invocations(ids: set[int], using: str) -> dict[int, tuple[str, str | None, str | None, int | None]]:
    """Return the task, running key, registration key and parent of each invocation of ``ids``, by primary key.

    The ids as the store passes a list (``Store.one_of``: one array on PostgreSQL, whose text stays short however
    many thousands they are), in as few statements as the database takes parameters.
    """
    connection = connections[using]
    table, quote = Invocation._meta.db_table, connection.ops.quote_name
    columns = ", ".join(quote(column) for column in ("id", "task_name", "running_key", "registration_key", "parent_id"))
    ordered = sorted(ids)
    size = connection.features.max_query_params or len(ordered)
    found: dict[int, tuple[str, str | None, str | None, int | None]] = {}
    with connection.cursor() as cursor:
        for at in range(0, len(ordered), size):
            condition, params = store(using).one_of(quote("id"), ordered[at:at + size])
            cursor.execute(f"SELECT {columns} FROM {quote(table)} WHERE {condition}", params)
            for pk, task_name, running_key, registration_key, parent in cursor.fetchall():
                found[pk] = (task_name, running_key, registration_key, parent)
    return found


def timeline(
    window: Window,
    *,
    now: datetime,
    task: str = "",
    key: str = "",
    limit: int = MAX_EVENTS,
    using: str | None = None,
) -> Timeline:
    """Return the runs, markers and lanes of ``window``, optionally of one task and key.

    A run is a RUNNING event paired with the next status change of its
    invocation, whose ``to_status`` colours the bar; a run with no end yet is
    running. A run's PAUSED stretches (RUNNING to PAUSED and back) stay on
    its bar, as ``pauses``. Markers are the parked (REROUTED), dropped
    (CONCURRENCY_CONTROLLED_FINAL), deduplicated (REUSED), debounced
    (DEBOUNCED) and cancelled-before-running (CANCELLED) moments, and the
    schedules' ticks. Runs
    and markers name their lanes by index: ``thread_lane`` into
    ``lanes["thread"]`` (runner and thread), ``key_lane`` into
    ``lanes["key"]`` (task and key).
    """
    using = using or conf.DATABASE
    invocations = Invocation.objects.using(using)
    if task:
        invocations = invocations.filter(task_name=task)
    if key:
        invocations = invocations.filter(Q(running_key=key) | Q(registration_key=key))
    rows = raw_rows(timeline_events(window, task=task, key=key, using=using)[: limit + 1])
    truncated = len(rows) > limit
    if truncated:
        rows.pop()
    rows.reverse()
    of_invocation = _of_invocations({row[1] for row in rows}, using) if rows else {}

    runs: list[Run] = []
    markers: list[Marker] = []
    open_runs: dict[int, Run] = {}
    clipped: list[Run] = []
    # Lanes are numbered as they are first met, and sorted at the end.
    thread_index: dict[tuple[int | None, int | None], int] = {}
    key_index: dict[tuple[str, str | None], int] = {}
    task_first_seen: dict[str, int] = {}

    def key_lane(task_name: str, raw_key: str | None, at: int) -> int:
        task_first_seen.setdefault(task_name, at)
        return key_index.setdefault((task_name, raw_key), len(key_index))

    def thread_lane(runner_id: int | None, thread: int | None) -> int:
        return thread_index.setdefault((runner_id, thread), len(thread_index))

    running, rerouted, cancelled, paused = Status.RUNNING, Status.REROUTED, Status.CANCELLED, Status.PAUSED
    merges = {Event.Kind.REUSED: "reused", Event.Kind.DEBOUNCED: "debounced"}
    database_zone = connections[using].timezone
    for _, pk, kind, from_status, to_status, at, runner_id, thread in rows:
        task_name, running_key, registration_key, parent = of_invocation[pk]
        if at.tzinfo is None:
            # What Django's converter would do: the database stores its own time zone's wall clock.
            at = at.replace(tzinfo=database_zone)
        moment = round(at.timestamp() * 1000)
        lane_key = (task_name, running_key or registration_key)
        lane = key_index.get(lane_key)
        if lane is None:
            lane = key_lane(task_name, lane_key[1], moment)
        if kind in merges or (to_status != running and from_status not in (running, paused)):
            markers.append({
                "id": pk, "at": moment, "key_lane": lane,
                "kind": merges.get(kind) or ("rerouted" if to_status == rerouted else
                                             "cancelled" if to_status == cancelled else "dropped"),
            })
            continue
        if to_status == running and from_status != paused:
            open_runs[pk] = {"id": pk, "start": moment, "end": None, "status": running,
                             "thread_lane": thread_lane(runner_id, thread), "key_lane": lane, "pauses": [],
                             "parent": parent}
            continue
        run = open_runs.get(pk)
        if run is None:
            # Started before the window: its start is read below.
            run = open_runs[pk] = {"id": pk, "start": None, "end": None, "status": running,
                                   "thread_lane": thread_lane(runner_id, thread), "key_lane": lane, "pauses": [],
                                   "parent": parent}
            clipped.append(run)
        if from_status == paused:
            if not run["pauses"]:
                run["pauses"].append([None, None])  # paused before the window
            run["pauses"][-1][1] = moment
        if to_status == paused:
            run["pauses"].append([moment, None])
            continue
        if to_status == running:
            continue  # back from a pause: the same run goes on
        del open_runs[pk]
        run["end"], run["status"] = moment, to_status
        runs.append(run)

    # A schedule's tick: the moment its invocation was due.
    for pk, tick_at, task_name, running_key, registration_key in ticks(window, task=task, key=key, limit=limit,
                                                                        using=using):
        lane_key = (task_name, running_key or registration_key)
        moment = epoch_ms(tick_at) or 0
        lane = key_index.get(lane_key)
        markers.append({"id": pk, "at": moment, "kind": "tick",
                        "key_lane": lane if lane is not None else key_lane(task_name, lane_key[1], moment)})
    if clipped:
        started = dict(invocations.filter(pk__in=[run["id"] for run in clipped]).values_list("pk", "started_at"))
        for run in clipped:
            began = epoch_ms(started.get(run["id"]))
            ends = run["end"] if run["end"] is not None else epoch_ms(now)
            run["start"] = began if began is not None and ends is not None and began <= ends else None
            if run["pauses"] and run["pauses"][0][0] is None:
                run["pauses"][0][0] = run["start"] if run["start"] is not None else epoch_ms(window.start)
    if open_runs and not window.follows_now:
        # Runs that started in a past window and ended after it.
        for pk, at, to_status in (
            Event.objects.using(using)
            .filter(invocation_id__in=list(open_runs), kind=Event.Kind.TRANSITION,
                    from_status__in=[Status.RUNNING, Status.PAUSED], at__gt=window.end)
            .exclude(to_status__in=[Status.RUNNING, Status.PAUSED])
            .order_by("at")
            .values_list("invocation_id", "at", "to_status")
        ):
            ended = open_runs.pop(pk, None)
            if ended is not None:
                ended["end"], ended["status"] = epoch_ms(at), to_status
                runs.append(ended)
    runs.extend(open_runs.values())
    if window.end >= now - timedelta(seconds=1):
        # Runs still going that began before the window: no event of theirs falls in it.
        seen = {run["id"] for run in runs}
        for pk, task_name, running_key, registration_key, started_at, runner_id, thread, parent, status in (
            invocations.filter(status__in=[Status.RUNNING, Status.PAUSED], started_at__lt=window.start)
            .values_list("pk", "task_name", "running_key", "registration_key", "started_at", "runner_id",
                         "runner_thread", "parent_id", "status")
        ):
            if pk not in seen:
                runs.append({
                    "id": pk, "start": epoch_ms(started_at), "end": None, "status": Status.RUNNING.value,
                    "thread_lane": thread_lane(runner_id, thread),
                    "key_lane": key_lane(task_name, running_key or registration_key, epoch_ms(started_at) or 0),
                    # Paused since before the window: shown paused from the window's start.
                    "pauses": [[epoch_ms(window.start), None]] if status == Status.PAUSED else [],
                    "parent": parent,
                })

    runner_ids = {runner_id for runner_id, _ in thread_index if runner_id is not None}
    runners = {
        pk: runner_label(host, pid)
        for pk, host, pid in Runner.objects.using(using).filter(pk__in=runner_ids).values_list("pk", "host", "pid")
    } if runner_ids else {}
    thread_lanes: list[ThreadLane] = [
        {"id": f"{runner_id}/{thread}",
         "label": "no runner" if runner_id is None else f"{runners.get(runner_id, runner_id)} · thread {thread}",
         "runner": runner_id, "thread": thread}
        for runner_id, thread in thread_index
    ]
    keys, others, folded = _fold_keys(list(key_index), [*runs, *markers])
    key_lanes: list[KeyLane] = []
    for number, (task_name, raw_key) in enumerate(keys):
        if number in others:
            key_lanes.append({"id": f"{task_name}\n*", "task": task_name, "key": "", "raw_key": "",
                              "label": f"{short_task(task_name)} · other keys"})
            continue
        label = key_label(raw_key)
        key_lanes.append({"id": f"{task_name}\n{raw_key or ''}", "task": task_name, "key": label,
                          "raw_key": raw_key or "", "label": f"{short_task(task_name)} · {label or 'no key'}"})
    # Lanes in a stable order: threads by runner; keys grouped by task, the task seen first on top.
    thread_order = _reorder(runs, "thread_lane", thread_lanes,
                            lambda lane: (lane["runner"] or 0, -1 if lane["thread"] is None else lane["thread"]))
    key_order = _reorder([*runs, *markers], "key_lane", key_lanes,
                         lambda lane: (task_first_seen[lane["task"]], lane["task"], lane["raw_key"] == "",
                                       natural(lane["key"])))
    return condense({
        "now": round(now.timestamp() * 1000),
        "start": round(window.start.timestamp() * 1000),
        "end": round(window.end.timestamp() * 1000),
        "follows_now": window.follows_now,
        "runs": runs,
        "markers": markers,
        "lanes": {"thread": thread_order, "key": key_order},
        "truncated": truncated,
        "limit": limit,
        "active": invocations.filter(status__in=sorted(WAITING | OWNED)).exists(),
        "aggregated": False, "bands": {}, "band_statuses": [], "marker_bands": [], "band_kinds": [], "step_ms": 0,
        "folded_keys": folded,
    })


#: The most runs, and markers, the timeline sends one by one; past either, it sends counts per lane and step.
RUN_BUDGET = 4000
MARKER_BUDGET = 4000
#: Steps across the window when counts are sent: about a pixel each on a wide screen, at first.
BAND_STEPS = 800
#: The most counts sent (runs' in both lane modes and markers'): past it, the steps are made twice as long, and
#: again, until they fit. About 15 bytes of JSON each: the page stays a few hundred kB however busy its window.
BAND_CELLS = 20_000
#: The most key lanes sent; past it, each task's least busy keys share one lane.
KEY_LANES = 300


def _fold_keys(keys: list[tuple[str, str | None]], items: list[Any]
               ) -> tuple[list[tuple[str, str | None]], set[int], int]:
    """Past ``KEY_LANES`` key lanes, let each task's least busy keys (by runs and markers) share one lane.

    ``keys`` are the lanes as numbered in ``items``' ``key_lane``, which are renumbered. Return the lanes kept
    and the shared ones (task, None), the numbers of the shared ones, and how many lanes were folded. Before the
    lanes are labelled and sorted, so that a window of ten thousand keys labels and sorts only those it sends.
    """
    if len(keys) <= KEY_LANES:
        return keys, set(), 0
    activity = [0] * len(keys)
    for item in items:
        activity[item["key_lane"]] += 1
    kept = set(sorted(range(len(keys)), key=lambda lane: (-activity[lane], lane))[: KEY_LANES - 20])
    renumber: dict[int, int] = {}
    lanes: list[tuple[str, str | None]] = []
    others: dict[str, int] = {}
    for number, (task_name, raw_key) in enumerate(keys):
        if number in kept:
            renumber[number] = len(lanes)
            lanes.append((task_name, raw_key))
        else:
            if task_name not in others:
                others[task_name] = len(lanes)
                lanes.append((task_name, None))
            renumber[number] = others[task_name]
    for item in items:
        item["key_lane"] = renumber[item["key_lane"]]
    return lanes, set(others.values()), len(keys) - len(kept)


def condense(data: Timeline) -> Timeline:
    """Keep the timeline's JSON small however busy its window: aggregate instead of dropping.

    Past ``RUN_BUDGET`` runs or ``MARKER_BUDGET`` markers, runs become counts per lane, step and status (a
    density band; a run counts in every step it overlaps) and markers counts per key lane, step and kind;
    zooming in asks for a shorter window, which is sent one by one again. The steps start at ``BAND_STEPS``
    across the window and are made longer, by powers of two, until the counts number at most ``BAND_CELLS``. (Past
    ``KEY_LANES`` key lanes, the quietest keys of each task already share one: ``_fold_keys``.)
    """
    if len(data["runs"]) <= RUN_BUDGET and len(data["markers"]) <= MARKER_BUDGET:
        return data
    start, end, now = data["start"], data["end"], data["now"]
    statuses: dict[str, int] = {}
    kinds: dict[str, int] = {}
    # Each run's first and last step and each marker's step, at the shortest step; a longer one is a multiple.
    fine = max(1, -(-(end - start) // BAND_STEPS))
    last = BAND_STEPS - 1
    spans = [
        (run["thread_lane"], run["key_lane"], statuses.setdefault(run["status"], len(statuses)),
         min(last, (max(start, run["start"] if run["start"] is not None else start) - start) // fine),
         min(last, (max(start, min(end, run["end"] if run["end"] is not None else now)) - start) // fine))
        for run in data["runs"]
    ]
    fine_marks = Counter((marker["key_lane"], min(last, max(0, marker["at"] - start) // fine),
                          kinds.setdefault(marker["kind"], len(kinds))) for marker in data["markers"])
    times = 1
    while True:
        covered = [(thread_lane, key_lane, status, range(first // times, max(first, final) // times + 1))
                   for thread_lane, key_lane, status, first, final in spans]
        threads = Counter((lane, number, status) for lane, _, status, numbers in covered for number in numbers)
        keys = Counter((lane, number, status) for _, lane, status, numbers in covered for number in numbers)
        marks: Counter[tuple[int, int, int]] = Counter()
        for (lane, number, kind), count in fine_marks.items():
            marks[lane, number // times, kind] += count
        cells = len(threads) + len(keys) + len(marks)
        if cells <= BAND_CELLS or times >= BAND_STEPS:
            break
        # Steps longer by the next power of two that would fit if the counts shrank as the steps do: they shrink
        # less (a lane's counts merge only where it was busy in neighbouring steps), hence the loop.
        times <<= max(1, (-(-cells // BAND_CELLS) - 1).bit_length())
    step = fine * times
    data["aggregated"], data["runs"], data["markers"], data["step_ms"] = True, [], [], step
    data["bands"] = {mode: [[*cell, count] for cell, count in sorted(found.items())]
                     for mode, found in (("thread", threads), ("key", keys))}
    data["band_statuses"], data["band_kinds"] = list(statuses), list(kinds)
    data["marker_bands"] = [[*cell, count] for cell, count in sorted(marks.items())]
    return data


Lane = TypeVar("Lane", ThreadLane, KeyLane)


def _reorder(items: list[Any], field: str, lanes: list[Lane], order: Callable[[Lane], Any]) -> list[Lane]:
    """Sort ``lanes`` by ``order`` and renumber the lane index ``field`` of ``items`` to match."""
    ranked = sorted(range(len(lanes)), key=lambda number: order(lanes[number]))
    renumber = {old: new for new, old in enumerate(ranked)}
    for item in items:
        item[field] = renumber[item[field]]
    return [lanes[number] for number in ranked]


def detail(pk: int, *, using: str | None = None) -> Invocation | None:
    """Return invocation ``pk`` for the timeline's tooltip, or None."""
    return Invocation.objects.using(using or conf.DATABASE).filter(pk=pk).first()


# -- the dashboard ----------------------------------------------------------------


@dataclass(frozen=True)
class LiveRunner:
    """A runner alive now, and how many invocations it owns."""

    pk: int
    host: str
    pid: int
    threads: int
    heartbeat_at: datetime
    running: int
    #: The supervisor's runner id, for a worker process of ``runworker --processes``.
    supervisor: int | None = None

    @property
    def is_supervisor(self) -> bool:
        """Whether this is the supervisor of ``runworker --processes``: it runs no thread of its own."""
        return self.threads == 0


@dataclass(frozen=True)
class OfKey:
    """A line about one (task, stored key)."""

    task: str
    raw_key: str

    @property
    def key(self) -> str:
        """The key a person reads."""
        return key_label(self.raw_key)


@dataclass(frozen=True)
class BusyKey(OfKey):
    """How many invocations of one (task, key) were created lately, and where they stand."""

    total: int
    waiting: int
    owned: int
    dropped: int


@dataclass(frozen=True)
class KeyAtLimit:
    """A running key whose slots are all taken: as many owned invocations as its limit."""

    task: str
    raw_key: str
    in_use: int
    limit: int

    @property
    def key(self) -> str:
        return key_label(self.raw_key)


#: The finished statuses, and the rollup's counter of each (``TaskTotal``).
FINISHED_COUNTERS = {Status.SUCCESS: "succeeded", Status.FAILED: "failed", Status.CANCELLED: "cancelled",
                     Status.CONCURRENCY_CONTROLLED_FINAL: "dropped"}


@dataclass(frozen=True)
class Dashboard:
    """Counts per status and per task, recent throughput, live runners, busy keys and the oldest waiter."""

    #: Every status, in the lifecycle's order, with its count: the waiting and owned ones now, the finished ones
    #: since the rollup began (``FINISHED_COUNTERS``: as of its last pass, and kept when invocations are pruned).
    per_status: dict[str, int]
    #: Per task name, in name order: every status with its count, as ``per_status``.
    per_task: dict[str, dict[str, int]]
    #: Invocations finished in each of the last ``THROUGHPUT_MINUTES`` minutes, oldest first.
    throughput: list[tuple[datetime, int]]
    runners: list[LiveRunner]
    #: The keys with the most invocations created in the last ``THROUGHPUT_MINUTES`` minutes, at most ten.
    busiest: list[BusyKey]
    oldest_waiting: Invocation | None
    #: The running keys whose every slot is taken now, at most ``KEYS_AT_LIMIT``, by task and key.
    at_limit: list[KeyAtLimit] = field(default_factory=list)

    @property
    def active(self) -> bool:
        """Whether anything waits or runs."""
        return any(self.per_status[status] for status in WAITING | OWNED)


def dashboard(*, now: datetime, using: str | None = None) -> Dashboard:
    """Return what the dashboard shows at ``now``."""
    using = using or conf.DATABASE
    invocations = Invocation.objects.using(using)
    per_status = dict.fromkeys(Status.values, 0)
    per_task: dict[str, dict[str, int]] = {}
    # What waits and runs, counted now through the status index; what finished, from the rollup's totals (the
    # metrics' counters): counting the finished rows themselves read the whole table (0.27 s of a million).
    live = invocations.filter(status__in=sorted(WAITING | OWNED)).order_by().values_list("task_name", "status")
    for task_name, status, count in live.annotate(count=Count("id")):
        per_status[status] = per_status.get(status, 0) + count
        per_task.setdefault(task_name, dict.fromkeys(Status.values, 0))[status] = count
    for task_name, *counts in TaskTotal.objects.using(using).values_list("task_name", *FINISHED_COUNTERS.values()):
        if any(counts):
            of_task = per_task.setdefault(task_name, dict.fromkeys(Status.values, 0))
            for status, count in zip(FINISHED_COUNTERS, counts, strict=True):
                per_status[status] += count
                of_task[status] = count

    since = (now - timedelta(minutes=THROUGHPUT_MINUTES - 1)).replace(second=0, microsecond=0)
    finished = dict(
        invocations.finished().filter(finished_at__gte=since)
        .annotate(minute=TruncMinute("finished_at"))
        .order_by()
        .values_list("minute")
        .annotate(count=Count("id"))
        .values_list("minute", "count")
    )
    minutes = (since + timedelta(minutes=n) for n in range(THROUGHPUT_MINUTES))

    # Counted from the status index, not through each runner's whole history.
    owned = dict(
        invocations.owned().order_by().values_list("runner_id").annotate(count=Count("id")).values_list(
            "runner_id", "count")
    )
    runners = sorted(
        (LiveRunner(pk, host, pid, threads, heartbeat_at, owned.get(pk, 0), supervisor)
         for pk, host, pid, threads, heartbeat_at, supervisor in Runner.objects.using(using).alive().values_list(
            "pk", "host", "pid", "threads", "heartbeat_at", "supervisor_id")),
        # A supervisor's worker processes right after it.
        key=lambda runner: (runner.supervisor or runner.pk, runner.supervisor is not None, runner.pk),
    )

    busiest = [
        BusyKey(*row)
        for row in (
            invocations.filter(created_at__gte=now - timedelta(minutes=THROUGHPUT_MINUTES))
            .annotate(raw_key=Coalesce("running_key", "registration_key"))
            .filter(raw_key__isnull=False)
            .order_by()
            .values_list("task_name", "raw_key")
            .annotate(
                total=Count("id"),
                waiting=Count("id", filter=Q(status__in=sorted(WAITING))),
                owned=Count("id", filter=Q(status__in=sorted(OWNED))),
                dropped=Count("id", filter=Q(status=Status.CONCURRENCY_CONTROLLED_FINAL)),
            )
            .order_by("-total", "task_name", "raw_key")[:10]
        )
    ]
    # A key's limit is the one its owners stored (``Invocation.running_limit``).
    at_limit = [
        KeyAtLimit(*row)
        for row in (
            invocations.owned().filter(running_key__isnull=False)
            .order_by()
            .values_list("task_name", "running_key")
            .annotate(in_use=Count("id"), limit=Max("running_limit"))
            .filter(in_use__gte=F("limit"))
            .order_by("task_name", "running_key")[:KEYS_AT_LIMIT]
        )
    ]
    return Dashboard(
        per_status=per_status,
        per_task=dict(sorted(per_task.items())),
        throughput=[(minute, finished.get(minute, 0)) for minute in minutes],
        runners=runners,
        busiest=busiest,
        oldest_waiting=_oldest_waiting(invocations),
        at_limit=at_limit,
    )


def waiting_since(invocations: QuerySet[Invocation]) -> datetime | None:
    """Return when the oldest waiting invocation was created, read through the status index.

    Asked for ``min(created_at)`` (or ordered by it), PostgreSQL walks the creation index from the oldest
    invocation, through every finished one, to the first that waits: a second on a million. The minimum of
    an expression it cannot take from that index makes it read the waiting rows instead.
    """
    found: datetime | None = invocations.filter(status__in=sorted(WAITING)).aggregate(
        oldest=Min(Coalesce("created_at", "registered_at")))["oldest"]
    return found


def _oldest_waiting(invocations: QuerySet[Invocation]) -> Invocation | None:
    """Return the waiting invocation created first: its time from the status index, then the row."""
    oldest = waiting_since(invocations)
    if oldest is None:
        return None
    return oldest_waiting_rows(invocations, oldest).first()


def oldest_waiting_rows(invocations: QuerySet[Invocation], oldest: datetime) -> QuerySet[Invocation]:
    """Return the waiting invocations created at or before ``oldest``, the oldest first (the one the tests EXPLAIN).

    At or before, not equal: SQLite's clock writes fewer decimals than a datetime parameter carries. Ordered by
    the expression, not the column, for the reason ``waiting_since()`` gives: by ``created_at``, PostgreSQL walked
    the creation index through every finished invocation (1.6 s on a million); so it reads the waiting rows.
    """
    return (invocations.filter(status__in=sorted(WAITING), created_at__lte=oldest)
            .order_by(Coalesce("created_at", "registered_at"), "pk"))


# -- the key view ------------------------------------------------------------------


@dataclass(frozen=True)
class RateWindow:
    """A rate-limited key's window as it is now: its limit, and the starts it counts."""

    #: As declared, e.g. "20/s".
    limit: str
    #: Starts the window counts now (at most the limit's count).
    starts: int
    count: int
    window: float


@dataclass(frozen=True)
class KeyHistory:
    """What ran, runs, waits and was dropped for one (task, key)."""

    running: list[Invocation]
    #: In the order in which the key will take them.
    waiting: list[Invocation]
    #: Succeeded, failed or cancelled, newest first, at most ``limit``.
    ran: list[Invocation]
    #: Dropped by concurrency control, newest first, at most ``limit``.
    dropped: list[Invocation]
    limit: int = KEY_HISTORY
    #: Waiting, not due yet (a full rate window, a debounce, a later run_after), by when they may start.
    deferred: list[Invocation] = field(default_factory=list)
    #: The key's rate window, if its task (as this process knows it) has a rate limit.
    rate: RateWindow | None = None
    #: An operator's hold on the key, if it has one (paused, an override, in force or ended).
    control: KeyControl | None = None
    #: What operators did to the key, newest first, at most ``limit``.
    actions: list[KeyAction] = field(default_factory=list)

    @property
    def running_limit(self) -> int | None:
        """How many of the key may run at once, as its next (else latest) invocation stored; None for no running key."""
        for invocation in (*self.waiting, *self.running, *self.ran, *self.dropped):
            if invocation.running_key is not None:
                return invocation.running_limit
        return None


def key_history(task_name: str, key: str, *, using: str | None = None) -> KeyHistory:
    """Return the history of one (task, key); ``key`` is the stored key, running or registration."""
    using = using or conf.DATABASE
    of_key = (
        Invocation.objects.using(using)
        .filter(task_name=task_name)
        .filter(Q(running_key=key) | Q(registration_key=key))
        .select_related("runner")
    )
    return KeyHistory(
        running=list(of_key.owned().order_by("pk")),
        waiting=list(of_key.waiting().order_by("-effective_priority", "pk")),
        ran=list(of_key.filter(status__in=[Status.SUCCESS, Status.FAILED, Status.CANCELLED])
                 .order_by("-pk")[:KEY_HISTORY]),
        dropped=list(of_key.filter(status=Status.CONCURRENCY_CONTROLLED_FINAL).order_by("-pk")[:KEY_HISTORY]),
        deferred=list(of_key.waiting().filter(run_after__gt=Now()).order_by("run_after", "pk")),
        rate=rate_window(task_name, key, using=using),
        control=KeyControl.objects.using(using).filter(task_name=task_name, running_key=key).first(),
        actions=list(KeyAction.objects.using(using).filter(task_name=task_name, running_key=key)[:KEY_HISTORY]),
    )


def rate_window(task_name: str, key: str, *, using: str) -> RateWindow | None:
    """Return the key's rate window now: the starts its tokens count within the last window."""
    try:
        rate = registry.get(task_name).policy.rate
    except LookupError:
        return None
    if rate is None:
        return None
    starts = RateToken.objects.using(using).filter(
        task_name=task_name, running_key=key, number__lt=rate.count,
        used_at__gt=Now() - timedelta(seconds=rate.window)).count()
    return RateWindow(str(rate), starts, rate.count, rate.window)


# -- the schedules page --------------------------------------------------------------

#: The most schedules the page lists (in the order they are due).
SCHEDULES_SHOWN = 500


def schedules(*, using: str | None = None) -> list[Schedule]:
    """Return the schedules, running ones by next run then paused and set-aside ones, with their last invocation."""
    return list(
        Schedule.objects.using(using or conf.DATABASE)
        .select_related("last_invocation")
        .order_by(F("next_run").asc(nulls_last=True), "name")[:SCHEDULES_SHOWN]
    )


def ticks(window: "Window", *, task: str = "", key: str = "", limit: int = MAX_EVENTS,
          using: str | None = None) -> list[tuple[Any, ...]]:
    """Return (invocation id, tick, task, running key, registration key) of the schedules' ticks in ``window``."""
    found = Invocation.objects.using(using or conf.DATABASE).filter(
        cause_tick__isnull=False, cause_tick__gte=window.start, cause_tick__lte=window.end)
    if task:
        found = found.filter(task_name=task)
    if key:
        found = found.filter(Q(running_key=key) | Q(registration_key=key))
    return list(found.order_by("-cause_tick").values_list(
        "pk", "cause_tick", "task_name", "running_key", "registration_key")[:limit])


# -- the Tasks and Keys pages: the rollup (``keyjobs.rollup``) over a window -------------------------------------

#: The columns of the rollup a window adds up.
ROLLED = (*COUNTERS, "runs", "duration_ms", "waits", "wait_ms", "wait_max_ms", *DURATION_BUCKETS, *WAIT_BUCKETS)
#: The windows the statistics pages offer, in minutes: the Tasks page reads a row per task and minute, the Keys page
#: a row per key and minute, so that it offers the shorter ones.
STATS_WINDOWS = (15, 60, 360, 1440, 7 * 1440)
KEY_WINDOWS = (15, 60)
#: The most points a chart draws: longer windows add minutes up into wider steps.
CHART_POINTS = 120
#: The keys the Keys page lists, busiest by wait first.
KEYS_SHOWN = 50


@dataclass(frozen=True)
class Stats:
    """Counters and histograms added up over a window (one task, one key, or one step of a chart)."""

    sums: dict[str, int]

    def __getattr__(self, name: str) -> int:
        try:
            return self.sums[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def finished(self) -> int:
        """Runs that ended, whatever their outcome, and invocations that ended without running."""
        return self.succeeded + self.failed + self.cancelled + self.dropped

    def rate(self, part: str, whole: int) -> float | None:
        return self.sums[part] / whole if whole else None

    @property
    def failure_rate(self) -> float | None:
        """Failed out of those that ended succeeded or failed."""
        return self.rate("failed", self.succeeded + self.failed)

    @property
    def retry_rate(self) -> float | None:
        """Attempts that failed and were retried, out of every start."""
        return self.rate("retried", self.started)

    @property
    def drop_rate(self) -> float | None:
        """Dropped by concurrency control (a collision) out of those enqueued."""
        return self.rate("dropped", self.enqueued)

    def duration(self, q: float) -> float | None:
        """The ``q`` quantile of the runs' durations, in ms, read from the histogram (bucket-linear)."""
        return quantile([self.sums[name] for name in DURATION_BUCKETS], q)

    def wait(self, q: float) -> float | None:
        """The ``q`` quantile of the waits from enqueue to first start, in ms."""
        return quantile([self.sums[name] for name in WAIT_BUCKETS], q)

    @property
    def mean_wait(self) -> float | None:
        return self.wait_ms / self.waits if self.waits else None


def quantile(counts: list[int], q: float) -> float | None:
    """Return the ``q`` quantile of a histogram over ``BUCKETS_MS``, interpolated within its bucket (as Prometheus'
    ``histogram_quantile``); None if it is empty. In the last, unbounded bucket: its lower bound."""
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            if index == len(BUCKETS_MS):
                return float(BUCKETS_MS[-1])
            low = 0.0 if index == 0 else float(BUCKETS_MS[index - 1])
            return low + (BUCKETS_MS[index] - low) * (rank - seen) / count
        seen += count
    return float(BUCKETS_MS[-1])


@dataclass(frozen=True)
class Point:
    """One step of a chart: its start, and the rollup added up over it; ``depth``, the waiting sampled last in it."""

    at: datetime
    stats: Stats
    depth: int | None


@dataclass(frozen=True)
class TaskStats:
    """The Tasks page: per task over the window, and per step of it for the charts."""

    window: int
    since: datetime
    #: Per task name, in name order.
    tasks: dict[str, Stats]
    #: Oldest first, of every task or of the one chosen.
    points: list[Point]
    step: int


def work_in_flight(*, using: str | None = None) -> bool:
    """Return whether anything waits or runs (through the status index): the statistics pages refresh meanwhile."""
    return Invocation.objects.using(using or conf.DATABASE).filter(status__in=sorted(WAITING | OWNED)).exists()


def _window_start(minutes: int, now: datetime) -> datetime:
    return (now - timedelta(minutes=minutes - 1)).replace(second=0, microsecond=0)


def _step(minutes: int) -> int:
    """Minutes per point of a chart of ``minutes``: at most ``CHART_POINTS`` points."""
    return max(1, -(-minutes // CHART_POINTS))


def task_stats(minutes: int, *, now: datetime, task: str = "", using: str | None = None) -> TaskStats:
    """Return what the Tasks page shows for the last ``minutes`` minutes: two queries, however many invocations."""
    using = using or conf.DATABASE
    since = _window_start(minutes, now)
    rows = TaskMinute.objects.using(using).filter(minute__gte=since)
    per_task = {
        row["task_name"]: _stats(row)
        for row in rows.order_by("task_name").values("task_name").annotate(**_sums())
    }
    if task:
        rows = rows.filter(task_name=task)
    step = _step(minutes)
    by_minute: dict[datetime, dict[str, int]] = {}
    depth: dict[datetime, int] = {}
    for row in rows.order_by("minute").values("minute").annotate(**_sums(), depth=Sum("waiting_now"),
                                                                 sampled=Count("waiting_now")):
        minute: datetime = row["minute"]
        at = since + timedelta(minutes=(minute - since) // timedelta(minutes=1) // step * step)
        into = by_minute.setdefault(at, dict.fromkeys(ROLLED, 0))
        for name, value in _stats(row).sums.items():
            into[name] = max(into[name], value) if name == "wait_max_ms" else into[name] + value
        if row["sampled"]:
            depth[at] = row["depth"] or 0  # the last sample of the step
    points = [Point(at, Stats(by_minute.get(at) or dict.fromkeys(ROLLED, 0)), depth.get(at))
              for at in (since + timedelta(minutes=step * n) for n in range(-(-minutes // step)))]
    return TaskStats(minutes, since, dict(sorted(per_task.items())), points, step)


@dataclass(frozen=True)
class KeyStats(OfKey):
    """A key's rollup over the window."""

    stats: Stats


def key_stats(minutes: int, *, now: datetime, task: str = "", limit: int = KEYS_SHOWN,
              using: str | None = None) -> list[KeyStats]:
    """Return the keys busiest by wait (the sum of their waits) over the last ``minutes`` minutes: one query."""
    rows = KeyMinute.objects.using(using or conf.DATABASE).filter(minute__gte=_window_start(minutes, now))
    if task:
        rows = rows.filter(task_name=task)
    found = []
    for row in (rows.values("task_name", "key").annotate(**_sums())
                .order_by("-wait_ms", "-enqueued", "task_name", "key")[:limit]):
        found.append(KeyStats(row["task_name"], row["key"], _stats(row)))
    return found


def _stats(row: Any) -> Stats:
    """Return the rollup's columns of a row of sums (None, for no rows, read as 0)."""
    return Stats({name: row[name] or 0 for name in ROLLED})


def _sums() -> dict[str, Any]:
    return {name: (Max(name) if name == "wait_max_ms" else Sum(name)) for name in ROLLED}


# -- an invocation's waits: what it waited for, how long, behind whom -------------------------------------------

#: A waiting status, and what waiting in it means.
WAITING_IN = {Status.REGISTERED: "queue", Status.REROUTED: "key busy", Status.RETRY: "retry delay",
              Status.PAUSED: "a child"}
#: How many of an invocation's parked stretches have their owner and waker looked up (two queries each).
WAITS_LOOKED_UP = 10


@dataclass
class Wait:
    """One stretch an invocation waited, and why: in the queue, behind its busy key, for its rate window, for a
    debounce or a requested delay, for its retry, or paused on a child."""

    why: str
    began: datetime
    ended: datetime | None = None
    #: The history rows that began and ended it.
    step: int | None = None
    ended_step: int | None = None
    #: Whom it waited behind: the key's owner when it parked, or the child its run waited for.
    behind: int | None = None
    #: The invocation whose end freed its key and woke it (or handed the key over), if any.
    freed_by: int | None = None
    handed: bool = False

    def length(self, now: datetime) -> timedelta:
        return (self.ended or now) - self.began


def waits(invocation: Invocation, events: list[Event], *, using: str | None = None) -> list[Wait]:
    """Return the stretches ``invocation`` waited, in order, from its history (``events``, in id order).

    A parked stretch names the key's owner it waited behind (the first other owner of its key to leave after it
    parked: with one slot, the owner then) and the invocation whose end woke it (the last other invocation of its
    key to leave before the wake-up, in the same transaction). Two queries per parked stretch, for at most
    ``WAITS_LOOKED_UP`` of them.
    """
    using = using or conf.DATABASE
    found: list[Wait] = []
    current: Wait | None = None
    if not events or events[0].kind != Event.Kind.TRANSITION or events[0].from_status:
        current = Wait("queue", invocation.created_at)
        if invocation.cause_tick is None and invocation.run_after and invocation.run_after > invocation.created_at:
            current.why = "a requested delay"
    for event in events:
        if event.kind == Event.Kind.DEFERRED and current is not None:
            current.why = "rate window"
        elif event.kind == Event.Kind.DEBOUNCED and current is not None:
            current.why = "debounce"
        if event.kind != Event.Kind.TRANSITION:
            continue
        if current is not None:
            current.ended, current.ended_step = event.at, event.pk
            current.handed = event.note == HANDED
            if current.ended > current.began or current.why != "queue":
                found.append(current)
            current = None
        why = WAITING_IN.get(Status(event.to_status)) if event.to_status in Status.values else None
        if why is not None:
            current = Wait(why, event.at, step=event.pk)
            if event.to_status == Status.PAUSED:
                child = re.search(r"#(\d+)", event.note)
                current.behind = int(child.group(1)) if child else None
    if current is not None:
        found.append(current)
    key = invocation.running_key
    if key is not None:
        of_key = Event.objects.using(using).filter(
            kind=Event.Kind.TRANSITION, invocation__task_name=invocation.task_name, invocation__running_key=key,
        ).exclude(invocation_id=invocation.pk)
        leaving = of_key.filter(Q(from_status__in=sorted(OWNED)) & ~Q(to_status__in=sorted(OWNED))
                                | Q(to_status=Status.CANCELLED))
        for wait in [wait for wait in found if wait.why == "key busy"][:WAITS_LOOKED_UP]:
            after = leaving.filter(pk__gt=wait.step)
            if wait.ended_step is not None:
                after = after.filter(pk__lt=wait.ended_step)
            wait.behind = after.order_by("pk").values_list("invocation_id", flat=True).first()
            if wait.ended_step is not None and wait.ended is not None:
                # The wake-up is written in the transaction that frees the key, right after its outcome.
                wait.freed_by = (leaving.filter(pk__lt=wait.ended_step, at__gte=wait.ended - timedelta(seconds=1))
                                 .order_by("-pk").values_list("invocation_id", flat=True).first())
    return found


# -- run logs ---------------------------------------------------------------------------------------------------

#: The most records the log explorer, and an invocation's page, show (newest first).
LOGS_SHOWN = 200


@dataclass(frozen=True)
class LogLine:
    """A stored run log record, with its invocation's task and key."""

    record: RunLog
    task_name: str
    raw_key: str | None


def run_logs(*, task: str = "", key: str = "", level: int = 0, since: datetime | None = None,
             until: datetime | None = None, text: str = "", using: str | None = None) -> list[LogLine]:
    """Return the newest stored run log records that match, with their invocation's task and keys: one query."""
    found = RunLog.objects.using(using or conf.DATABASE).select_related(None)
    if task:
        found = found.filter(invocation__task_name=task)
    if key:
        found = found.filter(Q(invocation__running_key=key) | Q(invocation__registration_key=key))
    if level:
        found = found.filter(level__gte=level)
    if since is not None:
        found = found.filter(at__gte=since)
    if until is not None:
        found = found.filter(at__lte=until)
    if text:
        found = found.filter(message__icontains=text)
    rows = found.annotate(task_name=F("invocation__task_name"),
                          raw_key=Coalesce("invocation__running_key", "invocation__registration_key"))
    return [LogLine(record, record.task_name, record.raw_key)
            for record in rows.order_by("-at", "-id")[:LOGS_SHOWN]]
