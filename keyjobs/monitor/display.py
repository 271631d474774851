"""How the admin and the monitor show values: colours, badges, labels, durations, links, epoch times.

Pure functions of what they are given: nothing here reads the database.
"""

import json
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from django.urls import reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.timesince import timesince

from ..concurrency import key_label
from ..models import Invocation, Runner, Schedule
from ..status import Status
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
    """Return a duration as a person reads it: ``2.50 s``, ``3 min 04 s``, ``1 h 05 min``."""
    seconds = delta.total_seconds()
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"


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
    ]


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
