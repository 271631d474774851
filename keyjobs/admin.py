"""The admin of invocations and runners, and the entry to the monitor (``keyjobs.monitor``).

Nothing here writes a status: an invocation is never saved from a form,
because ``save()`` writes every column and would overwrite a status the
worker changed meanwhile. Changes go through the retry and cancel actions,
which use ``keyjobs.control`` and so the same checked transitions as the
worker.
"""

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Prefetch, Q, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe
from django.views.decorators.http import require_POST

from . import control, registry, schedules
from .conf import conf
from .exceptions import KeyjobsError
from .models import Event, Invocation, Runner, RunnerQuerySet, Schedule
from .monitor.display import (
    cause_of,
    format_duration,
    invocation_url,
    key_url,
    monitor_links,
    runner_badge,
    runner_label,
    runs_of_schedule_url,
    schedule_rule,
    short_task,
    status_badge,
)
from .monitor.views import MonitorViews
from .status import Status
from .timers import Timer, TimerError

if TYPE_CHECKING:
    # The admin's classes are generic to the type checker only (django-stubs), not at run time.
    InvocationModelAdmin = admin.ModelAdmin[Invocation]
    RunnerModelAdmin = admin.ModelAdmin[Runner]
    ScheduleModelAdmin = admin.ModelAdmin[Schedule]
    EventTabularInline = admin.TabularInline[Event, Invocation]
    ScheduleModelForm = forms.ModelForm[Schedule]
else:
    InvocationModelAdmin = RunnerModelAdmin = ScheduleModelAdmin = admin.ModelAdmin
    ScheduleModelForm = forms.ModelForm
    EventTabularInline = admin.TabularInline

#: How many of the newest invocations the task and queue filters look at for names the registry lacks.
RECENT_NAMES = 1000
#: How many runners the runner filter offers, newest first.
RECENT_RUNNERS = 20
#: How many of an invocation's children (or of those waiting for it) its page links to.
CHILDREN_SHOWN = 20


def pretty_json(value: Any) -> SafeString:
    return format_html('<pre class="kj-pre">{}</pre>', json.dumps(value, indent=2, ensure_ascii=False, default=str))


def _recent(request: HttpRequest) -> list[tuple[str, str]]:
    """Return the (task, queue) of the newest invocations, once per request; an indexed, bounded read."""
    if not hasattr(request, "_keyjobs_recent"):
        request._keyjobs_recent = list(  # type: ignore[attr-defined]
            Invocation.objects.using(conf.DATABASE).order_by("-pk").values_list("task_name", "queue")[:RECENT_NAMES]
        )
    return request._keyjobs_recent  # type: ignore[attr-defined,no-any-return]


class TaskFilter(admin.SimpleListFilter):
    # Not a SELECT DISTINCT over the whole table: the registry, plus what the newest invocations name.
    title = "task"
    parameter_name = "task"

    def lookups(self, request: HttpRequest, model_admin: "admin.ModelAdmin[Any]") -> list[tuple[str, str]]:
        names = set(registry.all_tasks()) | {task_name for task_name, _ in _recent(request)}
        if value := self.value():
            names.add(value)
        return [(name, name) for name in sorted(names)]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Invocation]) -> QuerySet[Invocation]:
        return queryset.filter(task_name=self.value()) if self.value() else queryset


class QueueFilter(admin.SimpleListFilter):
    title = "queue"
    parameter_name = "queue"

    def lookups(self, request: HttpRequest, model_admin: "admin.ModelAdmin[Any]") -> list[tuple[str, str]]:
        names = {task.queue for task in registry.all_tasks().values()} | {queue for _, queue in _recent(request)}
        if value := self.value():
            names.add(value)
        return [(name, name) for name in sorted(names)]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Invocation]) -> QuerySet[Invocation]:
        return queryset.filter(queue=self.value()) if self.value() else queryset


class RunnerFilter(admin.SimpleListFilter):
    # Runners pile up (one per worker start): offer the newest ones, not all of them.
    title = "runner"
    parameter_name = "runner"

    def lookups(self, request: HttpRequest, model_admin: "admin.ModelAdmin[Any]") -> list[tuple[str, str]]:
        return [
            (str(runner.pk), str(runner))
            for runner in Runner.objects.using(conf.DATABASE).order_by("-pk")[:RECENT_RUNNERS]
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Invocation]) -> QuerySet[Invocation]:
        value = self.value()
        if value and value.isdigit():
            return queryset.filter(runner_id=int(value))
        return queryset


