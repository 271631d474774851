"""The admin of invocations and runners, and the entry to the monitor (``keyjobs.monitor``).

Nothing here writes a status: an invocation is never saved from a form,
because ``save()`` writes every column and would overwrite a status the
worker changed meanwhile. Changes go through the retry and cancel actions,
which use ``keyjobs.control`` and so the same checked transitions as the
worker.
"""

import json
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import Prefetch, Q, QuerySet
from django.db.models.functions import Substr
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.middleware.csrf import get_token
from django.shortcuts import get_object_or_404
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.functional import cached_property
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe
from django.views.decorators.http import require_POST

from . import control, registry, schedules
from .admission import MAX_LIMIT, Rate
from .concurrency import key_label
from .conf import conf
from .exceptions import KeyjobsError
from .models import Event, Invocation, RunLog, Runner, RunnerQuerySet, Schedule, Step, Value
from .monitor.display import (
    arguments_of,
    attempts,
    call_of,
    cause_of,
    change_label,
    durations,
    format_bytes,
    format_duration,
    invocation_url,
    key_url,
    moment,
    monitor_links,
    runner_badge,
    runner_label,
    runs_of_schedule_url,
    schedule_rule,
    short_task,
    status_badge,
)
from .monitor.queries import LOGS_SHOWN, Wait, waits
from .monitor.views import BREADCRUMBS_AS_LIST, MonitorViews
from .status import FINAL, Status
from .store import store
from .timers import Timer, TimerError
from .values import HEAD

if TYPE_CHECKING:
    # The admin's classes are generic to the type checker only (django-stubs), not at run time.
    InvocationModelAdmin = admin.ModelAdmin[Invocation]
    RunnerModelAdmin = admin.ModelAdmin[Runner]
    ScheduleModelAdmin = admin.ModelAdmin[Schedule]
    EventTabularInline = admin.TabularInline[Event, Invocation]
    ScheduleModelForm = forms.ModelForm[Schedule]
    InvocationPaginator = Paginator[Invocation]
else:
    InvocationModelAdmin = RunnerModelAdmin = ScheduleModelAdmin = admin.ModelAdmin
    InvocationPaginator = Paginator
    ScheduleModelForm = forms.ModelForm
    EventTabularInline = admin.TabularInline

#: How many of the newest invocations the task and queue filters look at for names the registry lacks.
RECENT_NAMES = 1000
#: How many runners the runner filter offers, newest first.
RECENT_RUNNERS = 20
#: How many of an invocation's children (or of those waiting for it) its page links to.
CHILDREN_SHOWN = 20
#: How many of a workflow's steps its page shows, first first.
STEPS_SHOWN = 200


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


class CappedPaginator(InvocationPaginator):
    """Count what a list matches up to ``cap`` rows, never the millions behind them.

    Django's paginator counts every row the filters match: a tenth of a second of a million on PostgreSQL, on
    every page however narrow. Past the cap the list pages through its first ``cap`` rows and says "more than"
    (a list that long is narrowed by its filters, not read at page 20,000); its templates say so.
    """

    cap = 10_000
    #: The markup of the admin's page links: a list from Django 6.1, as its breadcrumbs (``BREADCRUMBS_AS_LIST``).
    as_list = BREADCRUMBS_AS_LIST

    @cached_property
    def _found(self) -> int:
        # Unordered, so that the database stops at the cap in whichever index the filters use.
        rows: QuerySet[Invocation] = self.object_list  # type: ignore[assignment]  # the admin pages a queryset
        return rows.order_by()[: self.cap + 1].count()

    @cached_property
    def count(self) -> int:
        return min(self._found, self.cap)

    @property
    def capped(self) -> bool:
        """Whether more rows match than were counted."""
        return self._found > self.cap


