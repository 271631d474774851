"""How the admin and the monitor show values: colours, badges, labels, durations, links, epoch times.

Pure functions of what they are given: nothing here reads the database.
"""

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.timesince import timesince

from ..concurrency import key_label
from ..models import Event, Invocation, Runner, Schedule
from ..status import OWNED, WAITING, Status
from ..timers import Timer, TimerError

#: One colour per status: the admin's badges and the timeline's bars share them.
STATUS_COLOURS: dict[str, str] = {
    Status.REGISTERED: "#6c757d",
    Status.REROUTED: "#d39e00",
    Status.PENDING: "#5bc0de",
    Status.RUNNING: "#1f6feb",
    Status.PAUSED: "#9ec5fe",
    Status.SUCCESS: "#2e8540",
    Status.FAILED: "#c9302c",
    Status.RETRY: "#e8710a",
    Status.CONCURRENCY_CONTROLLED_FINAL: "#7b3fa0",
    Status.CANCELLED: "#495057",
}
#: The colours of the timeline's markers: a parked, a dropped, a deduplicated, a debounced and a cancelled invocation.
MARKER_COLOURS = {
    "rerouted": STATUS_COLOURS[Status.REROUTED],
    "dropped": STATUS_COLOURS[Status.CONCURRENCY_CONTROLLED_FINAL],
    "reused": "#0b7285",
    "debounced": "#0ca678",
    "cancelled": STATUS_COLOURS[Status.CANCELLED],
    "tick": "#495057",
}
#: One colour per runner state.
RUNNER_COLOURS: dict[str, str] = {
    Runner.State.ALIVE: STATUS_COLOURS[Status.SUCCESS],
    Runner.State.GONE: STATUS_COLOURS[Status.FAILED],
    Runner.State.STOPPED: "#6c757d",
    Runner.State.LOST: STATUS_COLOURS[Status.FAILED],
}


def label_of(key: str) -> str:
    """Return the label of a stored key, or ``key`` itself if it is not one (typed by hand)."""
    try:
        return key_label(key)
    except (ValueError, AttributeError):
        return key


def natural(text: str) -> tuple[tuple[int, int | str], ...]:
    """Return a sort key that orders the numbers inside ``text`` by value: ``acme2`` before ``acme10``."""
    return tuple((0, int(part)) if part.isdigit() else (1, part.casefold())
                 for part in re.split(r"(\d+)", text) if part)


def runner_label(host: str, pid: int) -> str:
    """Return how a runner is named on the pages: ``host:pid``."""
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


def runner_badge(state: str, heartbeat_at: datetime, stop_reason: str = "") -> SafeString:
    """Return a runner's state as a coloured badge, with what explains it: the silence, the recovery, the reason."""
    badge = format_html('<span class="kj-badge" style="background:{}">{}</span>', RUNNER_COLOURS.get(state, "#444"),
                        state)
    if state == Runner.State.GONE:
        badge = format_html("{} no heartbeat for {}", badge, timesince(heartbeat_at))
    elif state == Runner.State.LOST:
        badge = format_html("{} its work was recovered", badge)
    if stop_reason:
        badge = format_html('{} <span class="kj-error">{}</span>', badge, stop_reason)
    return badge


def format_duration(delta: timedelta) -> str:
    """Return a duration as a person reads it, to the millisecond: ``412 ms``, ``2.503 s``, ``3 min 04 s``."""
    seconds = delta.total_seconds()
    if seconds < 1:
        return f"{round(seconds * 1000)} ms"
    if seconds < 60:
        return f"{seconds:.3f} s"
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"


def moment(value: datetime | None) -> str:
    """Return a time as the pages show it: in the site's time zone, to the millisecond (``2030-01-01 05:08:03.412``)."""
    if value is None:
        return "–"
    local = timezone.localtime(value)
    return f"{local:%Y-%m-%d %H:%M:%S}.{local.microsecond // 1000:03d}"


def durations(invocation: Invocation, now: datetime) -> dict[str, str]:
    """Return how long an invocation was queued, ran and took in all, each a dash where it does not apply yet.

    Queued: from its creation to its (last) start, or until ``now`` while it waits; ran: its (last) run,
    "so far" while it runs; total: from its creation to its end.
    """
    created, started, finished = invocation.created_at, invocation.started_at, invocation.finished_at
    waiting, running = invocation.status in WAITING, invocation.status in OWNED
    if started is not None and created is not None and started >= created:
        queued = format_duration(started - created)
    elif waiting and created is not None:
        queued = f"{format_duration(now - created)} so far"
    else:
        queued = "–"
    if started is not None and finished is not None and finished >= started:
        ran = format_duration(finished - started)
    elif started is not None and running:
        ran = f"{format_duration(now - started)} so far"
    else:
        ran = "–"
    total = format_duration(finished - created) if finished is not None and created is not None else "–"
    return {"queued": queued, "ran": ran, "total": total}


