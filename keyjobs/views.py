"""The monitor: timeline, dashboard and key view, read from the invocations and their history.

Each page is a plain query over the append-only event history (indexed on
``at``) or over the status indexes of the invocations, bounded in time and in
rows. The views are mounted by ``InvocationAdmin.get_urls()`` inside
``admin_site.admin_view``, so that the admin's login and staff checks apply,
and each one also requires the view permission of invocations.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from django.core.exceptions import PermissionDenied
from django.db import connections
from django.db.models import Count, Q, QuerySet
from django.db.models.functions import Coalesce, TruncMinute
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest, JsonResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from django.utils.html import format_html
from django.utils.safestring import SafeString

from .concurrency import key_label
from .conf import conf
from .models import Event, Invocation, Runner
from .status import FINAL, OWNED, WAITING, Status

if TYPE_CHECKING:
    from .admin import InvocationAdmin

#: The timeline reads at most this many events; a busier window is cut to its most recent part, and says so.
MAX_EVENTS = 40_000
#: The window choices of the timeline, in minutes.
WINDOW_CHOICES = (5, 15, 60, 240, 1440)
DEFAULT_MINUTES = 15
#: The longest window the timeline accepts, in minutes (a week).
MAX_MINUTES = 7 * 24 * 60
#: Minutes of throughput on the dashboard.
THROUGHPUT_MINUTES = 15

#: One colour per status: the admin's badges and the timeline's bars share them.
STATUS_COLOURS: dict[str, str] = {
    Status.REGISTERED: "#6c757d",
    Status.REROUTED: "#d39e00",
    Status.PENDING: "#5bc0de",
    Status.RUNNING: "#1f6feb",
    Status.SUCCESS: "#2e8540",
    Status.FAILED: "#c9302c",
    Status.RETRY: "#e8710a",
    Status.CONCURRENCY_CONTROLLED_FINAL: "#7b3fa0",
}
#: The colours of the timeline's markers: a parked, a dropped and a deduplicated invocation.
MARKER_COLOURS = {
    "rerouted": STATUS_COLOURS[Status.REROUTED],
    "dropped": STATUS_COLOURS[Status.CONCURRENCY_CONTROLLED_FINAL],
    "reused": "#0b7285",
}


def alive_cutoff(now: datetime | None = None) -> datetime:
    """Return the oldest heartbeat of a runner that still counts as alive: one lease ago (``KEYJOBS_LEASE``)."""
    return (now or timezone.now()) - timedelta(seconds=conf.LEASE)


def runner_is_alive(runner: Runner, now: datetime | None = None) -> bool:
    """Return whether ``runner`` has not stopped and its heartbeat is recent."""
    return runner.stopped_at is None and runner.heartbeat_at >= alive_cutoff(now)


def label_of(key: str) -> str:
    """Return the label of a stored key, or ``key`` itself if it is not one (typed by hand)."""
    try:
        return key_label(key)
    except (ValueError, AttributeError):
        return key


def runner_label(host: str, pid: int) -> str:
    return f"{host}:{pid}"


def short_task(task_name: str) -> str:
    """Return the last part of a dotted task name: ``call_keyed`` for ``demo_project.tasks.call_keyed``."""
    return task_name.rpartition(".")[2]


def status_badge(status: str) -> SafeString:
    """Return the status as a coloured badge."""
    return format_html(
        '<span class="kj-badge" style="background:{}">{}</span>',
        STATUS_COLOURS.get(status, "#444"), Status(status).label if status in Status.values else status,
    )


def format_duration(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"


def key_url(task_name: str, raw_key: str, site_name: str = "admin") -> str:
    """Return the URL of the key view of (task, stored key)."""
    return f"{reverse(f'{site_name}:keyjobs_invocation_key')}?{urlencode({'task': task_name, 'key': raw_key})}"


def epoch_ms(moment: datetime | None) -> int | None:
    return None if moment is None else round(moment.timestamp() * 1000)


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
        return cls(now - timedelta(minutes=minutes), now, minutes)

    def as_query(self) -> dict[str, str]:
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


def timeline_events(window: Window, *, task: str = "", key: str = "", using: str | None = None) -> QuerySet[Any]:
    """Return the rows of the events the timeline draws in ``window``, newest first (the index on ``at``)."""
    events = Event.objects.using(using or conf.DATABASE).filter(at__gte=window.start, at__lte=window.end).filter(
        Q(kind=Event.Kind.TRANSITION)
        & (
            Q(to_status=Status.RUNNING)
            | Q(from_status=Status.RUNNING)
            | Q(to_status__in=[Status.REROUTED, Status.CONCURRENCY_CONTROLLED_FINAL])
        )
        | Q(kind=Event.Kind.REUSED)
    )
    if task:
        events = events.filter(invocation__task_name=task)
    if key:
        events = events.filter(Q(invocation__running_key=key) | Q(invocation__registration_key=key))
    # Newest first, so that a cut keeps the end of the window, where the eye is.
    return events.order_by("-at").values_list(
        "id", "invocation_id", "kind", "from_status", "to_status", "at", "runner_id", "runner_thread",
        "invocation__task_name", "invocation__running_key", "invocation__registration_key",
    )


def timeline_data(
    window: Window,
    *,
    now: datetime,
    task: str = "",
    key: str = "",
    limit: int = MAX_EVENTS,
    using: str | None = None,
) -> dict[str, Any]:
    """Return the runs, markers and lanes of ``window``, optionally of one task and key; times in epoch ms.

    A run is a RUNNING event paired with the next status change of its
    invocation, whose ``to_status`` colours the bar; a run with no end yet is
    running. Markers are the parked (REROUTED), dropped
    (CONCURRENCY_CONTROLLED_FINAL) and deduplicated (REUSED) moments. Runs
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

    runs: list[dict[str, Any]] = []
    markers: list[dict[str, Any]] = []
    open_runs: dict[int, dict[str, Any]] = {}
    clipped: list[dict[str, Any]] = []
    # Lanes are numbered as they are first met, and sorted at the end.
    thread_index: dict[tuple[int | None, int | None], int] = {}
    key_index: dict[tuple[str, str | None], int] = {}
    task_first_seen: dict[str, int] = {}

    def key_lane(task_name: str, raw_key: str | None, at: int) -> int:
        task_first_seen.setdefault(task_name, at)
        return key_index.setdefault((task_name, raw_key), len(key_index))

    running, reused, rerouted = Status.RUNNING, Event.Kind.REUSED, Status.REROUTED
    database_zone = connections[using].timezone
    for (_, pk, kind, from_status, to_status, at, runner_id, thread,
         task_name, running_key, registration_key) in rows:
        if at.tzinfo is None:
            # What Django's converter would do: the database stores its own time zone's wall clock.
            at = at.replace(tzinfo=database_zone)
        moment = round(at.timestamp() * 1000)
        lane_key = (task_name, running_key or registration_key)
        lane = key_index.get(lane_key)
        if lane is None:
            lane = key_lane(task_name, lane_key[1], moment)
        if kind == reused or (to_status != running and from_status != running):
            markers.append({
                "id": pk, "at": moment, "key_lane": lane,
                "kind": "reused" if kind == reused else "rerouted" if to_status == rerouted else "dropped",
            })
            continue
        if to_status == running:
            open_runs[pk] = {"id": pk, "start": moment, "end": None, "status": running,
                             "thread_lane": thread_index.setdefault((runner_id, thread), len(thread_index)),
                             "key_lane": lane}
            continue
        run = open_runs.pop(pk, None)
        if run is None:
            # Started before the window: its start is read below.
            run = {"id": pk, "start": None, "thread_lane": thread_index.setdefault((runner_id, thread),
                                                                                    len(thread_index)),
                   "key_lane": lane}
            clipped.append(run)
        run["end"], run["status"] = moment, to_status
        runs.append(run)

    if clipped:
        started = dict(invocations.filter(pk__in=[run["id"] for run in clipped]).values_list("pk", "started_at"))
        for run in clipped:
            began = started.get(run["id"])
            run["start"] = epoch_ms(began) if began is not None and epoch_ms(began) <= run["end"] else None
    if open_runs and not window.follows_now:
        # Runs that started in a past window and ended after it.
        for pk, at, to_status in (
            Event.objects.using(using)
            .filter(invocation_id__in=list(open_runs), kind=Event.Kind.TRANSITION, from_status=Status.RUNNING,
                    at__gt=window.end)
            .order_by("at")
            .values_list("invocation_id", "at", "to_status")
        ):
            run = open_runs.pop(pk, None)
            if run is not None:
                run["end"], run["status"] = epoch_ms(at), to_status
                runs.append(run)
    runs.extend(open_runs.values())
    if window.end >= now - timedelta(seconds=1):
        # Runs still going that began before the window: no event of theirs falls in it.
        seen = {run["id"] for run in runs}
        for pk, task_name, running_key, registration_key, started_at, runner_id, thread in (
            invocations.filter(status=Status.RUNNING, started_at__lt=window.start)
            .values_list("pk", "task_name", "running_key", "registration_key", "started_at", "runner_id",
                         "runner_thread")
        ):
            if pk not in seen:
                runs.append({
                    "id": pk, "start": epoch_ms(started_at), "end": None, "status": Status.RUNNING.value,
                    "thread_lane": thread_index.setdefault((runner_id, thread), len(thread_index)),
                    "key_lane": key_lane(task_name, running_key or registration_key, epoch_ms(started_at) or 0),
                })

    runner_ids = {runner_id for runner_id, _ in thread_index if runner_id is not None}
    runners = dict(
        (pk, runner_label(host, pid))
        for pk, host, pid in Runner.objects.using(using).filter(pk__in=runner_ids).values_list("pk", "host", "pid")
    ) if runner_ids else {}
    thread_lanes = [
        {"id": f"{runner_id}/{thread}",
         "label": "no runner" if runner_id is None else f"{runners.get(runner_id, runner_id)} · thread {thread}",
         "runner": runner_id, "thread": thread}
        for runner_id, thread in thread_index
    ]
    key_lanes = []
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
    active = invocations.filter(status__in=sorted(WAITING | OWNED)).exists()
    return {
        "now": epoch_ms(now),
        "start": epoch_ms(window.start),
        "end": epoch_ms(window.end),
        "follows_now": window.follows_now,
        "runs": runs,
        "markers": markers,
        "lanes": {"thread": thread_order, "key": key_order},
        "truncated": truncated,
        "limit": limit,
        "active": active,
    }


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