class EventInline(EventTabularInline):
    model = Event
    verbose_name = "status change"
    verbose_name_plural = "history"
    fields = ("at_display", "change_display", "runner_display", "note_display")
    readonly_fields = fields
    extra = 0
    can_delete = False
    ordering = ("pk",)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Event]:
        # Inlines are made anew for each request: the note column reads the page's waits through it.
        self._request = request
        return super().get_queryset(request).select_related("runner")

    @admin.display(description="at")
    def at_display(self, obj: Event) -> str:
        return moment(obj.at)

    @admin.display(description="what")
    def change_display(self, obj: Event) -> str:
        return change_label(obj.kind, obj.from_status, obj.to_status)

    @admin.display(description="runner")
    def runner_display(self, obj: Event) -> str:
        if obj.runner is None:
            return "–"
        thread = "" if obj.runner_thread is None else f" · thread {obj.runner_thread}"
        return f"{runner_label(obj.runner.host, obj.runner.pid)}{thread}"

    @admin.display(description="note")
    def note_display(self, obj: Event) -> SafeString | str:
        if obj.kind == Event.Kind.ERROR:
            error_type, _, text = obj.note.partition("\n")
            return format_html('<code>{}</code><details><summary>traceback</summary><pre class="kj-pre">{}</pre>'
                               "</details>", error_type, text)
        site = self.admin_site.name
        steps: dict[int, tuple[str, int]] = getattr(getattr(self, "_request", None), "_kj_wait_steps", {})
        if obj.pk in steps:
            label, other = steps[obj.pk]
            return format_html('{} · {} <a href="{}">#{}</a>', obj.note or "–", label, invocation_url(other, site),
                               other)
        return obj.note or "–"

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # The history is part of the invocation: whoever may see the one sees the other.
        return bool(self.admin_site._registry[self.parent_model].has_view_permission(request, obj))

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class KeyActionForm(forms.Form):
    """What the key view's buttons post: the key, the action, and an override's limit, rate and end."""

    task = forms.CharField(max_length=200)
    key = forms.CharField(max_length=255)
    action = forms.ChoiceField(choices=[(name, name) for name in ("pause", "resume", "override", "restore", "cancel")])
    limit = forms.IntegerField(required=False, min_value=1, max_value=MAX_LIMIT)
    rate = forms.CharField(required=False, max_length=50, help_text="e.g. 10/m, 1/s, 5/10s")
    until = forms.DateTimeField(required=False, input_formats=["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S",
                                                               "%Y-%m-%d %H:%M", "%Y-%m-%d %H:%M:%S"])

    def clean_rate(self) -> Rate | None:
        text = self.cleaned_data["rate"].strip()
        if not text:
            return None
        try:
            return Rate.parse(text)
        except ValueError as exc:
            raise forms.ValidationError(f"the rate {text!r} {exc}") from None

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if data.get("action") == "override" and not data.get("until"):
            raise forms.ValidationError("an override needs the time it ends")
        return data