def arguments_of(invocation: Invocation) -> str:
    """Return an invocation's arguments as a call writes them: ``"acme", 3, op="fetch"``.

    An argument stored out of line shows as its size and first characters,
    ``<2.1 MB {"rules":[…>``, from its row's outline: its value is never read.
    """
    args = invocation.args if isinstance(invocation.args, list) else [invocation.args]
    kwargs = invocation.kwargs if isinstance(invocation.kwargs, dict) else {}
    outline = invocation.arguments_outline if isinstance(invocation.arguments_outline, dict) else {}
    moved_args, moved_kwargs = outline.get("args") or {}, outline.get("kwargs") or {}

    def shown(value: Any, moved: Any) -> str:
        return large_value(moved) if isinstance(moved, dict) else json.dumps(value, ensure_ascii=False)

    return ", ".join(
        [shown(value, moved_args.get(str(index))) for index, value in enumerate(args)]
        + [f"{name}={shown(value, moved_kwargs.get(name))}" for name, value in kwargs.items()]
    )


def large_value(outlined: dict[str, Any], head: int = 24) -> str:
    """Return a value stored out of line as a list shows it: ``<2.1 MB {"rules":[{"id":0,…>``."""
    return f"<{format_bytes(outlined.get('bytes', 0))} {str(outlined.get('head', ''))[:head]}…>"


def format_bytes(size: int) -> str:
    """Return a size as a person reads it: ``812 bytes``, ``9.8 kB``, ``2.1 MB``."""
    if size < 1000:
        return f"{size} bytes"
    for unit in ("kB", "MB", "GB"):
        size /= 1000  # type: ignore[assignment]
        if size < 1000:
            return f"{size:.1f} {unit}"
    return f"{size:.1f} TB"


def call_of(invocation: Invocation, limit: int = 80) -> str:
    """Return an invocation as the call a person made: ``call_unsafe("acme", 3)``, its arguments cut at ``limit``."""
    arguments = arguments_of(invocation)
    if len(arguments) > limit:
        arguments = arguments[: limit - 1] + "…"
    return f"{short_task(invocation.task_name)}({arguments})"


def slots_in_use(in_use: int, limit: int) -> str:
    """Return a key's slots as a person reads them: ``2 of 3 slots in use``."""
    return f"{in_use} of {limit} slot{'s' if limit != 1 else ''} in use"


def epoch_ms(moment: datetime | None) -> int | None:
    """Return ``moment`` in milliseconds since the epoch, as the page scripts read times."""
    return None if moment is None else round(moment.timestamp() * 1000)


def key_url(task_name: str, raw_key: str, site_name: str = "admin") -> str:
    """Return the URL of the key view of (task, stored key)."""
    return f"{reverse(f'{site_name}:keyjobs_invocation_key')}?{urlencode({'task': task_name, 'key': raw_key})}"


def monitor_links(site_name: str = "admin") -> list[tuple[str, str]]:
    """Return the (title, url) of each monitor page, for the admin's index and the pages' navigation."""
    return [
        ("Dashboard", reverse(f"{site_name}:keyjobs_invocation_dashboard")),
        ("Timeline", reverse(f"{site_name}:keyjobs_invocation_timeline")),
        ("Invocations", reverse(f"{site_name}:keyjobs_invocation_changelist")),
        ("Runners", reverse(f"{site_name}:keyjobs_runner_changelist")),
        ("Schedules", reverse(f"{site_name}:keyjobs_invocation_schedules")),
        ("Tasks", reverse(f"{site_name}:keyjobs_invocation_tasks")),
        ("Keys", reverse(f"{site_name}:keyjobs_invocation_keys")),
        ("Logs", reverse(f"{site_name}:keyjobs_invocation_logs")),
    ]