class EventInline(EventTabularInline):
    model = Event
    verbose_name = "status change"
    verbose_name_plural = "history"
    fields = ("at", "kind", "from_status", "to_status", "runner", "runner_thread", "note")
    readonly_fields = fields
    extra = 0
    can_delete = False
    ordering = ("pk",)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Event]:
        return super().get_queryset(request).select_related("runner")

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # The history is part of the invocation: whoever may see the one sees the other.
        return bool(self.admin_site._registry[self.parent_model].has_view_permission(request, obj))

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Invocation)
class InvocationAdmin(InvocationModelAdmin):
    list_display = ("id", "task_name", "key_link", "status_display", "runner_display", "created_at", "started_at",
                    "finished_at", "duration")
    list_display_links = ("id", "task_name")
    list_filter = ("status", TaskFilter, QueueFilter, RunnerFilter, ("created_at", admin.DateFieldListFilter))
    list_select_related = ("runner",)
    search_fields = ("running_key", "registration_key", "args", "kwargs")
    search_help_text = "Search by key, by id (#123) or by argument text."
    ordering = ("-pk",)
    show_full_result_count = False
    # Facet counts would scan the whole table once per filter choice.
    show_facets = admin.ShowFacets.NEVER
    # Rendering, not the database, is what a longer page costs: about 2 ms a row.
    list_per_page = 50
    actions = ("retry", "cancel")
    inlines = (EventInline,)
    fieldsets = (
        (None, {"fields": ("task_name", "status_display", "key_link", "queue", "priority", "runner_display",
                           "attempts")}),
        ("Times", {"fields": ("created_at", "run_after", "started_at", "finished_at", "duration")}),
        ("Arguments", {"fields": ("args_display", "kwargs_display")}),
        ("Outcome", {"fields": ("result_display", "error_display", "traceback_display")}),
        ("Keys", {"fields": ("running_key", "registration_key", "slot"), "classes": ("collapse",)}),
        ("Cause", {"fields": ("cause_display", "triggered_display")}),
        ("Waits", {"fields": ("parent_link", "waiting_on_link", "children_links", "waited_on_by_links")}),
    )

    class Media:
        css = {"all": ("keyjobs/monitor.css",)}

    # -- permissions: read-only, changed by actions only --------------------

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Invocation | None = None) -> bool:
        # The model-level change permission allows the actions; no invocation is ever saved from its form.
        return obj is None and super().has_change_permission(request)

    def has_delete_permission(self, request: HttpRequest, obj: Invocation | None = None) -> bool:
        return False

    def get_queryset(self, request: HttpRequest) -> QuerySet[Invocation]:
        return super().get_queryset(request).select_related("runner", "cause_schedule", "parent", "waiting_on")

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Invocation], search_term: str
    ) -> tuple[QuerySet[Invocation], bool]:
        term = search_term.strip().removeprefix("#")
        if term.isdigit():
            # An id is looked up alone: an index hit, not a scan of every argument.
            return queryset.filter(pk=int(term)), False
        return super().get_search_results(request, queryset, search_term)

    # -- columns and fields -------------------------------------------------

    @admin.display(description="status", ordering="status")
    def status_display(self, obj: Invocation) -> SafeString:
        return status_badge(obj.status)

    @admin.display(description="key")
    def key_link(self, obj: Invocation) -> SafeString | str:
        raw_key = obj.running_key or obj.registration_key
        if raw_key is None:
            return "–"
        return format_html('<a href="{}">{}</a>', key_url(obj.task_name, raw_key, self.admin_site.name), obj.key)

    @admin.display(description="runner", ordering="runner")
    def runner_display(self, obj: Invocation) -> str:
        if obj.runner is None:
            return "–"
        thread = "" if obj.runner_thread is None else f" · thread {obj.runner_thread}"
        return f"{runner_label(obj.runner.host, obj.runner.pid)}{thread}"

    @admin.display(description="duration")
    def duration(self, obj: Invocation) -> str:
        if obj.started_at is None:
            return "–"
        if obj.finished_at is None:
            running = obj.status in (Status.RUNNING, Status.PAUSED)
            return f"{format_duration(timezone.now() - obj.started_at)} so far" if running else "–"
        return format_duration(obj.finished_at - obj.started_at)

    def _link(self, invocation: Invocation) -> SafeString:
        url = reverse(f"{self.admin_site.name}:keyjobs_invocation_change", args=[invocation.pk])
        return format_html('<a href="{}">#{} {}</a> {}', url, invocation.pk, short_task(invocation.task_name),
                           status_badge(invocation.status))

    def _links(self, invocations: list[Invocation]) -> SafeString | str:
        if not invocations:
            return "–"
        links = format_html_join(mark_safe("<br>"), "{}", ((self._link(one),) for one in invocations[:CHILDREN_SHOWN]))
        if len(invocations) > CHILDREN_SHOWN:
            return format_html("{}<br>(the first {})", links, CHILDREN_SHOWN)
        return links

    @staticmethod
    def _related(obj: Invocation) -> list[Invocation]:
        """Return the invocations ``obj``'s run delayed and those waiting for it, in one query, once a page."""
        related: list[Invocation] | None = getattr(obj, "_kj_related", None)
        if related is None:
            related = list(
                Invocation.objects.using(obj._state.db).filter(Q(parent=obj) | Q(waiting_on=obj))
                .only("pk", "task_name", "status", "parent_id", "waiting_on_id").order_by("pk")[:2 * CHILDREN_SHOWN + 2]
            )
            obj._kj_related = related  # type: ignore[attr-defined]
        return related

    @admin.display(description="delayed by")
    def parent_link(self, obj: Invocation) -> SafeString | str:
        return self._link(obj.parent) if obj.parent is not None else "–"

    @admin.display(description="paused, waiting for")
    def waiting_on_link(self, obj: Invocation) -> SafeString | str:
        return self._link(obj.waiting_on) if obj.waiting_on is not None else "–"

    @admin.display(description="delayed by its run")
    def children_links(self, obj: Invocation) -> SafeString | str:
        return self._links([one for one in self._related(obj) if one.parent_id == obj.pk])

    @admin.display(description="waited for by")
    def waited_on_by_links(self, obj: Invocation) -> SafeString | str:
        return self._links([one for one in self._related(obj) if one.waiting_on_id == obj.pk])

    @admin.display(description="args")
    def args_display(self, obj: Invocation) -> SafeString:
        return pretty_json(obj.args)

    @admin.display(description="kwargs")
    def kwargs_display(self, obj: Invocation) -> SafeString:
        return pretty_json(obj.kwargs)

    @admin.display(description="result")
    def result_display(self, obj: Invocation) -> SafeString | str:
        return pretty_json(obj.return_value) if obj.status == Status.SUCCESS else "–"

    @admin.display(description="error")
    def error_display(self, obj: Invocation) -> SafeString | str:
        return format_html('<pre class="kj-pre kj-error">{}</pre>', obj.error) if obj.error else "–"

    @admin.display(description="traceback")
    def traceback_display(self, obj: Invocation) -> SafeString | str:
        return format_html('<pre class="kj-pre">{}</pre>', obj.traceback) if obj.traceback else "–"

    @admin.display(description="created by")
    def cause_display(self, obj: Invocation) -> SafeString | str:
        return cause_of(obj, self.admin_site.name)

    @admin.display(description="triggered")
    def triggered_display(self, obj: Invocation) -> SafeString | str:
        triggered = list(obj.triggered.order_by("pk").values_list("pk", "task_name", "cause_status")[:50])
        if not triggered:
            return "–"
        return format_html_join(", ", '<a href="{}">#{} {}</a> (on {})', (
            (invocation_url(pk, self.admin_site.name), pk, short_task(task_name), status)
            for pk, task_name, status in triggered
        ))

    # -- actions --------------------------------------------------------------

    @admin.action(description="Retry the selected failed or dropped invocations", permissions=["change"])
    def retry(self, request: HttpRequest, queryset: QuerySet[Invocation]) -> None:
        moved = control.retry(list(queryset.select_related(None).only("pk")), by=request.user.get_username(),
                              using=conf.DATABASE)
        self._report(request, "Registered again", moved, queryset, "failed or dropped")

    @admin.action(description="Cancel the selected invocations (waiting ones end, running ones are asked to stop)",
                  permissions=["change"])
    def cancel(self, request: HttpRequest, queryset: QuerySet[Invocation]) -> None:
        moved = control.cancel(list(queryset.select_related(None).only("pk")), by=request.user.get_username(),
                               using=conf.DATABASE)
        self._report(request, "Cancelled", moved, queryset, "waiting or running")

    def _report(self, request: HttpRequest, verb: str, moved: list[int], queryset: QuerySet[Invocation] | None,
                expected: str, selected: int | None = None) -> None:
        if selected is None:
            assert queryset is not None
            selected = queryset.count()
        if moved:
            self.message_user(request, f"{verb} {len(moved)} invocation(s): {', '.join(f'#{pk}' for pk in moved[:20])}"
                              f"{'…' if len(moved) > 20 else ''}.", messages.SUCCESS)
        if selected > len(moved):
            self.message_user(request, f"{selected - len(moved)} invocation(s) left alone: not {expected}.",
                              messages.WARNING)

    # -- the monitor's URLs and the detail page's buttons ------------------------

    def get_urls(self) -> list[URLPattern]:
        opts = self.model._meta
        prefix = f"{opts.app_label}_{opts.model_name}"
        return [
            *MonitorViews(self).urls(),
            # admin_view adds the CSRF check; require_POST refuses a GET.
            path("<path:object_id>/retry/", self.admin_site.admin_view(require_POST(self.retry_one)),
                 name=f"{prefix}_retry"),
            path("<path:object_id>/cancel/", self.admin_site.admin_view(require_POST(self.cancel_one)),
                 name=f"{prefix}_cancel"),
            *super().get_urls(),
        ]

    def retry_one(self, request: HttpRequest, object_id: str) -> HttpResponse:
        return self._act_on_one(request, object_id, control.retry, "Registered again", "failed or dropped")

    def cancel_one(self, request: HttpRequest, object_id: str) -> HttpResponse:
        return self._act_on_one(request, object_id, control.cancel, "Cancelled", "waiting or running")

    def _act_on_one(self, request: HttpRequest, object_id: str, act: Callable[..., list[int]], verb: str,
                    expected: str) -> HttpResponse:
        if not self.has_change_permission(request):
            raise PermissionDenied
        invocation = get_object_or_404(self.get_queryset(request), pk=object_id if object_id.isdigit() else None)
        moved = act([invocation], by=request.user.get_username(), using=conf.DATABASE)
        self._report(request, verb, moved, None, expected, selected=1)
        return HttpResponseRedirect(
            reverse(f"{self.admin_site.name}:keyjobs_invocation_change", args=[invocation.pk])
        )

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        return super().changelist_view(
            request,
            {"title": "Invocations", **(extra_context or {}), "monitor_links": monitor_links(self.admin_site.name)},
        )

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "",
                    extra_context: dict[str, Any] | None = None) -> HttpResponse:
        extra = {
            **(extra_context or {}),
            "can_act": super().has_change_permission(request),
            "retryable": sorted(control.RETRYABLE),
            "cancellable": sorted(control.CANCELLABLE | control.STOPPABLE),
        }
        return super().change_view(request, object_id, form_url, extra)


