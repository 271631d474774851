"""The monitor's server time at scale: every page with 1,000,000 finished invocations and 20,000 waiting, on PostgreSQL.

    KEYJOBS_BENCH_DB=kjb_monitor .venv/bin/python -m bench.monitor            # builds the data set, then times
    KEYJOBS_BENCH_DB=kjb_monitor .venv/bin/python -m bench.monitor --reuse    # times the data set already there

It (re)creates the database ``KEYJOBS_BENCH_DB`` (default ``kjb_monitor``) on 127.0.0.1, migrates it, and
writes with a few INSERT ... SELECT FROM generate_series statements what a day of a busy fleet leaves: a
million finished invocations of 20 tasks over 10,000 keys across the last 24 hours (3 history rows each, 5 for
the one in ten that was parked behind its key, 4 % failed, 2 % dropped), then 20,000 waiting on 200 keys.
The rollup duty then reads that history as runners would (``keyjobs.rollup.roll_up``, timed: its cost per
history row is the statistics' whole price, since recording an outcome writes nothing to it).

Each page is asked for through Django's test client as a superuser, once to warm up and then ``--requests``
times; the table gives the median and the slowest (server time: the whole request, authentication and
rendering included, without a network), against the target of 300 ms.
"""

import argparse
import os
import statistics
import sys
import time
from datetime import timedelta