def _reorder(items: list[dict[str, Any]], field: str, lanes: list[dict[str, Any]],
             order: Callable[[dict[str, Any]], Any]) -> list[dict[str, Any]]:
    """Sort ``lanes`` by ``order`` and renumber the lane index ``field`` of ``items`` to match."""
    ranked = sorted(range(len(lanes)), key=lambda number: order(lanes[number]))
    renumber = {old: new for new, old in enumerate(ranked)}
    for item in items:
        item[field] = renumber[item[field]]
    return [lanes[number] for number in ranked]


# -- the dashboard ----------------------------------------------------------------


def dashboard_data(*, now: datetime, using: str | None = None) -> dict[str, Any]:
    """Return counts per status and per task, recent throughput, live runners, busy keys and the oldest waiter."""
    using = using or conf.DATABASE
    invocations = Invocation.objects.using(using)
    per_status = {status: 0 for status in Status.values}
    per_task: dict[str, dict[str, int]] = {}
    for task_name, status, count in (
        invocations.order_by().values_list("task_name", "status").annotate(count=Count("id"))
    ):
        per_status[status] = per_status.get(status, 0) + count
        per_task.setdefault(task_name, dict.fromkeys(Status.values, 0))[status] = count

    since = (now - timedelta(minutes=THROUGHPUT_MINUTES - 1)).replace(second=0, microsecond=0)
    finished = {
        minute: count
        for minute, count in invocations.filter(status__in=sorted(FINAL), finished_at__gte=since)
        .annotate(minute=TruncMinute("finished_at"))
        .order_by()
        .values_list("minute")
        .annotate(count=Count("id"))
        .values_list("minute", "count")
    }
    throughput = [
        {"minute": minute, "count": finished.get(minute, 0)}
        for minute in (since + timedelta(minutes=n) for n in range(THROUGHPUT_MINUTES))
    ]
    peak = max((point["count"] for point in throughput), default=0)
    for number, point in enumerate(throughput):
        # Geometry of the dashboard's little bar chart: 20 units per minute, 64 high.
        point["height"] = round(64 * point["count"] / peak) if peak else 0
        point["x"], point["y"], point["label_x"] = 20 * number + 2, 66 - point["height"], 20 * number + 10

    cutoff = alive_cutoff(now)
    runners = list(Runner.objects.using(using).active().filter(heartbeat_at__gte=cutoff).order_by("pk"))
    # Counted from the status index, not through each runner's whole history.
    owned = dict(
        invocations.owned().order_by().values_list("runner_id").annotate(count=Count("id")).values_list(
            "runner_id", "count")
    )
    for runner in runners:
        runner.running = owned.get(runner.pk, 0)  # type: ignore[attr-defined]

    busiest = [
        {
            "task": task_name, "short_task": short_task(task_name), "raw_key": raw_key, "key": key_label(raw_key),
            "total": total, "waiting": waiting, "owned": taken, "dropped": dropped,
        }
        for task_name, raw_key, total, waiting, taken, dropped in (
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
    oldest_waiting = invocations.waiting().order_by("created_at", "pk").first()
    return {
        "per_status": [
            {"status": status, "label": label, "count": per_status.get(status, 0), "colour": STATUS_COLOURS[status]}
            for status, label in Status.choices
        ],
        "per_task": [
            {"task": task_name, "counts": [counts[status] for status in Status.values], "total": sum(counts.values())}
            for task_name, counts in sorted(per_task.items())
        ],
        "throughput": throughput,
        "throughput_peak": peak,
        "throughput_width": 20 * THROUGHPUT_MINUTES,
        "runners": runners,
        "busiest": busiest,
        "oldest_waiting": oldest_waiting,
        "oldest_badge": status_badge(oldest_waiting.status) if oldest_waiting else "",
        "active": per_status[Status.RUNNING] + per_status[Status.PENDING]
        + sum(per_status[status] for status in WAITING) > 0,
    }


# -- the key view ------------------------------------------------------------------

#: How many finished and dropped invocations the key view lists, newest first.
KEY_HISTORY = 200


def key_data(task_name: str, key: str, *, using: str | None = None) -> dict[str, Any]:
    """Return what ran, runs, waits and was dropped for one (task, key); ``key`` is the stored key."""
    using = using or conf.DATABASE
    of_key = (
        Invocation.objects.using(using)
        .filter(task_name=task_name)
        .filter(Q(running_key=key) | Q(registration_key=key))
        .select_related("runner")
    )
    return {
        "running": list(of_key.owned().order_by("pk")),
        # The order in which the key will take them.
        "waiting": list(of_key.waiting().order_by("-priority", "pk")),
        "ran": list(of_key.filter(status__in=[Status.SUCCESS, Status.FAILED]).order_by("-pk")[:KEY_HISTORY]),
        "dropped": list(of_key.filter(status=Status.CONCURRENCY_CONTROLLED_FINAL).order_by("-pk")[:KEY_HISTORY]),
        "limit": KEY_HISTORY,
    }


# -- the HTTP side -----------------------------------------------------------------


class MonitorViews:
    """The custom pages of ``InvocationAdmin``: URLs, permission checks and rendering."""

    def __init__(self, model_admin: "InvocationAdmin") -> None:
        self.model_admin = model_admin
        self.admin_site = model_admin.admin_site

    def urls(self) -> list[URLPattern]:
        opts = self.model_admin.model._meta
        prefix = f"{opts.app_label}_{opts.model_name}"
        return [
            path("timeline/", self._guard(self.timeline), name=f"{prefix}_timeline"),
            path("timeline/data/", self._guard(self.timeline_json), name=f"{prefix}_timeline_data"),
            path("dashboard/", self._guard(self.dashboard), name=f"{prefix}_dashboard"),
            path("key/", self._guard(self.key), name=f"{prefix}_key"),
        ]

    def _guard(self, view: Callable[[HttpRequest], HttpResponse]) -> Callable[[HttpRequest], HttpResponse]:
        def guarded(request: HttpRequest) -> HttpResponse:
            if not self.model_admin.has_view_permission(request):
                raise PermissionDenied
            return view(request)

        # admin_view: anonymous users go to the login page, users who are not staff are refused.
        return self.admin_site.admin_view(guarded)

    def _context(self, request: HttpRequest, title: str, **extra: Any) -> dict[str, Any]:
        return {
            **self.admin_site.each_context(request),
            "opts": self.model_admin.model._meta,
            "title": title,
            "links": monitor_links(self.admin_site.name),
            **extra,
        }

    def _filters(self, request: HttpRequest) -> tuple[str, str]:
        return request.GET.get("task", "").strip(), request.GET.get("key", "").strip()

    def timeline(self, request: HttpRequest) -> HttpResponse:
        now = timezone.now()
        task, key = self._filters(request)
        error = ""
        try:
            window = Window.from_query(request.GET, now)
        except ValueError as exc:
            error = str(exc)
            window = Window(now - timedelta(minutes=DEFAULT_MINUTES), now, DEFAULT_MINUTES)
        data = timeline_data(window, now=now, task=task, key=key)
        lanes = request.GET.get("lanes", "thread")
        config = {
            "dataUrl": reverse(f"{self.admin_site.name}:keyjobs_invocation_timeline_data"),
            "changeUrl": reverse(f"{self.admin_site.name}:keyjobs_invocation_change", args=["__id__"]),
            "keyUrl": reverse(f"{self.admin_site.name}:keyjobs_invocation_key"),
            "query": {**window.as_query(), **({"task": task} if task else {}), **({"key": key} if key else {})},
            "lanes": lanes if lanes in ("thread", "key") else "thread",
            "statusColours": STATUS_COLOURS,
            "statusLabels": dict(Status.choices),
            "markerColours": MARKER_COLOURS,
            "refreshMs": 2000,
        }
        context = self._context(
            request, "Timeline",
            data=data, config=config, error=error, window=window, task=task, key=key,
            key_label=label_of(key),
            minutes_choices=WINDOW_CHOICES,
            from_value=("" if window.follows_now else timezone.localtime(window.start).strftime("%Y-%m-%dT%H:%M")),
            to_value=("" if window.follows_now else timezone.localtime(window.end).strftime("%Y-%m-%dT%H:%M")),
            status_legend=[(label, STATUS_COLOURS[status]) for status, label in Status.choices
                           if status in (Status.SUCCESS, Status.FAILED, Status.RETRY, Status.RUNNING,
                                         Status.REGISTERED)],
            marker_legend=[("parked (rerouted)", MARKER_COLOURS["rerouted"], "▼"),
                           ("dropped", MARKER_COLOURS["dropped"], "✕"),
                           ("deduplicated (reused)", MARKER_COLOURS["reused"], "◆")],
        )
        return TemplateResponse(request, "keyjobs/timeline.html", context)

    def timeline_json(self, request: HttpRequest) -> HttpResponse:
        now = timezone.now()
        try:
            window = Window.from_query(request.GET, now)
        except ValueError as exc:
            return HttpResponseBadRequest(str(exc), content_type="text/plain")
        task, key = self._filters(request)
        return JsonResponse(timeline_data(window, now=now, task=task, key=key))

    def dashboard(self, request: HttpRequest) -> HttpResponse:
        now = timezone.now()
        data = dashboard_data(now=now)
        key_url = reverse(f"{self.admin_site.name}:keyjobs_invocation_key")
        for item in data["busiest"]:
            item["url"] = f"{key_url}?{urlencode({'task': item['task'], 'key': item['raw_key']})}"
        context = self._context(
            request, "Dashboard", data=data, statuses=Status.choices, throughput_minutes=THROUGHPUT_MINUTES,
            now=now,
        )
        return TemplateResponse(request, "keyjobs/dashboard.html", context)

    def key(self, request: HttpRequest) -> HttpResponse:
        task, key = self._filters(request)
        if not task or not key:
            return HttpResponseBadRequest("Name a task and a key: ?task=...&key=...", content_type="text/plain")
        data = key_data(task, key)
        change_url = f"{self.admin_site.name}:keyjobs_invocation_change"
        for name in ("running", "waiting", "ran", "dropped"):
            data[name] = [invocation_row(invocation, reverse(change_url, args=[invocation.pk]))
                          for invocation in data[name]]
        timeline_url = reverse(f"{self.admin_site.name}:keyjobs_invocation_timeline")
        context = self._context(
            request, f"{short_task(task)} · {label_of(key)}",
            data=data, task=task, key=key,
            timeline_url=f"{timeline_url}?{urlencode({'task': task, 'key': key, 'lanes': 'key', 'minutes': 60})}",
            active=bool(data["running"] or data["waiting"]),
        )
        return TemplateResponse(request, "keyjobs/key.html", context)


def invocation_row(invocation: Invocation, url: str) -> dict[str, Any]:
    """Return what the key view shows of an invocation."""
    arguments = ", ".join(
        [json.dumps(value, ensure_ascii=False) for value in invocation.args]
        + [f"{name}={json.dumps(value, ensure_ascii=False)}" for name, value in invocation.kwargs.items()]
    )
    if invocation.started_at and invocation.finished_at:
        duration = format_duration(invocation.finished_at - invocation.started_at)
    else:
        duration = "–"
    return {
        "id": invocation.pk, "url": url, "badge": status_badge(invocation.status), "arguments": arguments,
        "created_at": invocation.created_at, "started_at": invocation.started_at,
        "finished_at": invocation.finished_at, "duration": duration,
        "runner": (f"{invocation.runner.host}:{invocation.runner.pid} · thread {invocation.runner_thread}"
                   if invocation.runner else "–"),
        "error": invocation.error,
    }


def monitor_links(site_name: str = "admin") -> list[tuple[str, str]]:
    """Return the (title, url) of each monitor page, for the admin's index and the pages' navigation."""
    return [
        ("Dashboard", reverse(f"{site_name}:keyjobs_invocation_dashboard")),
        ("Timeline", reverse(f"{site_name}:keyjobs_invocation_timeline")),
        ("Invocations", reverse(f"{site_name}:keyjobs_invocation_changelist")),
        ("Runners", reverse(f"{site_name}:keyjobs_runner_changelist")),
    ]
