"""keyjobs' queue costs on one database: targets 2 to 6 of issue 6.

    .venv/bin/python -m bench.throughput [--db sqlite|postgres|both] [--quick] [--only drain,latency,...]

- drain: no-op invocations queued, then drained by one worker process;
- latency: enqueue-to-start (started_at - created_at) on an idle worker;
- enqueue: delay() one at a time, and delay_many() in one call;
- hotkey: a backlog for one key beside work for other keys;
- history: drain with a large history of finished invocations in the table.

Every figure comes from the database's clock or the bench's own, never from
the worker's log. Peers' figures are compared in ``python -m bench``.
"""

import sys
import time
from datetime import timedelta
from typing import Any

from .harness import (
    ProviderProcess,
    Recorder,
    Result,
    bench_main,
    latency_results,
    say,
    wait_for_postgres,
)
from .workloads import Sizes, Workload, latency_gaps, sizes

METRICS = ("drain", "latency", "enqueue", "hotkey", "history")
#: delay_many()'s goal: issue 6's 20,000 a second, raised to 30,000 on PostgreSQL by issue 22.
BULK_GOAL = {"sqlite": 20_000, "postgres": 30_000}


def drain_rate(count: int, threads: int, *, name: str, timeout: float) -> tuple[float | None, float]:
    """Start one worker on ``count`` queued no-op invocations; return (invocations/s, seconds)."""
    from bench import runs

    with runs.Workers(1, threads, name=name) as pool:
        runs.wait_finished(count, timeout=timeout, workers=pool, interval=0.1)
    elapsed, _ = runs.span()
    return (count / elapsed if elapsed else None), elapsed or 0.0


def drain(db: str, size: Sizes) -> list[Result]:
    from bench import runs, tasks

    runs.clear()
    tasks.noop.delay_many([((), {})] * size.drain)
    rate, elapsed = drain_rate(size.drain, size.drain_threads, name=f"drain-{db}", timeout=max(120.0, size.drain / 10))
    _, statuses = runs.span()
    say(f"  {db:8} no-op drain: {rate or 0:,.0f}/s ({size.drain} in {elapsed:.2f}s) {runs.describe(statuses)}")
    return [Result(3, "drain", f"no-op drain t{size.drain_threads}", db, "keyjobs", rate, "/s",
                   note=f"{size.drain} invocations {runs.describe(statuses)}".strip(),
                   extra={"elapsed": elapsed})]


def latency(db: str, size: Sizes) -> list[Result]:
    from django.db.models import F

    from bench import runs, tasks
    from keyjobs.models import Invocation

    runs.clear()
    with runs.Workers(1, size.drain_threads, name=f"latency-{db}") as pool:
        tasks.noop.delay()  # the first claim imports the task
        runs.wait_finished(1, timeout=30, workers=pool)
        runs.clear()
        for gap in latency_gaps(size.latency_samples):
            tasks.noop.delay()
            time.sleep(gap)
        runs.wait_finished(size.latency_samples, timeout=60, workers=pool)
    delays = Invocation.objects.annotate(delay=F("started_at") - F("created_at")).values_list("delay", flat=True)
    samples = [delay.total_seconds() * 1000 for delay in delays if isinstance(delay, timedelta)]
    how = "LISTEN/NOTIFY" if db == "postgres" else "polling"
    results = latency_results(4, "latency", "enqueue-to-start", db, samples, note=f"{len(samples)} samples, {how}")
    say(f"  {db:8} latency p50 {results[0].measured:.1f} ms, p99 {results[1].measured:.1f} ms")
    return results


def commit_floor(count: int) -> float:
    """Transactions per second of the fastest durable write a client can make: a one-row INSERT, each its own
    transaction, on the database driver's connection (no Django, no keyjobs). A serial delay() cannot beat it:
    on PostgreSQL each commit waits for its WAL to reach the disk."""
    from django.db import connection

    connection.ensure_connection()
    raw = connection.connection  # in autocommit, as Django leaves it outside atomic()
    cursor = raw.cursor()
    cursor.execute("CREATE TABLE IF NOT EXISTS bench_commit_floor (n integer)")
    try:
        start = time.perf_counter()
        for n in range(count):
            cursor.execute("INSERT INTO bench_commit_floor (n) VALUES (%s)" if connection.vendor == "postgresql"
                           else "INSERT INTO bench_commit_floor (n) VALUES (?)", [n])
        return count / (time.perf_counter() - start)
    finally:
        cursor.execute("DROP TABLE bench_commit_floor")
        cursor.close()


