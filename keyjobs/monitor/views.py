"""The monitor's HTTP side: URLs, permission checks, rendering and the timeline's JSON.

The views are mounted by ``InvocationAdmin.get_urls()`` inside
``admin_site.admin_view``, so that the admin's login and staff checks apply,
and each one also requires the view permission of invocations. What a page
shows comes from ``queries``; how a value reads, from ``display``.
"""

import functools
import logging
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import django
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest, JsonResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from .. import registry
from ..status import Status
from . import queries
from .display import (
    MARKER_COLOURS,
    STATUS_COLOURS,
    call_of,
    chart,
    durations,
    format_ms,
    format_rate,
    invocation_row,
    invocation_url,
    key_url,
    label_of,
    moment,
    monitor_links,
    runs_of_schedule_url,
    schedule_rule,
    short_task,
    slots_in_use,
    status_badge,
    throughput_bars,
)
from .queries import DEFAULT_MINUTES, KEY_WINDOWS, STATS_WINDOWS, THROUGHPUT_MINUTES, Stats, Window

if TYPE_CHECKING:
    from django.contrib.admin import ModelAdmin

    from ..models import Invocation

#: The window choices of the timeline, in minutes.
WINDOW_CHOICES = (5, 15, 60, 240, 1440)
#: How often the timeline asks for new data while work is active.
REFRESH_MS = 2000
#: The admin's breadcrumb bar: a list (``<ol class="breadcrumbs">``) from Django 6.1, a ``<div>`` before it;
#: the admin's stylesheet styles only the markup of its own version.
BREADCRUMBS_AS_LIST = django.VERSION >= (6, 1)