class RunnerStateFilter(admin.SimpleListFilter):
    # The state is the database's annotation (RunnerQuerySet.with_state), on the database's clock.
    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: "admin.ModelAdmin[Any]") -> list[tuple[str, str]]:
        return [(Runner.State.ALIVE, "alive"), (Runner.State.GONE, "gone (no recent heartbeat)"),
                (Runner.State.STOPPED, "stopped"), (Runner.State.LOST, "lost (declared dead)")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Runner]) -> QuerySet[Runner]:
        if self.value() in Runner.State.values:
            return queryset.filter(state=self.value())  # type: ignore[misc]  # the annotation of with_state()
        return queryset


@admin.register(Runner)
class RunnerAdmin(RunnerModelAdmin):
    list_display = ("id", "host", "pid", "threads", "queues_display", "supervisor_display", "started_at",
                    "heartbeat_at", "state_display", "running_now")
    list_filter = (RunnerStateFilter, "host")
    list_select_related = ("supervisor",)
    ordering = ("-pk",)
    show_full_result_count = False
    fields = ("host", "pid", "threads", "queues_display", "supervisor_display", "worker_processes", "started_at",
              "heartbeat_at", "stopped_at", "stop_reason", "lost", "state_display", "running_now")
    readonly_fields = fields

    class Media:
        css = {"all": ("keyjobs/monitor.css",)}

    def get_queryset(self, request: HttpRequest) -> QuerySet[Runner]:
        owned = Invocation.objects.owned().order_by("runner_thread", "pk").only(
            "pk", "task_name", "running_key", "registration_key", "status", "runner_id", "runner_thread"
        )
        runners: RunnerQuerySet = super().get_queryset(request)  # type: ignore[assignment]
        return runners.with_state().prefetch_related(Prefetch("invocations", owned, to_attr="owned_now"))

    def get_fields(self, request: HttpRequest, obj: Runner | None = None) -> tuple[str, ...]:
        # Most runners stop because they were asked to: a reason is shown only when there is one; the
        # pool's links only for runworker --processes.
        shown = {"stop_reason": obj is not None and bool(obj.stop_reason),
                 "supervisor_display": obj is not None and obj.supervisor_id is not None,
                 "worker_processes": obj is not None and obj.threads == 0}
        return tuple(name for name in self.fields if shown.get(name, True))

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Runner | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Runner | None = None) -> bool:
        return False

    @admin.display(description="queues")
    def queues_display(self, obj: Runner) -> str:
        return obj.queues or "every queue"

    @admin.display(description="supervisor", ordering="supervisor")
    def supervisor_display(self, obj: Runner) -> SafeString | str:
        if obj.supervisor is None:
            return "–"
        return format_html('<a href="{}">{}</a>', reverse(f"{self.admin_site.name}:keyjobs_runner_change",
                                                          args=[obj.supervisor.pk]), obj.supervisor)

    @admin.display(description="worker processes")
    def worker_processes(self, obj: Runner) -> SafeString | str:
        children = obj.children.order_by("pk")
        if not children:
            return "–"
        return format_html_join(
            mark_safe("<br>"), '<a href="{}">{}</a> {}',
            ((reverse(f"{self.admin_site.name}:keyjobs_runner_change", args=[child.pk]), child,
              "stopped" if child.stopped_at else "running") for child in children),
        )

    @admin.display(description="state", ordering="state")
    def state_display(self, obj: Runner) -> SafeString:
        return runner_badge(obj.state, obj.heartbeat_at, obj.stop_reason)  # type: ignore[attr-defined]

    @admin.display(description="running now")
    def running_now(self, obj: Runner) -> SafeString | str:
        owned: list[Invocation] = getattr(obj, "owned_now", [])
        if not owned:
            return "–"
        return format_html_join(
            mark_safe("<br>"),
            '<a href="{}">#{} {}({})</a> {} thread {}',
            (
                (reverse(f"{self.admin_site.name}:keyjobs_invocation_change", args=[inv.pk]), inv.pk,
                 short_task(inv.task_name), inv.key, status_badge(inv.status), inv.runner_thread)
                for inv in owned
            ),
        )