TARGET_MS = 300.0
INVOCATIONS = 1_000_000
WAITING = 20_000
TASKS = 20
KEYS = 10_000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.monitor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reuse", action="store_true", help="Time the data set already in the database.")
    parser.add_argument("--requests", type=int, default=5, help="Requests to time per page (default %(default)s).")
    parser.add_argument("--invocations", type=int, default=INVOCATIONS, help="Finished ones (default %(default)s).")
    options = parser.parse_args(argv)

    name = os.environ.get("KEYJOBS_BENCH_DB", "kjb_monitor")
    os.environ["DATABASE_URL"] = f"postgres://postgres@127.0.0.1:5432/{name}"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo_project.settings")
    if not options.reuse:
        import psycopg

        with psycopg.connect("postgres://postgres@127.0.0.1:5432/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.execute(f'CREATE DATABASE "{name}"')
    import django

    django.setup()
    from django.conf import settings

    settings.DEBUG = False  # no query log: it would grow with every page
    settings.ALLOWED_HOSTS = ["*"]
    if not options.reuse:
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        build(options.invocations)
    roll()
    return time_pages(options.requests)


def build(count: int) -> None:
    """Write the data set in bulk, then roll it up; print how long each part took."""
    from django.db import connection


    began = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO keyjobs_runner (host, pid, threads, queues, started_at, heartbeat_at, stop_reason, lost) "
            "SELECT 'bench-' || n, 1000 + n, 8, '', NOW() - interval '1 day', NOW(), '', false "
            "FROM generate_series(1, 4) AS n")
        # Finished: one every 86.4 ms over the last day; 2 % dropped, 4 % of the rest failed; runs of 50 to
        # 1,550 ms after a wait of 5 to 2,005 ms.
        cursor.execute(f"""
            INSERT INTO keyjobs_invocation (id, task_name, queue, priority, args, kwargs, running_key, slot,
                running_limit, status, runner_id, runner_thread, attempts, error, error_type, traceback, created_at,
                registered_at, started_at, finished_at, cancel_requested, cause_event, cause_status, return_value,
                recoveries, waiters)
            SELECT n, 'bench.tasks.task_' || (n % {TASKS}), 'default', 0, '[]'::jsonb,
                jsonb_build_object('account_id', 'account-' || (n % {KEYS})),
                '{{"account_id":"account-' || (n % {KEYS}) || '"}}', 0, 1,
                CASE WHEN n % 50 = 0 THEN 'CONCURRENCY_CONTROLLED_FINAL' WHEN n % 25 = 1 THEN 'FAILED'
                     ELSE 'SUCCESS' END,
                CASE WHEN n % 50 = 0 THEN NULL ELSE (SELECT min(id) FROM keyjobs_runner) + n % 4 END,
                CASE WHEN n % 50 = 0 THEN NULL ELSE n % 8 END,
                CASE WHEN n % 50 = 0 THEN 0 ELSE 1 END,
                CASE WHEN n % 25 = 1 THEN 'ValueError: the provider said no' ELSE '' END,
                CASE WHEN n % 25 = 1 THEN 'builtins.ValueError' ELSE '' END, '',
                c, c,
                CASE WHEN n % 50 = 0 THEN NULL ELSE c + w END,
                CASE WHEN n % 50 = 0 THEN c ELSE c + w + d END,
                false, '', '', CASE WHEN n % 25 = 1 OR n % 50 = 0 THEN NULL ELSE '"ok"'::jsonb END, 0, 0
            FROM (SELECT n, NOW() - interval '1 day' + n * interval '86.4 milliseconds' AS c,
                         (5 + n % 2000) * interval '1 millisecond' AS w,
                         (50 + (n * 7) % 1500) * interval '1 millisecond' AS d
                  FROM generate_series(1, {count}) AS n) AS s""")
        finished = time.perf_counter()
        # Their histories, in the order they happened: parked (one in ten) and woken, claimed, started, ended.
        cursor.execute("""
            INSERT INTO keyjobs_event (invocation_id, kind, from_status, to_status, at, runner_id, runner_thread, note)
            SELECT i.id, 'TRANSITION', step.came, CASE WHEN step.went = 'END' THEN i.status ELSE step.went END,
                   CASE step.n WHEN 0 THEN i.created_at + interval '1 millisecond'
                               WHEN 1 THEN i.started_at - interval '2 millisecond'
                               WHEN 2 THEN i.started_at - interval '1 millisecond'
                               WHEN 3 THEN i.started_at ELSE i.finished_at END,
                   i.runner_id, i.runner_thread,
                   CASE step.n WHEN 0 THEN 'its key was busy: parked until it frees'
                               WHEN 1 THEN 'its key freed: its turn' ELSE '' END
            FROM keyjobs_invocation AS i
            CROSS JOIN (VALUES (0, 'REGISTERED', 'REROUTED'), (1, 'REROUTED', 'REGISTERED'),
                               (2, 'REGISTERED', 'PENDING'), (3, 'PENDING', 'RUNNING'), (4, 'RUNNING', 'END'))
                AS step(n, came, went)
            WHERE i.status <> 'CONCURRENCY_CONTROLLED_FINAL' AND (step.n >= 2 OR i.id % 10 = 3)
            UNION ALL
            SELECT i.id, 'TRANSITION', 'REGISTERED', 'CONCURRENCY_CONTROLLED_FINAL', i.finished_at, NULL, NULL,
                   'its key was busy: dropped'
            FROM keyjobs_invocation AS i WHERE i.status = 'CONCURRENCY_CONTROLLED_FINAL'
            ORDER BY 5, 1""")
        history = time.perf_counter()
        # Waiting now: 20,000 on 200 keys of one task, the first of each key registered, the rest parked.
        cursor.execute(f"""
            INSERT INTO keyjobs_invocation (id, task_name, queue, priority, args, kwargs, running_key, slot,
                running_limit, status, attempts, error, error_type, traceback, created_at, registered_at,
                cancel_requested, cause_event, cause_status, recoveries, waiters)
            SELECT {count} + n, 'bench.tasks.waiting', 'default', 0, '[]'::jsonb,
                jsonb_build_object('account_id', 'hot-' || (n % 200)), '{{"account_id":"hot-' || (n % 200) || '"}}',
                0, 1, CASE WHEN n <= 200 THEN 'REGISTERED' ELSE 'REROUTED' END, 0, '', '', '',
                NOW() - interval '5 minutes' + n * interval '15 milliseconds',
                NOW() - interval '5 minutes' + n * interval '15 milliseconds', false, '', '', 0, 0
            FROM generate_series(1, {WAITING}) AS n""")
        cursor.execute("""
            INSERT INTO keyjobs_event (invocation_id, kind, from_status, to_status, at, note)
            SELECT id, 'TRANSITION', 'REGISTERED', 'REROUTED', created_at + interval '1 millisecond',
                   'its key was busy: parked until it frees'
            FROM keyjobs_invocation WHERE status = 'REROUTED' ORDER BY id""")
        cursor.execute("SELECT setval(pg_get_serial_sequence('keyjobs_invocation', 'id'), "
                       "(SELECT max(id) FROM keyjobs_invocation))")
        cursor.execute("ANALYZE")
        cursor.execute("SELECT count(*) FROM keyjobs_event")
        (events,) = cursor.fetchone()
    built = time.perf_counter()
    print(f"data set: {count:,} finished invocations in {finished - began:.1f} s, their {events:,} history rows in "
          f"{history - finished:.1f} s, {WAITING:,} waiting in {built - history:.1f} s "
          f"({built - began:.1f} s in all, bulk SQL)")


