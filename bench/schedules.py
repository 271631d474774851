"""Schedules (issue 14): the scheduling duty's cost with 10,000 schedules, and a tick's start latency.

    .venv/bin/python -m bench.schedules [--db sqlite|postgres|both] [--quick]

- tick cost: with 10,000 schedules, the time (the least of several runs) and the queries of one run of
  the scheduling duty (``keyjobs.schedules.tick``) with nothing due, and with
  100 ticks due; then the same after 100,000 finished invocations are added,
  which must not change them (the ratio beside each row);
- tick latency: a tick's invocation start (``started_at``) after its due time
  (``cause_tick``), both on the database's clock, with one idle worker
  process and a schedule every 0.25 s. Goal on PostgreSQL: p50 under 3 ms.
"""

import sys
import time
from datetime import timedelta

from .harness import Recorder, Result, bench_main, latency_results, say

SCHEDULES = 10_000
DUE = 100
FINISHED = {True: 20_000, False: 100_000}
LATENCY_SAMPLES = {True: 40, False: 120}
TICK_GAP = timedelta(milliseconds=250)


def _make_schedules(count: int) -> None:
    from django.utils import timezone

    from keyjobs.models import Schedule

    later = timezone.now() + timedelta(hours=1)
    Schedule.objects.bulk_create(
        [Schedule(name=f"bench {n}", task_name="bench.tasks.noop", interval=timedelta(hours=1),
                  next_run=later + timedelta(seconds=n)) for n in range(count)],
        batch_size=2000,
    )


def _measure(rounds: int, due: int) -> tuple[float, int]:
    """Return the least milliseconds of ``rounds`` ticks with ``due`` schedules due, and the most queries.

    The least, not the median: on a shared machine other processes only ever add to a tick's time.
    """
    from django.db import connection
    from django.db.models.functions import Now
    from django.test.utils import CaptureQueriesContext

    from keyjobs.models import Schedule
    from keyjobs.schedules import tick

    times, queries = [], []
    for _ in range(rounds):
        if due:
            ids = list(Schedule.objects.order_by("?").values_list("pk", flat=True)[:due])
            Schedule.objects.filter(pk__in=ids).update(next_run=Now())
        with CaptureQueriesContext(connection) as captured:
            began = time.perf_counter()
            ticked = tick(using="default")
            times.append((time.perf_counter() - began) * 1000)
        assert ticked.enqueued == due, f"{ticked.enqueued} enqueued, {due} due"
        queries.append(len(captured))
    return min(times), max(queries)


def _add_finished(count: int) -> None:
    from django.utils import timezone

    from keyjobs.models import Invocation
    from keyjobs.status import Status

    now = timezone.now()
    Invocation.objects.bulk_create(
        [Invocation(task_name="bench.tasks.noop", queue="default", status=Status.SUCCESS, started_at=now,
                    finished_at=now) for _ in range(count)],
        batch_size=5000,
    )


def tick_cost(db: str, quick: bool) -> list[Result]:
    from bench import runs
    from keyjobs.models import Invocation, Schedule

    runs.clear()
    Schedule.objects.all().delete()
    _make_schedules(SCHEDULES)
    rounds = 100 if quick else 300
    # Each idle tick is measured after due ones, whose updates leave dead index entries behind them, so
    # that the two idle figures differ only by the finished invocations.
    due_ms, due_queries = _measure(rounds // 20, DUE)
    idle_ms, idle_queries = _measure(rounds, 0)
    _add_finished(FINISHED[quick])
    finished = Invocation.objects.finished().count()
    due_after_ms, due_after_queries = _measure(rounds // 20, DUE)
    idle_after_ms, idle_after_queries = _measure(rounds, 0)
    say(f"  {db:8} tick, {SCHEDULES:,} schedules: nothing due {idle_ms:.2f} ms / {idle_queries} queries; "
        f"{DUE} due {due_ms:.1f} ms / {due_queries} queries; after {finished:,} finished: "
        f"{idle_after_ms:.2f} ms / {idle_after_queries}, {due_after_ms:.1f} ms / {due_after_queries}")
    results = []
    for case, before, after, queries_before, queries_after in (
        ("nothing due", idle_ms, idle_after_ms, idle_queries, idle_after_queries),
        (f"{DUE} due", due_ms, due_after_ms, due_queries, due_after_queries),
    ):
        result = Result(14, "schedules", f"tick of {SCHEDULES:,} schedules, {case}, {finished:,} finished", db,
                        "keyjobs", after, "ms", reference=before, reference_label="with no finished invocations",
                        note=f"{queries_after} queries per tick (before the finished ones: {queries_before})",
                        extra={"queries": queries_after, "queries_before": queries_before})
        result.judge(after / before if before else None, at_most=1.5)
        if queries_after != queries_before:
            result.ok = False
        results.append(result)
    Schedule.objects.all().delete()
    runs.clear()
    return results


def tick_latency(db: str, quick: bool) -> list[Result]:
    from django.db.models import F
    from django.db.models.functions import Now

    from bench import runs, tasks
    from keyjobs.models import Invocation, Schedule

    runs.clear()
    Schedule.objects.all().delete()
    samples_wanted = LATENCY_SAMPLES[quick]
    with runs.Workers(1, 1, name=f"schedules-{db}") as pool:
        tasks.noop.delay()  # the first claim imports the task
        runs.wait_finished(1, timeout=30, workers=pool)
        runs.clear()
        schedule = Schedule.objects.create(name="bench latency", task_name="bench.tasks.noop", interval=TICK_GAP,
                                           next_run=Now())
        runs.wait_finished(samples_wanted + 2, timeout=120, workers=pool)
        Schedule.objects.filter(pk=schedule.pk).update(enabled=False)
    delays = (Invocation.objects.filter(cause_schedule=schedule).order_by("cause_tick")
              .annotate(delay=F("started_at") - F("cause_tick")).values_list("delay", flat=True))
    # The first tick is due the moment the row is written, before any runner has looked: left out.
    samples = [delay.total_seconds() * 1000 for delay in list(delays)[1:] if isinstance(delay, timedelta)]
    results = latency_results(14, "schedules", "tick due-to-start", db, samples, p99_goal=False,
                              note=f"{len(samples)} ticks every {TICK_GAP.total_seconds():g}s")
    say(f"  {db:8} tick to start p50 {results[0].measured:.2f} ms, p99 {results[1].measured:.2f} ms "
        f"({len(samples)} ticks)")
    Schedule.objects.all().delete()
    runs.clear()
    return results


def run_database(db: str, only: list[str], quick: bool, results: Recorder) -> None:
    from bench import runs

    runs.setup(db, name="kj_bench_schedules")
    rows = {"cost": tick_cost, "latency": tick_latency}
    for row in only:
        results.add(*rows[row](db, quick))


def main(argv: list[str] | None = None) -> int:
    return bench_main(argv, module="bench.schedules", doc=__doc__ or "", rows=("cost", "latency"),
                      quick_help="Fewer finished invocations and latency samples.", title="keyjobs schedules",
                      run=lambda args, results: run_database(args.db, args.only.split(","), args.quick, results))


if __name__ == "__main__":
    sys.exit(main())