def invocation_row(invocation: Invocation, url: str) -> dict[str, Any]:
    """Return what the key view shows of an invocation."""
    arguments = arguments_of(invocation)
    if invocation.started_at and invocation.finished_at:
        duration = format_duration(invocation.finished_at - invocation.started_at)
    else:
        duration = "–"
    return {
        "id": invocation.pk, "url": url, "badge": status_badge(invocation.status), "arguments": arguments,
        "created_at": invocation.created_at, "started_at": invocation.started_at,
        "finished_at": invocation.finished_at, "duration": duration,
        "runner": (f"{runner_label(invocation.runner.host, invocation.runner.pid)} · thread "
                   f"{invocation.runner_thread}" if invocation.runner else "–"),
        "error": invocation.error,
    }


def throughput_bars(counts: list[tuple[datetime, int]]) -> list[dict[str, Any]]:
    """Return the bars of the dashboard's chart of finished invocations per minute: 20 units a minute, 64 high."""
    peak = max((count for _, count in counts), default=0)
    bars = []
    for number, (minute, count) in enumerate(counts):
        height = round(64 * count / peak) if peak else 0
        bars.append({"minute": minute, "count": count, "height": height, "x": 20 * number + 2, "y": 66 - height,
                     "label_x": 20 * number + 10})
    return bars


def schedule_rule(schedule: Schedule) -> str:
    """Return a schedule's rule in words (``Every 15 minutes``), or its raw text if it cannot be read."""
    try:
        return Timer(cron=schedule.cron, interval=schedule.interval).describe()
    except TimerError:
        return schedule.cron or str(schedule.interval)


def schedule_url(pk: int, site_name: str = "admin") -> str:
    return reverse(f"{site_name}:keyjobs_schedule_change", args=[pk])


def invocation_url(pk: int, site_name: str = "admin") -> str:
    return reverse(f"{site_name}:keyjobs_invocation_change", args=[pk])


def runs_of_schedule_url(pk: int, site_name: str = "admin") -> str:
    """Return the URL of the invocations a schedule's ticks created."""
    return f"{reverse(f'{site_name}:keyjobs_invocation_changelist')}?{urlencode({'cause_schedule__id__exact': pk})}"


def cause_of(invocation: Invocation, site_name: str = "admin") -> SafeString | str:
    """Return what created an invocation, with a link to it: a schedule's tick, an event, another's outcome."""
    if invocation.cause_schedule_id is not None:
        tick = invocation.cause_tick.isoformat() if invocation.cause_tick else "?"
        return format_html('the tick of {} of schedule <a href="{}">{}</a>', tick,
                           schedule_url(invocation.cause_schedule_id, site_name),
                           invocation.cause_schedule.name if invocation.cause_schedule else invocation.cause_schedule_id)
    if invocation.cause_invocation_id is not None:
        return format_html('{} of <a href="{}">#{}</a>', status_badge(invocation.cause_status),
                           invocation_url(invocation.cause_invocation_id, site_name), invocation.cause_invocation_id)
    if invocation.cause_event:
        return format_html("the event <code>{}</code> (emit)", invocation.cause_event)
    return "a call of delay()"


def status_label(status: str) -> str:
    """Return a status as a person reads it (``Dropped by concurrency control``), or as stored if it is not one."""
    return str(Status(status).label) if status in Status.values else status


def change_label(kind: str, from_status: str, to_status: str) -> str:
    """Return what a history row records: ``Registered → Pending``, or what happened (``Merged by debounce``)."""
    if kind != Event.Kind.TRANSITION:
        return str(Event.Kind(kind).label) if kind in Event.Kind.values else kind
    return f"{status_label(from_status) if from_status else 'Created'} → {status_label(to_status)}"


@dataclass
class Attempt:
    """One run of an invocation, read from its history: when it ran, how it ended, and its error if it failed."""

    number: int
    started: datetime
    ended: datetime | None = None
    #: The status it ended in (None while it runs).
    outcome: str | None = None
    error_type: str = ""
    #: The error's message and traceback, as recorded.
    error: str = ""
    #: When it waited, paused, on other invocations: (from, to or None).
    pauses: list[tuple[datetime, datetime | None]] = field(default_factory=list)

    @property
    def message(self) -> str:
        """The error's last line: ``ValueError: no such account``."""
        lines = [line for line in self.error.splitlines() if line.strip()]
        return lines[-1].strip() if lines else ""