def roll() -> None:
    """Bring the rollup up to date as the runners' duty would, and print what it costs per history row.

    The duty's own work is timed on the last hour of the history (about 40,000 invocations and their 130,000
    rows). The 23 hours before it are added up by one SQL aggregate per table instead (the same counters and
    buckets, by each invocation's end), which takes seconds where the duty would take half an hour on this
    shared 2-core machine: the pages read the same rows either way.
    """
    from django.db import connection, transaction

    from keyjobs import rollup
    from keyjobs.models import BUCKETS_MS

    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM keyjobs_rollupmark")
        (marked,) = cursor.fetchone()
        if not marked:
            # All or nothing, whatever was left by a run cut short (the shared PostgreSQL restarts at times).
            cursor.execute("TRUNCATE keyjobs_taskminute, keyjobs_keyminute, keyjobs_tasktotal")
            began = time.perf_counter()
            bounds = [0, *BUCKETS_MS]
            buckets = [
                f"sum(CASE WHEN {{m}} > {low} {f'AND {{m}} <= {high}' if high is not None else ''} THEN 1 ELSE 0 END)"
                for low, high in zip(bounds, [*BUCKETS_MS, None], strict=True)]
            duration = "(extract(epoch FROM finished_at - started_at) * 1000)"
            wait = "(extract(epoch FROM started_at - created_at) * 1000)"
            histograms = ", ".join([*(b.format(m=duration) for b in buckets), *(b.format(m=wait) for b in buckets)])
            names = ", ".join([*(f"d_{bound}" for bound in (*BUCKETS_MS, "inf")),
                               *(f"w_{bound}" for bound in (*BUCKETS_MS, "inf"))])
            counters = ("count(*), count(started_at), count(*) FILTER (WHERE status = 'SUCCESS'), "
                        "count(*) FILTER (WHERE status = 'FAILED'), 0, 0, "
                        "count(*) FILTER (WHERE status = 'CONCURRENCY_CONTROLLED_FINAL'), 0, "
                        "count(*) FILTER (WHERE id % 10 = 3 AND started_at IS NOT NULL), 0, count(started_at), "
                        f"coalesce(sum({duration}), 0)::bigint, count(started_at), coalesce(sum({wait}), 0)::bigint, "
                        f"coalesce(max({wait}), 0)::bigint")
            columns = ("enqueued, started, succeeded, failed, retried, cancelled, dropped, merged, parked, deferred, "
                       f"runs, duration_ms, waits, wait_ms, wait_max_ms, {names}")
            old = "FROM keyjobs_invocation WHERE finished_at < NOW() - interval '1 hour'"
            for table, keys, group in (
                ("keyjobs_taskminute", "task_name, minute", "task_name, date_trunc('minute', finished_at)"),
                ("keyjobs_keyminute", "task_name, key, minute",
                 "task_name, running_key, date_trunc('minute', finished_at)"),
                ("keyjobs_tasktotal", "task_name", "task_name"),
            ):
                cursor.execute(f"INSERT INTO {table} ({keys}, {columns}) SELECT {group}, {counters}, {histograms} "
                               f"{old} GROUP BY {group}")
            cursor.execute("INSERT INTO keyjobs_rollupmark (name, last_id, gaps) VALUES "
                           "('invocations', (SELECT coalesce(max(id), 0) FROM keyjobs_invocation WHERE "
                           "finished_at < NOW() - interval '1 hour' AND status <> 'REROUTED'), '{}'), "
                           "('events', (SELECT coalesce(max(e.id), 0) FROM keyjobs_event AS e JOIN keyjobs_invocation "
                           "AS i ON i.id = e.invocation_id WHERE i.finished_at < NOW() - interval '1 hour'), '{}')")
            print(f"rollup of the 23 hours before the last: one SQL aggregate per table, "
                  f"{time.perf_counter() - began:.1f} s")
    rollup.BATCH = 20_000
    rollup.ROUNDS = 1
    read, cpu, wall = 0, 0.0, 0.0
    while True:
        began_cpu, began = time.process_time(), time.perf_counter()
        try:
            done = rollup.roll_up(using="default")
        except Exception as exc:  # the machine's PostgreSQL restarted under us: go on from where the marks are
            print(f"rollup: {exc}; again in 5 s")
            connection.close()
            time.sleep(5)
            continue
        cpu += time.process_time() - began_cpu
        wall += time.perf_counter() - began
        read += done
        if not done:
            break
    rollup.sample_depth(using="default")
    if read:
        print(f"rollup duty: {read:,} rows (invocations and history) read in {wall:.1f} s: {wall / read * 1e6:.0f} µs "
              f"each, of which {cpu / read * 1e6:.0f} µs this process's CPU; batches of {rollup.BATCH:,}. "
              f"Recording an outcome adds no statement.")
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")


