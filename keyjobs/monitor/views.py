"""The monitor's HTTP side: URLs, permission checks, rendering and the timeline's JSON.

The views are mounted by ``InvocationAdmin.get_urls()`` inside
``admin_site.admin_view``, so that the admin's login and staff checks apply,
and each one also requires the view permission of invocations. What a page
shows comes from ``queries``; how a value reads, from ``display``.
"""

from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest, JsonResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone

from ..status import Status
from . import queries
from .display import (
    MARKER_COLOURS,
    STATUS_COLOURS,
    invocation_row,
    invocation_url,
    key_url,
    label_of,
    monitor_links,
    runs_of_schedule_url,
    schedule_rule,
    short_task,
    slots_in_use,
    status_badge,
    throughput_bars,
)
from .queries import DEFAULT_MINUTES, THROUGHPUT_MINUTES, Window

if TYPE_CHECKING:
    from ..admin import InvocationAdmin

#: The window choices of the timeline, in minutes.
WINDOW_CHOICES = (5, 15, 60, 240, 1440)
#: How often the timeline asks for new data while work is active.
REFRESH_MS = 2000


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
            path("schedules/", self._guard(self.schedules), name=f"{prefix}_schedules"),
        ]

    def _guard(self, view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
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
            window = Window.last(DEFAULT_MINUTES, now)
        lanes = request.GET.get("lanes", "thread")
        config = {
            "dataUrl": self._url("timeline_data"),
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
            from_value=("" if window.follows_now else timezone.localtime(window.start).strftime("%Y-%m-%dT%H:%M")),
            to_value=("" if window.follows_now else timezone.localtime(window.end).strftime("%Y-%m-%dT%H:%M")),
            status_legend=[(label, STATUS_COLOURS[status]) for status, label in Status.choices
                           if status in (Status.SUCCESS, Status.FAILED, Status.RETRY, Status.RUNNING,
                                         Status.PAUSED, Status.REGISTERED, Status.CANCELLED)],
            marker_legend=[("parked (rerouted)", MARKER_COLOURS["rerouted"], "▼"),
                           ("dropped", MARKER_COLOURS["dropped"], "✕"),
                           ("deduplicated (reused)", MARKER_COLOURS["reused"], "◆"),
                           ("debounced (merged)", MARKER_COLOURS["debounced"], "◆"),
                           ("cancelled", MARKER_COLOURS["cancelled"], "■"),
                           ("a schedule's tick", MARKER_COLOURS["tick"], "▲")],
        )
        return TemplateResponse(request, "keyjobs/timeline.html", context)

    def timeline_json(self, request: HttpRequest) -> HttpResponse:
        now = timezone.now()
        try:
            window = Window.from_query(request.GET, now)
        except ValueError as exc:
            return HttpResponseBadRequest(str(exc), content_type="text/plain")
        task, key = self._filters(request)
        return JsonResponse(queries.timeline(window, now=now, task=task, key=key))

    def dashboard(self, request: HttpRequest) -> HttpResponse:
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
        )
        return TemplateResponse(request, "keyjobs/key.html", context)

    def schedules(self, request: HttpRequest) -> HttpResponse:
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