@admin.register(Invocation)
class InvocationAdmin(InvocationModelAdmin):
    # Narrow enough for 1,600 px without scrolling sideways: the start and end are on the detail page, and the
    # queued, ran and total durations say the same at a glance.
    list_display = ("id", "task_display", "call_display", "status_display", "runner_display", "created_display",
                    "queued", "ran", "total", "error_short")
    list_display_links = ("id", "task_display")
    list_filter = ("status", TaskFilter, QueueFilter, RunnerFilter, ("created_at", admin.DateFieldListFilter))
    list_select_related = ("runner",)
    search_fields = ("running_key", "registration_key", "args", "kwargs")
    search_help_text = "Search by key, by id (#123) or by argument text."
    ordering = ("-pk",)
    show_full_result_count = False
    paginator = CappedPaginator
    # Facet counts would scan the whole table once per filter choice.
    show_facets = admin.ShowFacets.NEVER
    # Rendering, not the database, is what a longer page costs: about 2 ms a row.
    list_per_page = 50
    actions = ("retry", "cancel")
    inlines = (EventInline,)
    fieldsets = (
        (None, {"fields": ("task_name", "status_display", "key_link", "queue", "priority_display", "runner_display",
                           "attempts")}),
        ("Times", {"fields": ("created_display", "run_after_display", "started_display", "finished_display",
                              "queued", "ran", "total")}),
        # Right after the times: how long it waited, and for what.
        ("Waits", {"fields": ("waits_display", "parent_link", "waiting_on_link", "children_links",
                              "waited_on_by_links")}),
        ("Arguments", {"fields": ("args_display", "kwargs_display", "large_arguments_display")}),
        ("Outcome", {"fields": ("result_display", "error_display", "traceback_display")}),
        # A workflow's tree: its recorded steps in order (``keyjobs.workflows``).
        ("Steps", {"fields": ("steps_display",)}),
        ("Attempts", {"fields": ("attempts_display",)}),
        ("Logs", {"fields": ("logs_display",)}),
        ("Keys", {"fields": ("running_key", "registration_key", "slot"), "classes": ("collapse",)}),
        ("Cause", {"fields": ("cause_display", "triggered_display")}),
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

    @admin.display(description="priority")
    def priority_display(self, obj: Invocation) -> SafeString | str:
        # The queue's order is the effective priority: raised by one for each run that waits on it.
        if not obj.waiters:
            return str(obj.priority)
        return format_html("{} <small>(its own {}, +{} for the {} run{} waiting on it)</small>",
                           obj.effective_priority, obj.priority, obj.waiters, obj.waiters,
                           "" if obj.waiters == 1 else "s")

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

    @admin.display(description="task", ordering="task_name")
    def task_display(self, obj: Invocation) -> SafeString:
        return format_html('<span class="kj-cut" title="{}">{}</span>', obj.task_name, short_task(obj.task_name))

    @admin.display(description="key · arguments")
    def call_display(self, obj: Invocation) -> SafeString:
        arguments = arguments_of(obj)
        return format_html('<span class="kj-cut">{}</span> <code class="kj-args" title="{}">{}</code>',
                           self.key_link(obj), arguments, arguments or "()")

    @admin.display(description="created", ordering="created_at")
    def created_display(self, obj: Invocation) -> str:
        return moment(obj.created_at)

    @admin.display(description="due from")
    def run_after_display(self, obj: Invocation) -> str:
        return moment(obj.run_after)

    @admin.display(description="started")
    def started_display(self, obj: Invocation) -> str:
        return moment(obj.started_at)

    @admin.display(description="finished")
    def finished_display(self, obj: Invocation) -> str:
        return moment(obj.finished_at)

    @admin.display(description="queued")
    def queued(self, obj: Invocation) -> str:
        return durations(obj, timezone.now())["queued"]

    @admin.display(description="ran")
    def ran(self, obj: Invocation) -> str:
        return durations(obj, timezone.now())["ran"]

    @admin.display(description="total")
    def total(self, obj: Invocation) -> str:
        return durations(obj, timezone.now())["total"]

    @admin.display(description="error")
    def error_short(self, obj: Invocation) -> SafeString | str:
        if not obj.error:
            return "–"
        return format_html('<span class="kj-error" title="{}">{}</span>', obj.error,
                           obj.error if len(obj.error) <= 60 else obj.error[:59] + "…")

    @staticmethod
    def _events(obj: Invocation) -> list[Event]:
        """Return ``obj``'s history in order, read once a page."""
        events: list[Event] | None = getattr(obj, "_kj_events", None)
        if events is None:
            events = list(Event.objects.using(obj._state.db).filter(invocation=obj).order_by("pk"))
            obj._kj_events = events  # type: ignore[attr-defined]
        return events

    def _waits(self, obj: Invocation) -> list[Wait]:
        found: list[Wait] | None = getattr(obj, "_kj_waits", None)
        if found is None:
            found = waits(obj, self._events(obj), using=obj._state.db)
            obj._kj_waits = found  # type: ignore[attr-defined]
        return found

    @admin.display(description="waited")
    def waits_display(self, obj: Invocation) -> SafeString | str:
        found = self._waits(obj)
        if not found:
            return "–"
        now, site = timezone.now(), self.admin_site.name
        totals: dict[str, timedelta] = {}
        for wait in found:
            totals[wait.why] = totals.get(wait.why, timedelta()) + wait.length(now)

        def link(pk: int | None) -> SafeString | str:
            return format_html('<a href="{}">#{}</a>', invocation_url(pk, site), pk) if pk is not None else "–"

        summary = format_html_join(", ", "{} {}", ((why, format_duration(length)) for why, length in
                                                   sorted(totals.items(), key=lambda item: -item[1])))
        rows = format_html_join(
            "", "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            ((wait.why, moment(wait.began), moment(wait.ended) if wait.ended else "still waiting",
              format_duration(wait.length(now)), link(wait.behind),
              format_html("{}{}", link(wait.freed_by), " (handed over)" if wait.handed and wait.freed_by else ""))
             for wait in found),
        )
        return format_html(
            '<p class="kj-waited">Waited {} in all: {}.</p><table class="kj-table kj-waits"><thead><tr><th>for</th>'
            "<th>from</th><th>to</th><th>how long</th><th>behind</th><th>freed by</th></tr></thead><tbody>{}</tbody>"
            "</table>", format_duration(sum(totals.values(), timedelta())), summary, rows)

    @admin.display(description="workflow steps")
    def steps_display(self, obj: Invocation) -> SafeString | str:
        declared = registry.declared(obj.task_name)
        if declared is not None and not declared.workflow:
            return "–"  # a task's: no steps to look for
        steps = list(Step.objects.using(obj._state.db).filter(workflow=obj).select_related("child")
                     .order_by("position")[:STEPS_SHOWN])
        if not steps:
            return "–"
        site = self.admin_site.name

        def what(step: Step) -> SafeString | str:
            if step.child is not None:
                return format_html('<a href="{}">#{}</a> {} {}', invocation_url(step.child.pk, site), step.child.pk,
                                   step.child.task_name, status_badge(step.child.status))
            return format_html("{} <code>{}</code>", step.get_kind_display(), step.name) if step.name \
                else step.get_kind_display()

        def took(step: Step) -> str:
            if step.child is not None and step.child.started_at and step.child.finished_at:
                return format_duration(step.child.finished_at - step.child.started_at)
            if step.duration is not None:
                return format_duration(timedelta(seconds=step.duration))
            return "–"

        def stored(step: Step) -> SafeString | str:
            if step.error_type:
                return format_html("<code>{}</code> {}", step.error_type, step.error)
            if step.child is not None:
                child = step.child
                return self._result_of(child) if child.status == Status.SUCCESS else child.error or "–"
            if step.kind == Step.Kind.SLEEP or (step.kind == Step.Kind.EVENT and step.state == Step.State.WAITING):
                return f"until {moment(step.due_at)}" if step.due_at else "no deadline"
            return pretty_json(step.value) if step.value is not None else "–"

        # Set by render_change_form for those who may act: the form's CSRF token.
        token: str | None = getattr(obj, "_kj_act_token", None) if obj.status in control.RETRYABLE else None

        def restart(step: Step) -> SafeString | str:
            if token is None:
                return ""
            url = reverse(f"{site}:keyjobs_invocation_restart", args=[obj.pk, step.position])
            return format_html('<form method="post" action="{}" class="kj-inline-form"><input type="hidden" '
                               'name="csrfmiddlewaretoken" value="{}"><button type="submit">restart here</button>'
                               "</form>", url, token)

        rows = format_html_join(
            "", "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            ((step.position, what(step), step.get_state_display(), took(step), stored(step), restart(step))
             for step in steps))
        more = format_html('<p class="kj-muted">The first {}.</p>', STEPS_SHOWN) if len(steps) == STEPS_SHOWN else ""
        return format_html('<table class="kj-table kj-steps"><thead><tr><th>step</th><th>what</th><th>state</th>'
                           "<th>took</th><th>value or error</th><th></th></tr></thead><tbody>{}</tbody></table>{}", rows, more)

    @admin.display(description="what it logged")
    def logs_display(self, obj: Invocation) -> SafeString | str:
        # Only staff who may view invocations reach this page: stored logs can hold secrets.
        records = list(RunLog.objects.using(obj._state.db).filter(invocation=obj).order_by("id")[:LOGS_SHOWN])
        if not records:
            return "–"
        rows = format_html_join(
            "", '<tr class="kj-log-{}"><td class="kj-nowrap">{}</td><td>{}</td><td><code>{}</code></td>'
            '<td><pre class="kj-pre kj-log">{}</pre></td></tr>',
            ((logging.getLevelName(record.level).lower(), moment(record.at), logging.getLevelName(record.level).lower(),
              record.logger, record.message) for record in records))
        more = format_html('<p class="kj-muted">The first {}: <a href="{}?task={}">the log explorer</a> has them all.</p>',
                           LOGS_SHOWN, reverse(f"{self.admin_site.name}:keyjobs_invocation_logs"), obj.task_name) \
            if len(records) == LOGS_SHOWN else ""
        return format_html('<table class="kj-table kj-run-logs"><thead><tr><th>at</th><th>level</th><th>logger</th>'
                           "<th>message</th></tr></thead><tbody>{}</tbody></table>{}", rows, more)

    @admin.display(description="every attempt")
    def attempts_display(self, obj: Invocation) -> SafeString | str:
        found = attempts(obj, self._events(obj))
        if not found:
            return "–"
        rows = format_html_join(
            "", "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            ((attempt.number, moment(attempt.started), moment(attempt.ended),
              status_badge(attempt.outcome) if attempt.outcome else "running",
              format_duration(attempt.ended - attempt.started) if attempt.ended else "–",
              format_html('<code>{}</code> <span class="kj-error">{}</span><details><summary>traceback</summary>'
                          '<pre class="kj-pre">{}</pre></details>', attempt.error_type, attempt.message,
                          attempt.error) if attempt.error else "–")
             for attempt in found),
        )
        return format_html('<table class="kj-table kj-attempts"><thead><tr><th>#</th><th>started</th><th>ended</th>'
                           "<th>outcome</th><th>ran</th><th>error</th></tr></thead><tbody>{}</tbody></table>", rows)

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

    @admin.display(description="stored apart")
    def large_arguments_display(self, obj: Invocation) -> SafeString | str:
        # Where args and kwargs show null: each large argument's size and first characters, from the row's outline.
        outline = obj.arguments_outline if isinstance(obj.arguments_outline, dict) else {}
        rows = [(f"args[{at}]" if part == "args" else at, entry) for part in ("args", "kwargs")
                for at, entry in (outline.get(part) or {}).items()]
        if not rows or obj.arguments_value_id is None:
            return "–"
        link = self._value_link(obj.arguments_value_id, "the whole value (JSON)")
        return format_html('{}<p>{}</p>', format_html_join("", self._LARGE, (
            (place, format_bytes(entry.get("bytes", 0)), entry.get("head", "")) for place, entry in rows)), link)

    _LARGE = '<p class="kj-large"><code>{}</code>: {}, first characters <code>{}…</code></p>'

    @admin.display(description="result")
    def result_display(self, obj: Invocation) -> SafeString | str:
        return self._result_of(obj) if obj.status == Status.SUCCESS else "–"

    def _result_of(self, obj: Invocation) -> SafeString | str:
        """A successful invocation's result: whole if kept in its row, else the stored value's size and head."""
        if obj.result_value_id is None:
            return pretty_json(obj.return_value)
        # Its size and first characters, read by the database: the page never loads a large result whole.
        found = (Value.objects.using(conf.DATABASE).filter(pk=obj.result_value_id)
                 .annotate(head=Substr("data", 1, HEAD)).values_list("size", "head").first())
        if found is None:
            return format_html('<span class="kj-error">its stored value {} is missing</span>', obj.result_value_id)
        return format_html('<p class="kj-large">{}, first characters <code>{}…</code></p><p>{}</p>',
                           format_bytes(found[0]), found[1],
                           self._value_link(obj.result_value_id, "the whole result (JSON)"))

    def _value_link(self, digest: str, text: str) -> SafeString:
        return format_html('<a href="{}">{}</a>', reverse(f"{self.admin_site.name}:keyjobs_invocation_value",
                                                          args=[digest]), text)

    def value_view(self, request: HttpRequest, digest: str) -> HttpResponse:
        """Return a large argument or result whole, as stored (JSON); for those who may view invocations."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        data = Value.objects.using(conf.DATABASE).filter(pk=digest).values_list("data", flat=True).first()
        if data is None:
            raise Http404(f"no stored value {digest}")
        return HttpResponse(data, content_type="application/json; charset=utf-8")

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
        duplicates: list[int] = getattr(moved, "duplicates", [])
        if moved:
            self.message_user(request, f"{verb} {len(moved)} invocation(s): {_ids(moved)}.", messages.SUCCESS)
        if duplicates:
            self.message_user(request, f"{len(duplicates)} invocation(s) left alone: a call with the same "
                              f"registration key is already waiting, and runs instead: {_ids(duplicates)}.",
                              messages.WARNING)
        if selected > len(moved) + len(duplicates):
            self.message_user(request, f"{selected - len(moved) - len(duplicates)} invocation(s) left alone: "
                              f"not {expected}.", messages.WARNING)

    # -- the monitor's URLs and the detail page's buttons ------------------------

    def get_urls(self) -> list[URLPattern]:
        opts = self.model._meta
        prefix = f"{opts.app_label}_{opts.model_name}"
        return [
            *MonitorViews(self).urls(),
            # admin_view adds the CSRF check; require_POST refuses a GET.
            path("value/<str:digest>/", self.admin_site.admin_view(self.value_view), name=f"{prefix}_value"),
            path("<path:object_id>/retry/", self.admin_site.admin_view(require_POST(self.retry_one)),
                 name=f"{prefix}_retry"),
            path("<path:object_id>/cancel/", self.admin_site.admin_view(require_POST(self.cancel_one)),
                 name=f"{prefix}_cancel"),
            path("<path:object_id>/restart/<int:position>/",
                 self.admin_site.admin_view(require_POST(self.restart_one)), name=f"{prefix}_restart"),
            # The key view's buttons: pause, resume, override, restore, cancel what waits.
            path("key/act/", self.admin_site.admin_view(require_POST(self.act_on_key)), name=f"{prefix}_key_act"),
            *super().get_urls(),
        ]

    def act_on_key(self, request: HttpRequest) -> HttpResponse:
        """Hold or free one task's key (POST; the *change invocation* permission), then back to its key view."""
        if not self.has_change_permission(request):
            raise PermissionDenied
        form = KeyActionForm(request.POST)
        if not form.is_valid():
            said = {name: " ".join(str(error) for error in errors) for name, errors in form.errors.items()}
            self.message_user(request, "; ".join(text if name == "__all__" else f"{name}: {text}"
                                                 for name, text in said.items()), messages.ERROR)
            task, key = request.POST.get("task", ""), request.POST.get("key", "")
        else:
            task, key = form.cleaned_data["task"], form.cleaned_data["key"]
            self._act_on_key(request, form.cleaned_data)
        back = reverse(f"{self.admin_site.name}:keyjobs_invocation_key")
        return HttpResponseRedirect(f"{back}?{urlencode({'task': task, 'key': key})}")

    def _act_on_key(self, request: HttpRequest, data: dict[str, Any]) -> None:
        task, key, by, action = data["task"], data["key"], request.user.get_username(), data["action"]
        name = f"{task}({key_label(key)})"
        if action == "pause":
            done = control.pause_key(task, key, by=by, using=conf.DATABASE)
            said = f"Paused {name}: none of its work starts until it is resumed." if done else f"{name} was paused already."
        elif action == "resume":
            done = control.resume_key(task, key, by=by, using=conf.DATABASE)
            said = f"Resumed {name}: its waiting work starts in turn." if done else f"{name} was not paused."
        elif action == "override":
            try:
                done = control.override_key(task, key, limit=data["limit"], rate=data["rate"], until=data["until"],
                                            by=by, using=conf.DATABASE)
            except KeyjobsError as exc:
                self.message_user(request, str(exc), messages.ERROR)
                return
            said = f"Overrode {name} until {data['until']:%Y-%m-%d %H:%M:%S}." if done else f"{name} had that override."
        elif action == "restore":
            done = control.restore_key(task, key, by=by, using=conf.DATABASE)
            said = f"{name} has its declared limit and rate again." if done else f"{name} had no override."
        else:
            cancelled = control.cancel_waiting(task, key, by=by, using=conf.DATABASE)
            said = f"Cancelled {len(cancelled)} invocation(s) waiting for {name}."
        self.message_user(request, said, messages.SUCCESS)

    def retry_one(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """Register one failed, dropped or cancelled invocation again (POST; the *change invocation* permission)."""
        return self._act_on_one(request, object_id, control.retry, "Registered again", "failed or dropped")

    def cancel_one(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """Cancel one waiting invocation, or ask a running one to stop (POST; the *change invocation* permission)."""
        return self._act_on_one(request, object_id, control.cancel, "Cancelled", "waiting or running")

    def restart_one(self, request: HttpRequest, object_id: str, position: int) -> HttpResponse:
        """Retry a failed or cancelled workflow from one of its steps, forgetting the records after it (POST)."""
        return self._act_on_one(
            request, object_id, lambda invocations, **kwargs: control.restart(invocations[0], position, **kwargs),
            f"Restarted from step {position}", "a failed or cancelled workflow")

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
        response = super().changelist_view(
            request,
            {"title": "Invocations", **(extra_context or {}), "monitor_links": monitor_links(self.admin_site.name)},
        )
        context = getattr(response, "context_data", None)
        if context is not None and "cl" in context:
            # The list follows its invocations while any of those shown may still change.
            context["kj_active"] = any(inv.status not in FINAL for inv in context["cl"].result_list)
        return response

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "",
                    extra_context: dict[str, Any] | None = None) -> HttpResponse:
        extra = {
            **(extra_context or {}),
            "can_act": super().has_change_permission(request),
            "retryable": sorted(control.RETRYABLE),
            "cancellable": sorted(control.CANCELLABLE | control.STOPPABLE),
        }
        return super().change_view(request, object_id, form_url, extra)

    def render_change_form(self, request: HttpRequest, context: dict[str, Any], add: bool = False,
                           change: bool = False, form_url: str = "", obj: Invocation | None = None) -> HttpResponse:
        if obj is not None:
            # The call as it was made, arguments and all, keyed or not; the page follows it while it is not final.
            context.update(subtitle=f"#{obj.pk} {call_of(obj)}", kj_active=obj.status not in FINAL)
            # The history's parked and woken steps link whom they waited behind and who freed the key.
            steps: dict[int, tuple[str, int]] = {}
            for wait in self._waits(obj):
                if wait.step is not None and wait.behind is not None:
                    steps[wait.step] = ("waits for" if wait.why == "a child" else "behind", wait.behind)
                if wait.ended_step is not None and wait.freed_by is not None:
                    steps[wait.ended_step] = ("handed over by" if wait.handed else "freed by", wait.freed_by)
            request._kj_wait_steps = steps  # type: ignore[attr-defined]
            if super().has_change_permission(request):
                obj._kj_act_token = get_token(request)  # type: ignore[attr-defined]
        return super().render_change_form(request, context, add, change, form_url, obj)


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
            "pk", "task_name", "running_key", "registration_key", "status", "runner_id", "runner_thread", "args",
            "kwargs", "arguments_outline",
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
            '<a href="{}">#{} {}{}</a> {} thread {}',
            (
                (reverse(f"{self.admin_site.name}:keyjobs_invocation_change", args=[inv.pk]), inv.pk,
                 call_of(inv, limit=40), f" · {inv.key}" if inv.key else "", status_badge(inv.status),
                 inv.runner_thread)
                for inv in owned
            ),
        )