def time_pages(requests: int) -> int:
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client
    from django.urls import reverse

    from keyjobs.models import Event, Invocation

    user = get_user_model().objects.filter(username="bench").first() or get_user_model().objects.create_superuser(
        "bench", "bench@example.com", "bench")
    client = Client()
    client.force_login(user)
    # An invocation that was parked behind its key, then ran: its page names whom it waited behind.
    parked = Event.objects.filter(to_status="REGISTERED", from_status="REROUTED").order_by("-id").values_list(
        "invocation_id", flat=True)[:1].get()
    finished = Invocation.objects.filter(status="FAILED").order_by("-id").values_list("id", flat=True)[:1].get()
    hot_key = Invocation.objects.filter(status="REROUTED").order_by("id").first() or Invocation.objects.get(pk=parked)
    # The timeline's window: the last 15 minutes of the finished work, however long ago the data set was made.
    from urllib.parse import urlencode

    from django.db.models import Max

    ended = Invocation.objects.filter(status="SUCCESS").aggregate(end=Max("finished_at"))["end"]
    window = urlencode({"from": (ended - timedelta(minutes=15)).isoformat(), "to": ended.isoformat()})
    key_query = f"?task={hot_key.task_name}&key={hot_key.running_key}"
    pages: list[tuple[str, str]] = [
        ("dashboard", reverse("admin:keyjobs_invocation_dashboard")),
        ("tasks, 1 hour", reverse("admin:keyjobs_invocation_tasks") + "?minutes=60"),
        ("tasks, 7 days", reverse("admin:keyjobs_invocation_tasks") + "?minutes=10080"),
        ("keys, 15 minutes", reverse("admin:keyjobs_invocation_keys") + "?minutes=15"),
        ("keys, 1 hour", reverse("admin:keyjobs_invocation_keys") + "?minutes=60"),
        ("logs", reverse("admin:keyjobs_invocation_logs")),
        ("timeline page, 15 busy minutes", reverse("admin:keyjobs_invocation_timeline") + "?" + window),
        ("timeline data, 15 busy minutes", reverse("admin:keyjobs_invocation_timeline_data") + "?" + window),
        ("key view, a hot key (100 waiting)", reverse("admin:keyjobs_invocation_key") + key_query),
        ("schedules", reverse("admin:keyjobs_invocation_schedules")),
        ("invocation list", reverse("admin:keyjobs_invocation_changelist")),
        ("invocation list, failed", reverse("admin:keyjobs_invocation_changelist") + "?status__exact=FAILED"),
        ("invocation, parked then run", reverse("admin:keyjobs_invocation_change", args=[parked])),
        ("invocation, failed", reverse("admin:keyjobs_invocation_change", args=[finished])),
        ("runner list", reverse("admin:keyjobs_runner_changelist")),
        ("metrics", "/keyjobs/metrics"),
    ]
    print(f"\ndatabase: {connection.vendor} {connection.settings_dict['NAME']}; "
          f"{Invocation.objects.count():,} invocations, {Event.objects.count():,} history rows\n")
    print(f"{'page':<48} {'median':>9} {'slowest':>9} {'size':>9}  ok (<= {TARGET_MS:.0f} ms)")
    failed = 0
    for title, url in pages:
        response = client.get(url)
        assert response.status_code == 200, (title, response.status_code)
        times: list[float] = []
        for _ in range(requests):
            start = time.perf_counter()
            response = client.get(url)
            times.append((time.perf_counter() - start) * 1000)
        middle = statistics.median(times)
        ok = middle <= TARGET_MS
        failed += not ok
        print(f"{title:<48} "
              f"{middle:>7.0f}ms {max(times):>7.0f}ms {len(response.content) / 1000:>7.0f}kB  {'yes' if ok else 'NO'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