class MonitorViews:
    """The custom pages of the invocations' admin: URLs, permission checks and rendering.

    It takes any ``ModelAdmin`` of ``Invocation`` (the admin mounts it in its
    ``get_urls()``), so that the monitor depends on Django's admin, not on
    keyjobs' own.
    """

    def __init__(self, model_admin: "ModelAdmin[Invocation]") -> None:
        self.model_admin = model_admin
        self.admin_site = model_admin.admin_site

    def urls(self) -> list[URLPattern]:
        opts = self.model_admin.model._meta
        prefix = f"{opts.app_label}_{opts.model_name}"
        return [
            path("timeline/", self._guard(self.timeline), name=f"{prefix}_timeline"),
            path("timeline/data/", self._guard(self.timeline_json), name=f"{prefix}_timeline_data"),
            path("timeline/detail/", self._guard(self.timeline_detail), name=f"{prefix}_timeline_detail"),
            path("dashboard/", self._guard(self.dashboard), name=f"{prefix}_dashboard"),
            path("key/", self._guard(self.key), name=f"{prefix}_key"),
            path("schedules/", self._guard(self.schedules), name=f"{prefix}_schedules"),
            path("tasks/", self._guard(self.tasks), name=f"{prefix}_tasks"),
            path("keys/", self._guard(self.keys), name=f"{prefix}_keys"),
            path("logs/", self._guard(self.logs), name=f"{prefix}_logs"),
        ]

    def _guard(self, view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @functools.wraps(view)
        def guarded(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if not self.model_admin.has_view_permission(request):
                raise PermissionDenied
            return view(request, *args, **kwargs)

        # admin_view: anonymous users go to the login page, users who are not staff are refused.
        return self.admin_site.admin_view(guarded)

    def _url(self, name: str, *args: Any) -> str:
        return reverse(f"{self.admin_site.name}:keyjobs_invocation_{name}", args=args)

    def _context(self, request: HttpRequest, title: str, **extra: Any) -> dict[str, Any]:
        return {
            **self.admin_site.each_context(request),
            "opts": self.model_admin.model._meta,
            "title": title,
            "breadcrumbs_as_list": BREADCRUMBS_AS_LIST,
            "links": monitor_links(self.admin_site.name),
            **extra,
        }

    def _filters(self, request: HttpRequest) -> tuple[str, str]:
        return request.GET.get("task", "").strip(), request.GET.get("key", "").strip()

    def timeline(self, request: HttpRequest) -> HttpResponse:
        """The timeline: one bar per run, in lanes per runner thread or per task and key (``?task=``, ``?key=``)."""
        now = timezone.now()
        task, key = self._filters(request)
        error = ""
        try:
            window = Window.from_query(request.GET, now)
        except ValueError as exc:
            error = str(exc)
            window = Window.last(DEFAULT_MINUTES, now)
        lanes = request.GET.get("lanes", "thread")
        config = {
            "dataUrl": self._url("timeline_data"),
            "detailUrl": self._url("timeline_detail"),
            "runBudget": queries.RUN_BUDGET,
            "changeUrl": self._url("change", "__id__"),
            "keyUrl": self._url("key"),
            "query": {**window.as_query(), **({"task": task} if task else {}), **({"key": key} if key else {})},
            "lanes": lanes if lanes in ("thread", "key") else "thread",
            "statusColours": STATUS_COLOURS,
            "statusLabels": dict(Status.choices),
            "markerColours": MARKER_COLOURS,
            "refreshMs": REFRESH_MS,
        }
        context = self._context(
            request, "Timeline",
            data=queries.timeline(window, now=now, task=task, key=key), config=config, error=error, window=window,
            task=task, key=key, key_label=label_of(key),
            minutes_choices=WINDOW_CHOICES,
            # To the second: a range of a few seconds must not read as one minute to itself.
            from_value=("" if window.follows_now else timezone.localtime(window.start).strftime("%Y-%m-%dT%H:%M:%S")),
            to_value=("" if window.follows_now else timezone.localtime(window.end).strftime("%Y-%m-%dT%H:%M:%S")),
            status_legend=[(label, STATUS_COLOURS[status]) for status, label in Status.choices
                           if status in (Status.SUCCESS, Status.FAILED, Status.RETRY, Status.RUNNING,
                                         Status.PAUSED, Status.REGISTERED, Status.CANCELLED)],
            marker_legend=[("parked (rerouted)", MARKER_COLOURS["rerouted"], "▼"),
                           ("dropped", MARKER_COLOURS["dropped"], "✕"),
                           ("deduplicated (reused)", MARKER_COLOURS["reused"], "◆"),
                           ("debounced (merged)", MARKER_COLOURS["debounced"], "◆"),
                           ("cancelled before it ran", MARKER_COLOURS["cancelled"], "■"),
                           ("a schedule's tick", MARKER_COLOURS["tick"], "▲")],
        )
        return TemplateResponse(request, "keyjobs/timeline.html", context)

    def timeline_json(self, request: HttpRequest) -> HttpResponse:
        """The timeline's data for a window of time, as JSON: its runs, markers and lanes."""
        now = timezone.now()
        try:
            window = Window.from_query(request.GET, now)
        except ValueError as exc:
            return HttpResponseBadRequest(str(exc), content_type="text/plain")
        task, key = self._filters(request)
        # Compact: a busy window's counts are tens of thousands of short lists.
        return JsonResponse(queries.timeline(window, now=now, task=task, key=key),
                            json_dumps_params={"separators": (",", ":")})

    def timeline_detail(self, request: HttpRequest) -> HttpResponse:
        """The tooltip's details of one invocation: its call, arguments and all, and how long it waited."""
        pk = request.GET.get("id", "")
        invocation = queries.detail(int(pk)) if pk.isdigit() else None
        if invocation is None:
            return HttpResponseBadRequest("Name an invocation: ?id=...", content_type="text/plain")
        times = durations(invocation, timezone.now())
        return JsonResponse({"id": invocation.pk, "call": call_of(invocation, limit=120), "key": invocation.key,
                             "queued": times["queued"], "ran": times["ran"], "created": moment(invocation.created_at)})

    def dashboard(self, request: HttpRequest) -> HttpResponse:
        """The dashboard: counts per status and task, throughput, live runners, the busiest keys and those at their limit."""
        now = timezone.now()
        data = queries.dashboard(now=now)
        bars = throughput_bars(data.throughput)
        context = self._context(
            request, "Dashboard",
            data=data,
            per_status=[
                {"label": label, "count": data.per_status[status], "colour": STATUS_COLOURS[status]}
                for status, label in Status.choices
            ],
            per_task=[
                {"task": task_name, "counts": [counts[status] for status in Status.values],
                 "total": sum(counts.values())}
                for task_name, counts in data.per_task.items()
            ],
            throughput=bars,
            throughput_peak=max((bar["count"] for bar in bars), default=0),
            throughput_width=20 * THROUGHPUT_MINUTES,
            busiest=[
                {"task": busy.task, "short_task": short_task(busy.task), "key": busy.key,
                 "url": key_url(busy.task, busy.raw_key, self.admin_site.name), "total": busy.total,
                 "waiting": busy.waiting, "owned": busy.owned, "dropped": busy.dropped}
                for busy in data.busiest
            ],
            at_limit=[
                {"task": full.task, "short_task": short_task(full.task), "key": full.key,
                 "url": key_url(full.task, full.raw_key, self.admin_site.name),
                 "slots": slots_in_use(full.in_use, full.limit)}
                for full in data.at_limit
            ],
            oldest_badge=status_badge(data.oldest_waiting.status) if data.oldest_waiting else "",
            statuses=Status.choices, throughput_minutes=THROUGHPUT_MINUTES, now=now,
        )
        return TemplateResponse(request, "keyjobs/dashboard.html", context)

    def key(self, request: HttpRequest) -> HttpResponse:
        """One task's key (``?task=...&key=...``): its slots in use, what ran, runs, waits in order, and was dropped."""
        task, key = self._filters(request)
        if not task or not key:
            return HttpResponseBadRequest("Name a task and a key: ?task=...&key=...", content_type="text/plain")
        history = queries.key_history(task, key)

        def rows(invocations: list[Any]) -> list[dict[str, Any]]:
            return [invocation_row(invocation, self._url("change", invocation.pk)) for invocation in invocations]

        timeline_query = urlencode({"task": task, "key": key, "lanes": "key", "minutes": 60})
        context = self._context(
            request, f"{short_task(task)} · {label_of(key)}",
            running=rows(history.running), waiting=rows(history.waiting), ran=rows(history.ran),
            dropped=rows(history.dropped), limit=history.limit, task=task, key=key,
            deferred=[{**invocation_row(invocation, self._url("change", invocation.pk)),
                       "run_after": invocation.run_after} for invocation in history.deferred],
            rate=history.rate,
            slots=(slots_in_use(len(history.running), history.running_limit)
                   if history.running_limit is not None else ""),
            timeline_url=f"{self._url('timeline')}?{timeline_query}",
            active=bool(history.running or history.waiting),
            control=history.control, actions=history.actions,
            # Holding a key changes its invocations: the permission Retry and Cancel ask for.
            can_change=self.model_admin.has_change_permission(request), act_url=self._url("key_act"),
            now=timezone.now(),
        )
        return TemplateResponse(request, "keyjobs/key.html", context)

    def schedules(self, request: HttpRequest) -> HttpResponse:
        """Every schedule: its rule in words, next and last run, its last invocation, and whether it runs."""
        site = self.admin_site.name
        rows = [
            {"schedule": schedule, "rule": schedule_rule(schedule), "detail": schedule.cron or "",
             "url": reverse(f"{site}:keyjobs_schedule_change", args=[schedule.pk]),
             "runs_url": runs_of_schedule_url(schedule.pk, site),
             "last": schedule.last_invocation,
             "last_badge": status_badge(schedule.last_invocation.status) if schedule.last_invocation else "",
             "last_url": invocation_url(schedule.last_invocation.pk, site) if schedule.last_invocation else "",
             "toggle_url": reverse(f"{site}:keyjobs_schedule_toggle", args=[schedule.pk])}
            for schedule in queries.schedules()
        ]
        context = self._context(
            request, "Schedules", rows=rows, limit=queries.SCHEDULES_SHOWN, now=timezone.now(),
            can_change=request.user.has_perm("keyjobs.change_schedule"),
        )
        return TemplateResponse(request, "keyjobs/schedules.html", context)

    # -- the statistics pages: the rollup over a window ------------------------------------------------------

    def logs(self, request: HttpRequest) -> HttpResponse:
        """The log explorer: what tasks logged as they ran, filtered by task, key, level, time and text."""
        return logs_view(self, request)

    def _stats_window(self, request: HttpRequest, choices: tuple[int, ...] = STATS_WINDOWS) -> int:
        try:
            minutes = int(request.GET.get("minutes", 60))
        except ValueError:
            minutes = 60
        return minutes if minutes in choices else 60

    def _stats_context(self, request: HttpRequest, minutes: int, task: str,
                       choices: tuple[int, ...] = STATS_WINDOWS) -> dict[str, Any]:
        def window_url(choice: int) -> str:
            return "?" + urlencode({"minutes": choice, **({"task": task} if task else {})})

        return {
            "minutes": minutes, "task": task,
            "windows": [{"minutes": choice, "label": window_label(choice), "url": window_url(choice),
                         "current": choice == minutes} for choice in choices],
        }

    def tasks(self, request: HttpRequest) -> HttpResponse:
        """Per task over a window (``?minutes=``): throughput, duration and wait quantiles, failure and retry rates,
        merged, dropped, cancelled and parked counts, with charts; from the rollup."""
        minutes, task = self._stats_window(request), request.GET.get("task", "").strip()
        data = queries.task_stats(minutes, now=timezone.now(), task=task)
        rows = [{"task": name, "short_task": short_task(name), **stats_row(stats, minutes),
                 "url": f"?{urlencode({'minutes': minutes, 'task': name})}",
                 "list_url": f"{self._url('changelist')}?{urlencode({'task': name})}"}
                for name, stats in data.tasks.items()]
        context = self._context(
            request, "Tasks", rows=rows, **self._stats_context(request, minutes, task), step=data.step,
            ended=chart([(point.at, float(point.stats.finished)) for point in data.points]),
            waited=chart([(point.at, point.stats.wait(0.95)) for point in data.points], unit="ms", bars=False),
            took=chart([(point.at, point.stats.duration(0.95)) for point in data.points], unit="ms", bars=False),
            depth=chart([(point.at, None if point.depth is None else float(point.depth)) for point in data.points]),
            keys_url=f"{self._url('keys')}?{urlencode({'minutes': minutes, **({'task': task} if task else {})})}",
            active=queries.work_in_flight(),  # refreshed while anything waits or runs, as the other pages
        )
        return TemplateResponse(request, "keyjobs/tasks.html", context)

    def keys(self, request: HttpRequest) -> HttpResponse:
        """The keys whose work waited longest over a window (``?minutes=``), with drops, merges, parks and deferrals."""
        minutes, task = self._stats_window(request, KEY_WINDOWS), request.GET.get("task", "").strip()
        site = self.admin_site.name
        rows = [{"task": busy.task, "short_task": short_task(busy.task), "key": busy.key,
                 "url": key_url(busy.task, busy.raw_key, site), **stats_row(busy.stats, minutes)}
                for busy in queries.key_stats(minutes, now=timezone.now(), task=task)]
        context = self._context(request, "Keys", rows=rows, limit=queries.KEYS_SHOWN, active=queries.work_in_flight(),
                                **self._stats_context(request, minutes, task, KEY_WINDOWS))
        return TemplateResponse(request, "keyjobs/keys.html", context)


def window_label(minutes: int) -> str:
    """Return a window as a person names it: ``15 minutes``, ``1 hour``, ``7 days``."""
    if minutes < 60:
        return f"{minutes} minutes"
    if minutes < 1440:
        return f"{minutes // 60} hour{'s' if minutes >= 120 else ''}"
    return f"{minutes // 1440} day{'s' if minutes >= 2880 else ''}"


def stats_row(stats: Stats, minutes: int) -> dict[str, Any]:
    """Return a task's or a key's line of a statistics page."""
    return {
        "stats": stats, "per_minute": f"{stats.finished / minutes:.2f}",
        "duration": [format_ms(stats.duration(q)) for q in (0.5, 0.95, 0.99)],
        "wait": [format_ms(stats.wait(q)) for q in (0.5, 0.95, 0.99)],
        "wait_mean": format_ms(stats.mean_wait), "wait_max": format_ms(stats.wait_max_ms if stats.waits else None),
        "failure_rate": format_rate(stats.failure_rate), "retry_rate": format_rate(stats.retry_rate),
        "drop_rate": format_rate(stats.drop_rate),
    }


LEVELS = [(0, "any level"), (logging.DEBUG, "debug"), (logging.INFO, "info"), (logging.WARNING, "warning"),
          (logging.ERROR, "error"), (logging.CRITICAL, "critical")]


def _moment_of(text: str) -> datetime | None:
    """Return a datetime-local input's value as an aware time of the site's zone, or None."""
    if not text:
        return None
    moment = parse_datetime(text)
    if moment is None:
        raise ValueError(f"not a date and time: {text!r}")
    return timezone.make_aware(moment) if timezone.is_naive(moment) else moment


def logs_view(views: MonitorViews, request: HttpRequest) -> HttpResponse:
    task, key = request.GET.get("task", "").strip(), request.GET.get("key", "").strip()
    text = request.GET.get("q", "").strip()
    level = request.GET.get("level", "0")
    error = ""
    try:
        since, until = _moment_of(request.GET.get("from", "").strip()), _moment_of(request.GET.get("to", "").strip())
    except ValueError as exc:
        since = until = None
        error = str(exc)
    site = views.admin_site.name
    records = queries.run_logs(task=task, key=key, level=int(level) if level.isdigit() else 0, since=since,
                               until=until, text=text)
    rows = [{"record": line.record, "at": moment(line.record.at),
             "level": logging.getLevelName(line.record.level).lower(),
             "url": invocation_url(line.record.invocation_id, site), "short_task": short_task(line.task_name),
             "task": line.task_name, "key": label_of(line.raw_key) if line.raw_key else "",
             "key_url": key_url(line.task_name, line.raw_key, site) if line.raw_key else ""}
            for line in records]
    context = views._context(
        request, "Logs", rows=rows, limit=queries.LOGS_SHOWN, levels=LEVELS, level=int(level) if level.isdigit() else 0,
        task=task, key=key, q=text, error=error, tasks=sorted(registry.all_tasks()),
        from_value=request.GET.get("from", ""), to_value=request.GET.get("to", ""),
    )
    return TemplateResponse(request, "keyjobs/logs.html", context)