class ScheduleForm(ScheduleModelForm):
    """A schedule of the admin: the rule checked by cronsim, the task found, the arguments fitting its function."""

    class Meta:
        model = Schedule
        fields = ("name", "task_name", "kwargs", "cron", "interval", "catch_up", "enabled")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "task_name" in self.fields:
            # A choice of the registered tasks; a schedule's own task stays offered even if no longer registered,
            # and clean() still names a task that cannot be found.
            names = set(registry.all_tasks())
            if self.instance.task_name:
                names.add(self.instance.task_name)
            self.fields["task_name"].widget = forms.Select(choices=[("", "---------"),
                                                                    *((name, name) for name in sorted(names))])

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
            schedules.plan(obj, store(conf.DATABASE).clock())
        super().save_model(request, obj, form, change)

    @admin.action(description="Pause the selected schedules", permissions=["change"])
    def pause(self, request: HttpRequest, queryset: QuerySet[Schedule]) -> None:
        paused = control.pause_schedules(queryset)
        self.message_user(request, f"Paused {paused} schedule(s).", messages.SUCCESS)

    @admin.action(description="Resume the selected schedules", permissions=["change"])
    def resume(self, request: HttpRequest, queryset: QuerySet[Schedule]) -> None:
        resumed = control.resume_schedules(queryset)
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
            control.resume_schedules(found)
            self.message_user(request, f"Resumed {schedule.name} from its next tick.", messages.SUCCESS)
        return HttpResponseRedirect(reverse(f"{self.admin_site.name}:keyjobs_invocation_schedules"))


def _ids(ids: list[int], shown: int = 20) -> str:
    """Return ``ids`` as an action's message lists them: the first ``shown``, then an ellipsis."""
    return ", ".join(f"#{pk}" for pk in ids[:shown]) + ("…" if len(ids) > shown else "")