def enqueue(db: str, size: Sizes) -> list[Result]:
    from bench import runs, tasks

    runs.clear()
    tasks.noop.delay()  # the connection opens on first use
    floor = commit_floor(size.enqueue_single)
    say(f"  {db:8} commit floor: {floor:,.0f} one-row transactions/s")
    results = [Result(5, "enqueue", "commit floor: one-row INSERT per transaction", db, "driver", floor, "/s",
                      note=f"x {size.enqueue_single}, no Django; a serial delay() cannot beat it")]
    for task, label in ((tasks.noop, "no-op"), (tasks.call, "keyed")):
        args: tuple[Any, ...] = () if task is tasks.noop else ("acct", "op")
        start = time.perf_counter()
        for _ in range(size.enqueue_single):
            task.delay(*args)
        single = size.enqueue_single / (time.perf_counter() - start)
        say(f"  {db:8} delay() one at a time, {label}: {single:,.0f}/s")
        results.append(Result(5, "enqueue", f"enqueue one at a time ({label})", db, "keyjobs", single, "/s",
                              note=f"delay() x {size.enqueue_single}; {single / floor:.2f}x the commit floor"
                                   + ("; issue 22's goal 2,500/s" if db == "postgres" else "")))
    runs.clear()
    calls = [((), {})] * size.enqueue_bulk
    start = time.perf_counter()
    tasks.noop.delay_many(calls)
    bulk = size.enqueue_bulk / (time.perf_counter() - start)
    runs.clear()
    say(f"  {db:8} delay_many(): {bulk:,.0f}/s")
    goal = BULK_GOAL[db]
    results.append(Result(5, "enqueue", "enqueue in bulk", db, "keyjobs", bulk, "/s", goal, "goal",
                          note=f"delay_many() of {size.enqueue_bulk}").judge(bulk / goal, at_least=1.0))
    return results


#: Target 2's other keys: 100 accounts x 5 calls of 20 ms on 8 threads.
OTHERS = Workload("others", 100, 5, 0.02, 8)


#: The other keys' least share of their rate alone beside a hot key of limit 1: that key takes at most one
#: of the T threads, so 0.95 x (T - 1) / T (issue 12: "at most its limit threads").
BESIDE_HOT_KEY = round(0.95 * (OTHERS.threads - 1) / OTHERS.threads, 3)


def hotkey(db: str, size: Sizes) -> list[Result]:
    """Other keys' rate with and without a backlog of no-op invocations for one hot key.

    Both runs start on idle workers, and the other keys' time runs from the
    commit of their enqueue to the last one's end: time spent getting past
    the backlog counts.
    """
    from django.db import transaction
    from django.utils import timezone

    from bench import runs, tasks
    from keyjobs.models import Invocation

    calls = [((account, op), {}) for account, op in OTHERS.calls_in("interleaved")]
    others = Invocation.objects.filter(task_name=tasks.call.name)
    hot = Invocation.objects.filter(task_name=tasks.noop_keyed.name)

    def others_seconds(backlog: int, pool: runs.Workers, timeout: float) -> tuple[float | None, str]:
        runs.clear()
        provider.reset(OTHERS.seconds)
        with transaction.atomic():
            tasks.noop_keyed.delay_many([(("hot",), {})] * backlog)
            tasks.call.delay_many(calls)
        committed = timezone.now()
        try:
            runs.wait_until(lambda: others.finished().count() >= len(calls), timeout=timeout, interval=0.1,
                            what="the other keys' work", processes=pool.processes)
        except TimeoutError:
            return None, f"cut at {timeout:.0f}s with {others.finished().count()} of {len(calls)} final"
        last = others.finished().order_by("-finished_at").values_list("finished_at", flat=True).first()
        return (last - committed).total_seconds(), ""

    with ProviderProcess() as provider:
        with runs.Workers(1, OTHERS.threads, name=f"hotkey-{db}", env={"PROVIDER_URL": provider.url}) as pool:
            alone, _ = others_seconds(0, pool, 120.0)
        with runs.Workers(1, OTHERS.threads, name=f"hotkey-{db}", env={"PROVIDER_URL": provider.url}) as pool:
            # Five times slower than alone is far below the goal: no need to wait longer.
            beside, cut = others_seconds(size.hot_backlog, pool, max(20.0, 5 * (alone or 24.0)))
            others_end = time.monotonic()
            # Then the hot key alone, for a while.
            runs.wait_until(lambda: hot.finished().count() >= size.hot_backlog
                            or time.monotonic() - others_end > size.history_window,
                            timeout=size.history_window + 30, interval=0.1, what="the hot key",
                            processes=pool.processes)
        _, statuses = runs.span(others)
        collisions = provider.stats()["collisions"]
    results = []
    rate_alone = len(calls) / alone if alone else None
    rate_beside = len(calls) / beside if beside else None
    ratio = rate_beside / rate_alone if rate_beside and rate_alone else None
    note = cut or (f"{size.hot_backlog} hot invocations ahead of them; {collisions} collisions "
                   f"{runs.describe(statuses)}").strip()
    say(f"  {db:8} other keys: {rate_alone or 0:,.0f}/s alone, {rate_beside or 0:,.0f}/s beside the hot key")
    results.append(Result(2, "hotkey", "other keys' rate beside a hot backlog", db, "keyjobs", rate_beside, "/s",
                          rate_alone, "alone", note=note).judge(ratio, at_least=BESIDE_HOT_KEY))
    # The hot key's own drain, beside the others and after them: a freed key keeps its place in the queue
    # (issue 12), so its chain runs beside the other keys' work rather than only after it.
    hot_rate = _hot_rate(hot)
    say(f"  {db:8} hot key drains {hot_rate or 0:,.0f}/s")
    results.append(Result(2, "hotkey", "hot key's own no-op drain", db, "keyjobs", hot_rate, "/s", 300, "goal",
                          note="one key, serial, beside and after the other keys' work")
                   .judge(hot_rate / 300 if hot_rate else None, at_least=1.0))
    return results