class ScheduleForm(ScheduleModelForm):
    """A schedule of the admin: the rule checked by cronsim, the task found, the arguments fitting its function."""

    class Meta:
        model = Schedule
        fields = ("name", "task_name", "kwargs", "cron", "interval", "catch_up", "enabled")

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        cron, interval = (data.get("cron") or "").strip(), data.get("interval")
        data["cron"] = cron
        try:
            Timer(cron=cron, interval=interval)
        except TimerError as exc:
            self.add_error("cron" if cron or interval is None else "interval", str(exc))
        task_name = data.get("task_name")
        if task_name:
            try:
                spec = registry.get(task_name)
            except KeyjobsError as exc:
                self.add_error("task_name", str(exc))
                return data
            kwargs = data.get("kwargs")
            if not isinstance(kwargs, dict):
                self.add_error("kwargs", "The arguments must be a JSON object of keyword arguments.")
            else:
                try:
                    spec.signature.bind(**kwargs)
                except TypeError as exc:
                    self.add_error("kwargs", f"{task_name} cannot be called with these arguments: {exc}")
        return data


@admin.register(Schedule)
class ScheduleAdmin(ScheduleModelAdmin):
    form = ScheduleForm
    list_display = ("name", "rule", "enabled", "next_run", "last_run", "last_status", "origin", "runs_link")
    list_filter = ("enabled", "origin")
    list_select_related = ("last_invocation",)
    search_fields = ("name", "task_name")
    ordering = ("name",)
    actions = ("pause", "resume")
    readonly_fields = ("rule", "origin", "next_run", "last_run", "last_status", "problem", "runs_link")

    class Media:
        css = {"all": ("keyjobs/monitor.css",)}

    def get_fields(self, request: HttpRequest, obj: Schedule | None = None) -> list[str]:  # type: ignore[override]
        fields = ["name", "task_name", "kwargs", "cron", "rule", "interval", "catch_up", "enabled"]
        return fields + ([] if obj is None else ["origin", "next_run", "last_run", "last_status", "problem",
                                                 "runs_link"])

    def get_readonly_fields(self, request: HttpRequest, obj: Schedule | None = None) -> list[str]:
        if obj is not None and obj.is_declared:
            # Declared in code: the code is its source; only its pause is the admin's.
            return [field for field in self.get_fields(request, obj) if field != "enabled"]
        return list(self.readonly_fields)

    def has_delete_permission(self, request: HttpRequest, obj: Schedule | None = None) -> bool:
        return not (obj is not None and obj.is_declared) and super().has_delete_permission(request, obj)

    @admin.display(description="when")
    def rule(self, obj: Schedule) -> str:
        if obj._state.adding:
            return "–"
        return schedule_rule(obj)

    @admin.display(description="last status")
    def last_status(self, obj: Schedule) -> SafeString | str:
        invocation = obj.last_invocation
        if invocation is None:
            return "–"
        return format_html('<a href="{}">{}</a>', invocation_url(invocation.pk, self.admin_site.name),
                           status_badge(invocation.status))

    @admin.display(description="runs")
    def runs_link(self, obj: Schedule) -> SafeString | str:
        if obj._state.adding:
            return "–"
        return format_html('<a href="{}">its invocations</a>', runs_of_schedule_url(obj.pk, self.admin_site.name))

    def save_model(self, request: HttpRequest, obj: Schedule, form: "forms.ModelForm[Schedule]", change: bool) -> None:
        if not change or {"cron", "interval", "enabled"} & set(form.changed_data) or obj.problem:
            schedules.plan(obj, timezone.now())
        super().save_model(request, obj, form, change)

    @admin.action(description="Pause the selected schedules", permissions=["change"])
    def pause(self, request: HttpRequest, queryset: QuerySet[Schedule]) -> None:
        paused = control.pause_schedules(queryset)
        self.message_user(request, f"Paused {paused} schedule(s).", messages.SUCCESS)

    @admin.action(description="Resume the selected schedules", permissions=["change"])
    def resume(self, request: HttpRequest, queryset: QuerySet[Schedule]) -> None:
        resumed = control.resume_schedules(queryset, timezone.now())
        self.message_user(request, f"Resumed {resumed} schedule(s).", messages.SUCCESS)

    def get_urls(self) -> list[URLPattern]:
        return [
            # admin_view adds the CSRF check; require_POST refuses a GET. The Schedules page's buttons.
            path("<int:pk>/toggle/", self.admin_site.admin_view(require_POST(self.toggle)),
                 name="keyjobs_schedule_toggle"),
            *super().get_urls(),
        ]

    def toggle(self, request: HttpRequest, pk: int) -> HttpResponse:
        """Pause a running schedule, or resume a paused one from its next tick; back to the Schedules page."""
        if not self.has_change_permission(request):
            raise PermissionDenied
        found = Schedule.objects.filter(pk=pk)
        schedule = get_object_or_404(found)
        if schedule.enabled:
            control.pause_schedules(found)
            self.message_user(request, f"Paused {schedule.name}: no tick of it runs from its next one on.",
                              messages.SUCCESS)
        else:
            control.resume_schedules(found, timezone.now())
            self.message_user(request, f"Resumed {schedule.name} from its next tick.", messages.SUCCESS)
        return HttpResponseRedirect(reverse(f"{self.admin_site.name}:keyjobs_invocation_schedules"))