def attempts(invocation: Invocation, events: Iterable[Event]) -> list[Attempt]:
    """Return every attempt of ``invocation`` in order, each with its own error, from its history (in id order).

    A start is a change to RUNNING from anything but PAUSED; it ends at the run's next change out of
    RUNNING and PAUSED. A failed attempt's error is its ERROR row (``kind`` ERROR: the class path, a newline,
    the traceback); the last attempt's, if it has none, is the one the invocation's row keeps.
    """
    found: list[Attempt] = []
    for event in events:
        current = found[-1] if found else None
        if event.kind == Event.Kind.ERROR:
            if current is not None:
                error_type, _, text = event.note.partition("\n")
                current.error_type, current.error = error_type, text
            continue
        if event.kind != Event.Kind.TRANSITION:
            continue
        if event.to_status == Status.RUNNING and event.from_status != Status.PAUSED:
            found.append(Attempt(len(found) + 1, event.at))
        elif current is None or current.outcome is not None:
            continue
        elif event.to_status == Status.PAUSED:
            current.pauses.append((event.at, None))
        elif event.from_status == Status.PAUSED and current.pauses:
            current.pauses[-1] = (current.pauses[-1][0], event.at)
            if event.to_status != Status.RUNNING:
                current.ended, current.outcome = event.at, event.to_status
        elif event.from_status in (Status.RUNNING, Status.PAUSED):
            current.ended, current.outcome = event.at, event.to_status
    last = found[-1] if found else None
    if last is not None and not last.error and last.outcome == invocation.status and invocation.error:
        last.error_type = invocation.error_type
        last.error = invocation.traceback or invocation.error
    return found


def nice_ceiling(value: float) -> float:
    """Return the axis' top for a peak of ``value``: the next 1, 2 or 5 times a power of ten (1 for nothing)."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if value <= step * power:
            return float(step * power)
    return float(10 * power)


def format_ms(ms: float | None) -> str:
    """Return milliseconds as a duration, or a dash for none."""
    return "–" if ms is None else format_duration(timedelta(milliseconds=ms))


def format_rate(rate: float | None) -> str:
    """Return a ratio as a percentage to one decimal (``2.5 %``), or a dash for none."""
    return "–" if rate is None else f"{rate * 100:.1f} %"


def axis_label(value: float, unit: str) -> str:
    """Return a tick's label: a round number, in ms or s for a duration (``250 ms``, ``2.5 s``)."""
    if unit != "ms":
        return f"{value:g}"
    return f"{value:g} ms" if value < 1000 else f"{value / 1000:g} s"


#: A chart's plot area inside its SVG, in its own units: left margin for the y axis, bottom for the x axis.
CHART = {"width": 480, "height": 150, "left": 46, "bottom": 20, "top": 8}


def chart(points: list[tuple[datetime, float | None]], *, unit: str = "", bars: bool = True) -> dict[str, Any]:
    """Return an SVG chart of ``points`` (oldest first) with both axes: bars (or a line), y ticks and time labels.

    A point of None is a gap (nothing sampled there). What it returns is drawn by ``keyjobs/_chart.html``.
    """
    width, height, left, bottom, top = (CHART[name] for name in ("width", "height", "left", "bottom", "top"))
    plot_width, plot_height = width - left - 8, height - bottom - top
    peak = nice_ceiling(max((value for _, value in points if value is not None), default=0))
    slot = plot_width / max(1, len(points))

    def y(value: float) -> float:
        return round(top + plot_height * (1 - value / peak), 1)

    drawn = []
    for number, (at, value) in enumerate(points):
        x = round(left + slot * number, 1)
        drawn.append({"x": x, "mid": round(x + slot / 2, 1), "width": round(max(1.0, slot * 0.8), 1),
                      "y": y(value or 0), "height": round(plot_height * (value or 0) / peak, 1),
                      "value": value, "at": at,
                      "label": "–" if value is None else (format_ms(value) if unit == "ms" else f"{value:g}")})
    line = " ".join(f"{point['mid']},{point['y']}" for point in drawn if point["value"] is not None)
    every = max(1, len(points) // 6)
    return {
        "width": width, "height": height, "left": left, "right": width - 8, "base": top + plot_height, "top": top,
        "points": drawn, "bars": bars, "line": line,
        "y_ticks": [{"y": y(peak * share), "label": axis_label(peak * share, unit)} for share in (0, 0.5, 1)],
        "x_ticks": [{"x": point["mid"], "label": f"{timezone.localtime(at):%H:%M}"}
                    for number, (point, (at, _)) in enumerate(zip(drawn, points, strict=True)) if number % every == 0],
    }