def _hot_rate(hot: Any) -> float | None:
    """The hot key's invocations finished per second, from its first start to its last end."""
    from django.db.models import Count, Max, Min

    bounds = hot.finished().aggregate(first=Min("started_at"), last=Max("finished_at"), n=Count("id"))
    if not bounds["n"] or bounds["first"] is None:
        return None
    seconds = (bounds["last"] - bounds["first"]).total_seconds()
    return bounds["n"] / seconds if seconds else None


def history(db: str, size: Sizes, empty_rate: float | None) -> list[Result]:
    """Drain with ``history_finished`` finished invocations and ``history_waiting`` waiting ones in the table."""
    from django.core.management import get_commands
    from django.db import connection, transaction

    from bench import runs, tasks
    from keyjobs.models import Invocation

    runs.clear()
    if empty_rate is None:
        tasks.noop.delay_many([((), {})] * size.drain)
        empty_rate, _ = drain_rate(size.drain, size.drain_threads, name=f"history-{db}", timeout=300)
        runs.clear()
    start = time.perf_counter()
    _fill_history(size.history_finished, size.history_waiting)
    filled = time.perf_counter() - start
    say(f"  {db:8} history: {size.history_finished:,} finished + {size.history_waiting:,} waiting in {filled:.0f}s")
    from keyjobs.store import store

    query, params = store("default").claimable_sql('"id"', None, 1)  # the statement the claim runs
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"{connection.ops.explain_query_prefix()} {query}", params)
        plan = "\n".join(str(row[-1]) for row in cursor.fetchall())
    # The claim must read the queue in order from its index, not sort every waiting row.
    uses_index = "keyjobs_claim" in plan and "Sort" not in plan and "TEMP B-TREE" not in plan
    first_waiting = Invocation.objects.filter(status="REGISTERED").order_by("id").values_list("id", flat=True).first()
    drained = Invocation.objects.filter(id__gte=first_waiting or 0)
    with runs.Workers(1, size.drain_threads, name=f"history-{db}"):
        time.sleep(size.history_window)
    seconds, _ = runs.span(drained.finished())
    count = drained.finished().count()
    rate = count / seconds if seconds else None
    prune = sorted(name for name, app in get_commands().items() if app == "keyjobs" and "prune" in name)
    claim = "claim reads keyjobs_claim in order" if uses_index else "claim sorts the waiting rows"
    note = f"{claim}; prune command: {', '.join(prune) or 'none'}"
    say(f"  {db:8} drain with history: {rate or 0:,.0f}/s (empty table {empty_rate or 0:,.0f}/s); {note}")
    ratio = rate / empty_rate if rate and empty_rate else None
    result = Result(6, "history", f"drain beside {size.history_finished:,} finished, {size.history_waiting:,} waiting",
                    db, "keyjobs", rate, "/s", empty_rate, "empty", note=note,
                    extra={"plan": plan, "fill_seconds": filled}).judge(ratio, at_least=0.80)
    if not uses_index or not prune:
        result.ok = False
    return [result]


