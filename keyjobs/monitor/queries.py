"""What the monitor's pages read: one function per page, each returning a named result.

Each page is a plain query over the append-only event history (indexed on
``at``) or over the status indexes of the invocations, bounded in time and in
rows; tests pin how many queries each one takes. Whether a runner is alive is
``RunnerQuerySet``'s to say, on the database's clock.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypedDict, TypeVar

from django.db import connections
from django.db.models import Count, F, Max, Q, QuerySet
from django.db.models.functions import Coalesce, Now, TruncMinute
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from .. import registry
from ..concurrency import key_label
from ..conf import conf
from ..models import Event, Invocation, RateToken, Runner, Schedule
from ..status import OWNED, WAITING, Status
from .display import epoch_ms, runner_label, short_task

#: The timeline reads at most this many events; a busier window is cut to its most recent part, and says so.
MAX_EVENTS = 40_000
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


def timeline_events(window: Window, *, task: str = "", key: str = "", using: str | None = None) -> QuerySet[Any]:
    """Return the rows of the events the timeline draws in ``window``, newest first (the index on ``at``)."""
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
        "invocation__task_name", "invocation__running_key", "invocation__registration_key", "invocation__parent_id",
    )


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
    rows = _fetch(timeline_events(window, task=task, key=key, using=using)[: limit + 1], using)
    truncated = len(rows) > limit
    if truncated:
        rows.pop()
    rows.reverse()

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
    for (_, pk, kind, from_status, to_status, at, runner_id, thread,
         task_name, running_key, registration_key, parent) in rows:
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
    key_lanes: list[KeyLane] = []
    for task_name, raw_key in key_index:
        label = key_label(raw_key)
        key_lanes.append({"id": f"{task_name}\n{raw_key or ''}", "task": task_name, "key": label,
                          "raw_key": raw_key or "", "label": f"{short_task(task_name)} · {label or 'no key'}"})
    # Lanes in a stable order: threads by runner; keys grouped by task, the task seen first on top.
    thread_order = _reorder(runs, "thread_lane", thread_lanes,
                            lambda lane: (lane["runner"] or 0, -1 if lane["thread"] is None else lane["thread"]))
    key_order = _reorder([*runs, *markers], "key_lane", key_lanes,
                         lambda lane: (task_first_seen[lane["task"]], lane["task"], lane["raw_key"] == "",
                                       lane["key"]))
    return {
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
    }


Lane = TypeVar("Lane", ThreadLane, KeyLane)


def _fetch(queryset: QuerySet[Any], using: str) -> list[tuple[Any, ...]]:
    """Return the rows of a ``values_list()`` queryset as the database driver hands them over.

    The timeline's event query returns tens of thousands of rows; on SQLite,
    Django's per-value converters cost more than running the query, so that
    one query is read from a cursor and its one datetime column made aware by
    the caller.
    """
    sql, params = queryset.query.sql_with_params()
    with connections[using].cursor() as cursor:
        cursor.execute(sql, params)
        rows: list[tuple[Any, ...]] = cursor.fetchall()
    return rows


def _reorder(items: list[Any], field: str, lanes: list[Lane], order: Callable[[Lane], Any]) -> list[Lane]:
    """Sort ``lanes`` by ``order`` and renumber the lane index ``field`` of ``items`` to match."""
    ranked = sorted(range(len(lanes)), key=lambda number: order(lanes[number]))
    renumber = {old: new for new, old in enumerate(ranked)}
    for item in items:
        item[field] = renumber[item[field]]
    return [lanes[number] for number in ranked]


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
class BusyKey:
    """How many invocations of one (task, key) were created lately, and where they stand."""

    task: str
    raw_key: str
    total: int
    waiting: int
    owned: int
    dropped: int

    @property
    def key(self) -> str:
        return key_label(self.raw_key)


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


@dataclass(frozen=True)
class Dashboard:
    """Counts per status and per task, recent throughput, live runners, busy keys and the oldest waiter."""

    #: Every status, in the lifecycle's order, with its count.
    per_status: dict[str, int]
    #: Per task name, in name order: every status with its count.
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
    for task_name, status, count in (
        invocations.order_by().values_list("task_name", "status").annotate(count=Count("id"))
    ):
        per_status[status] = per_status.get(status, 0) + count
        per_task.setdefault(task_name, dict.fromkeys(Status.values, 0))[status] = count

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
        oldest_waiting=invocations.waiting().order_by("created_at", "pk").first(),
        at_limit=at_limit,
    )


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
        waiting=list(of_key.waiting().order_by("-priority", "pk")),
        ran=list(of_key.filter(status__in=[Status.SUCCESS, Status.FAILED, Status.CANCELLED])
                 .order_by("-pk")[:KEY_HISTORY]),
        dropped=list(of_key.filter(status=Status.CONCURRENCY_CONTROLLED_FINAL).order_by("-pk")[:KEY_HISTORY]),
        deferred=list(of_key.waiting().filter(run_after__gt=Now()).order_by("run_after", "pk")),
        rate=rate_window(task_name, key, using=using),
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
