"""The metrics endpoint: Prometheus' text format, written from the rollup and the invocations' status indexes.

Why not ``prometheus_client``: its registry counts what happens in the process that serves the scrape, and
keyjobs' work happens in runner processes on other hosts. The rollup (``keyjobs.rollup``) already adds up
every runner's history in the database, so any web process answers for the whole fleet, and the app keeps
depending on Django alone. The tests parse the output with ``prometheus_client``'s own parser.

Counters and histograms per task come from ``TaskTotal`` (they lag the history by up to a heartbeat, the
rollup's round); the gauges are read now: invocations waiting per task, runners alive, and the age of the
oldest waiting invocation, on the database's clock.
"""

import hmac
from collections.abc import Iterator
from typing import Any

from django.db.models import Count
from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from ..conf import conf
from ..models import BUCKETS_MS, DURATION_BUCKETS, WAIT_BUCKETS, Invocation, Runner, TaskTotal
from ..store import store
from .queries import waiting_since

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: The counters, each: (metric name, help, TaskTotal column, extra labels).
COUNTERS: tuple[tuple[str, str, str, dict[str, str]], ...] = (
    ("keyjobs_enqueued_total", "Invocations created.", "enqueued", {}),
    ("keyjobs_started_total", "Runs started (a retry's too).", "started", {}),
    ("keyjobs_finished_total", "Invocations that ended, or attempts that failed and will be retried, by status.",
     "succeeded", {"status": "success"}),
    ("keyjobs_finished_total", "", "failed", {"status": "failed"}),
    ("keyjobs_finished_total", "", "retried", {"status": "retry"}),
    ("keyjobs_finished_total", "", "cancelled", {"status": "cancelled"}),
    ("keyjobs_finished_total", "", "dropped", {"status": "dropped"}),
    ("keyjobs_merged_total", "Calls merged into a waiting invocation (deduplicated or debounced).", "merged", {}),
    ("keyjobs_parked_total", "Invocations parked because their key was busy.", "parked", {}),
    ("keyjobs_deferred_total", "Invocations deferred by their key's rate window.", "deferred", {}),
)
HISTOGRAMS = (
    ("keyjobs_run_duration_seconds", "How long runs took, by the task's histogram buckets.", "runs", "duration_ms",
     DURATION_BUCKETS),
    ("keyjobs_wait_seconds", "From the enqueue to the first start.", "waits", "wait_ms", WAIT_BUCKETS),
)


def allowed(request: HttpRequest) -> bool:
    """Whether the request carries the token of ``KEYJOBS_METRICS_TOKEN`` (``Authorization: Bearer``) or is staff's."""
    token = conf.METRICS_TOKEN
    given = request.headers.get("Authorization", "")
    if token and given.startswith("Bearer ") and hmac.compare_digest(given[len("Bearer "):].encode(), token.encode()):
        return True
    user = getattr(request, "user", None)
    return bool(user is not None and user.is_active and user.is_staff)


@never_cache
@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """Answer a scrape: the text format of every counter, histogram and gauge; 403 unless allowed."""
    if not allowed(request):
        response = HttpResponse("Forbidden: send the KEYJOBS_METRICS_TOKEN as a bearer token, or log in as staff.\n",
                                status=403, content_type="text/plain; charset=utf-8")
        response["WWW-Authenticate"] = 'Bearer realm="keyjobs metrics"'
        return response
    return HttpResponse("".join(lines(conf.DATABASE)), content_type=CONTENT_TYPE)


def label(value: str) -> str:
    """Return a label value escaped as the text format wants it."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{name}="{label(value)}"' for name, value in labels.items()) + "}"


def lines(using: str) -> Iterator[str]:
    """Yield the exposition, line by line: three queries for the gauges, one for the rollup."""
    totals: list[dict[str, Any]] = [dict(row) for row in TaskTotal.objects.using(using).order_by("task_name").values()]
    described: set[str] = set()
    for name, help_text, column, extra in COUNTERS:
        if name not in described:
            described.add(name)
            yield f"# HELP {name} {help_text}\n# TYPE {name} counter\n"
        for row in totals:
            yield f"{name}{_labels({'task': row['task_name'], **extra})} {row[column]}\n"
    for name, help_text, count, total_ms, columns in HISTOGRAMS:
        yield f"# HELP {name} {help_text}\n# TYPE {name} histogram\n"
        for row in totals:
            task = {"task": row["task_name"]}
            cumulative = 0
            for bound, column in zip((*BUCKETS_MS, None), columns, strict=True):
                cumulative += row[column]
                le = "+Inf" if bound is None else f"{bound / 1000:g}"
                yield f"{name}_bucket{_labels({**task, 'le': le})} {cumulative}\n"
            yield f"{name}_sum{_labels(task)} {row[total_ms] / 1000:g}\n"
            yield f"{name}_count{_labels(task)} {row[count]}\n"

    invocations = Invocation.objects.using(using)
    waiting = dict(invocations.waiting().order_by().values_list("task_name").annotate(count=Count("id")))
    yield "# HELP keyjobs_waiting Invocations waiting to start (registered, parked, or waiting for a retry).\n"
    yield "# TYPE keyjobs_waiting gauge\n"
    for task_name in sorted({row["task_name"] for row in totals} | set(waiting)):
        yield f"keyjobs_waiting{_labels({'task': task_name})} {waiting.get(task_name, 0)}\n"
    yield "# HELP keyjobs_runners_alive Runners whose heartbeat is within the lease.\n# TYPE keyjobs_runners_alive gauge\n"
    yield f"keyjobs_runners_alive {Runner.objects.using(using).alive().filter(threads__gt=0).count()}\n"
    oldest = waiting_since(invocations)
    age = 0.0 if oldest is None else max(0.0, (store(using).clock() - oldest).total_seconds())
    yield ("# HELP keyjobs_oldest_waiting_age_seconds How long the oldest waiting invocation has waited "
           "(0 when none waits).\n# TYPE keyjobs_oldest_waiting_age_seconds gauge\n")
    yield f"keyjobs_oldest_waiting_age_seconds {age:.3f}\n"