def _fill_history(finished: int, waiting: int) -> None:
    """Insert ``finished`` finished invocations (two events each) and ``waiting`` registered no-ops, in SQL."""
    from django.db import connection, transaction
    from django.utils import timezone

    from bench import tasks
    from keyjobs.models import Event, Invocation

    now = timezone.now()
    done = Invocation(task_name=tasks.call.name, queue="default", args=["acct", "op"], kwargs={},
                      running_key="k", status="SUCCESS", attempts=1, created_at=now - timedelta(hours=1),
                      started_at=now - timedelta(hours=1), finished_at=now - timedelta(hours=1))
    queued = Invocation(task_name=tasks.noop.name, queue="default", created_at=now)
    event = Event(invocation_id=0, from_status="RUNNING", to_status="SUCCESS", at=now - timedelta(hours=1))
    series = ("SELECT n FROM generate_series(1, %s) AS n" if connection.vendor == "postgresql" else
              "WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < %s) SELECT n FROM s")
    with transaction.atomic():
        _insert_series(done, series, finished, {"running_key": "'acct' || (n %% 5000)"})
        _insert_series(queued, series, waiting, {})
        table = connection.ops.quote_name(Invocation._meta.db_table)
        # Two events for each finished invocation, as its history would hold.
        for _ in range(2):
            columns, values = _row(event, {"invocation_id": "i.id"})
            with connection.cursor() as cursor:
                cursor.execute(f"INSERT INTO {connection.ops.quote_name(Event._meta.db_table)} ({columns}) "
                               f"SELECT {values['sql']} FROM {table} i WHERE i.status = 'SUCCESS'", values["params"])
    with connection.cursor() as cursor:
        # A table that grew to this size over time has been vacuumed by autovacuum on the way;
        # without this, autovacuum's first pass over the million rows lands in the measured window.
        cursor.execute("VACUUM ANALYZE" if connection.vendor == "postgresql" else "ANALYZE")


def _row(instance: Any, expressions: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """Return the column list and the values of ``instance`` as SQL, some fields replaced by ``expressions``."""
    from django.db import connection
    from django.db.models.expressions import DatabaseDefault

    columns, sql, params = [], [], []
    for field in instance._meta.concrete_fields:
        if field.primary_key:
            continue
        value = field.pre_save(instance, add=True)
        if isinstance(value, DatabaseDefault):
            continue
        columns.append(connection.ops.quote_name(field.column))
        if field.name in expressions or field.attname in expressions:
            sql.append(expressions.get(field.name, expressions.get(field.attname, "")))
        else:
            sql.append("%s")
            params.append(field.get_db_prep_save(value, connection))
    return ", ".join(columns), {"sql": ", ".join(sql), "params": params}


def _insert_series(instance: Any, series: str, count: int, expressions: dict[str, str]) -> None:
    from django.db import connection

    if count <= 0:
        return
    columns, values = _row(instance, expressions)
    table = connection.ops.quote_name(instance._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(f"INSERT INTO {table} ({columns}) SELECT {values['sql']} FROM ({series}) AS series",
                       [*values["params"], count])


def run_database(db: str, only: set[str], size: Sizes, results: Recorder) -> None:
    from django.db import DatabaseError, connections

    from bench import runs

    runs.setup(db)
    empty_rate = None
    for metric in METRICS:
        if metric not in only:
            continue
        for attempt in (1, 2):
            try:
                if metric == "drain":
                    found = drain(db, size)
                    empty_rate = found[0].measured
                elif metric == "history":
                    found = history(db, size, empty_rate)
                else:
                    found = globals()[metric](db, size)
                break
            except Exception as exc:
                say(f"  {db:8} {metric}: {type(exc).__name__}: {exc}")
                connections.close_all()  # the server may have restarted under us: reconnect
                found = [Result({"hotkey": 2, "drain": 3, "latency": 4, "enqueue": 5, "history": 6}[metric], metric,
                                metric, db, "keyjobs", None, "", note=str(exc)[:120], ok=False)]
                if attempt == 1 and isinstance(exc, DatabaseError) and (db != "postgres" or wait_for_postgres()):
                    say(f"  {db:8} {metric}: once more")
                    continue
                break
        results.add(*found)


def main(argv: list[str] | None = None) -> int:
    return bench_main(argv, module="bench.throughput", doc=__doc__ or "", rows=tuple(METRICS),
                      quick_help="Smaller counts and windows.", title="keyjobs: queue costs",
                      run=lambda args, results: run_database(args.db, set(args.only.split(",")), sizes(args.quick),
                                                             results))


if __name__ == "__main__":
    sys.exit(main())
