"""Large arguments (issue 26): the queue's speed with 100 KB arguments kept in the rows or stored apart, and 1,000
invocations sharing one 2 MB value.

    .venv/bin/python -m bench.values [--quick] [--db sqlite|postgres|both] [--only claim,drain,list,shared]

Each of the first three rows runs twice on the same data: with every argument
in its invocation's row (``KEYJOBS_INLINE_VALUE_BYTES`` raised past them, as
keyjobs stored them before values were stored apart), then out of line (the
default 8 KB threshold); the ratio is out-of-line over inline, lower is
better. Every invocation carries its own 100 KB argument (hex of random
bytes: nothing shared, little for the database to compress).

- claim: seconds to claim every invocation, ten a claim, as a runner's threads do;
- drain: seconds for a burst runner of four threads to run them all (a no-op
  task whose run reads its argument: stored apart, one more query a run);
- list: milliseconds to render the admin's list of invocations (50 a page).

Every figure is a time (lower is better), and the ratio is stored apart over inline.

The shared row enqueues 1,000 calls that share one 2 MB argument
(``delay_many()``, one batch) and reports the bytes the tables grew by; the
same calls inline are measured on a few and scaled, since a thousand copies of
2 MB would take 2 GB. CPU and wall time are both given: the machine is shared.
"""

import io
import json
import os
import sys
import time
from typing import Any

from .harness import Recorder, Result, bench_main, run_rows, say

ROWS = ("claim", "drain", "list", "shared")
KB100 = 100_000
#: Invocations carrying a 100 KB argument: the issue's 100,000 would be 10 GB of arguments; these show the trend.
COUNT = {True: 200, False: 2_000}
#: Calls sharing one 2 MB value, and how many of them are stored inline to scale from.
SHARED, SHARED_INLINE = {True: 300, False: 1_000}, {True: 5, False: 20}
INLINE_EVERYTHING = 10 * 1024 * 1024


def payload(number: int) -> str:
    """A distinct 100 KB argument: its number, then hex of random bytes."""
    return f"{number:08d}" + os.urandom(KB100 // 2).hex()[: KB100 - 8]


def enqueue(count: int, inline: bool) -> None:
    from django.test import override_settings

    from bench import runs, tasks

    runs.clear()
    with override_settings(KEYJOBS_INLINE_VALUE_BYTES=INLINE_EVERYTHING if inline else 8192):
        for first in range(0, count, 100):
            tasks.noop_payload.delay_many([((number, payload(number)), {}) for number in range(first, first + 100)])
    prune()


def prune() -> None:
    from django.core.management import call_command

    call_command("prunejobs", stdout=io.StringIO())


def measured(work: Any) -> tuple[float, float]:
    """Run ``work()``; return its wall and CPU seconds (this process: the database's own CPU is in the wall time)."""
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - wall, time.process_time() - cpu


def claim_all() -> None:
    from django.db.models.functions import Now

    from keyjobs.claim import claim
    from keyjobs.models import Runner

    runner = Runner.objects.create(host="bench", pid=os.getpid(), threads=10)
    while claim(runner, using="default", limit=10):
        pass
    Runner.objects.filter(pk=runner.pk).update(stopped_at=Now())  # not for recovery to find silent


def drain_all() -> None:
    from keyjobs.worker import Worker

    Worker(threads=4, burst=True, poll_interval=0.01).run()


def list_pages(pages: int = 5) -> None:
    from django.contrib.auth import get_user_model
    from django.test import Client, override_settings
    from django.urls import reverse

    user, _ = get_user_model().objects.get_or_create(username="bench", defaults={"is_staff": True,
                                                                                 "is_superuser": True})
    client = Client()
    client.force_login(user)
    with override_settings(ALLOWED_HOSTS=["testserver"]):
        for _ in range(pages):
            response = client.get(reverse("admin:keyjobs_invocation_changelist"))
            if response.status_code != 200:
                raise RuntimeError(f"the list answered {response.status_code}")


def compared(db: str, row: str, count: int, work: Any, per: float, unit: str) -> list[Result]:
    """Run ``work`` on ``count`` invocations inline, then out of line: one row, stored apart beside inline.

    The figure is ``work``'s wall time divided by ``per`` (in ``unit``); lower is better.
    """
    figures = {}
    for inline in (True, False):
        enqueue(count, inline)
        wall, cpu = measured(work)
        figures[inline] = (wall / per, cpu)
        say(f"  {db:8} {row:6} {'inline' if inline else 'apart':6} {count} x 100 KB: {wall / per:8.3f} {unit} "
            f"(this process's CPU {cpu:.2f} s)")
    case = f"{row} {count} invocations x 100 KB argument"
    (apart, apart_cpu), (inline, inline_cpu) = figures[False], figures[True]
    result = Result(26, "values", case, db, "keyjobs", apart, unit, inline, "kept in the row",
                    note=f"stored apart; this process's CPU {apart_cpu:.2f} s against {inline_cpu:.2f} s inline")
    return [result.judge(apart / inline if inline else None)]


def table_bytes() -> int:
    """Bytes the invocation and value tables take (with their indexes and TOAST, on PostgreSQL)."""
    from django.db import connection

    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SELECT pg_total_relation_size('keyjobs_invocation') + pg_total_relation_size('keyjobs_value')")
        else:
            cursor.execute("SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()")
        return int(cursor.fetchone()[0])


def compact() -> None:
    from django.db import connection

    from bench import runs

    runs.clear()
    prune()
    with connection.cursor() as cursor:
        cursor.execute("VACUUM FULL keyjobs_invocation" if connection.vendor == "postgresql" else "VACUUM")
        if connection.vendor == "postgresql":
            cursor.execute("VACUUM FULL keyjobs_value")


def shared(db: str, quick: bool) -> list[Result]:
    """1,000 calls sharing one 2 MB argument: the enqueue's time, and the bytes stored, against inline."""
    from django.test import override_settings

    from bench import tasks

    config = {"rules": [{"id": number, "pattern": os.urandom(20).hex(), "weight": number % 7}
                        for number in range(27_000)]}
    size = len(json.dumps(config, separators=(",", ":")).encode())
    count, few = SHARED[quick], SHARED_INLINE[quick]
    grown = {}
    for inline, calls in ((True, few), (False, count)):
        compact()
        before = table_bytes()
        batch = [((number, config), {}) for number in range(calls)]
        with override_settings(KEYJOBS_INLINE_VALUE_BYTES=INLINE_EVERYTHING if inline else 8192):
            wall, cpu = measured(lambda batch=batch: tasks.noop_payload.delay_many(batch))
        grown[inline] = (table_bytes() - before, wall, cpu, calls)
        say(f"  {db:8} shared {'inline' if inline else 'apart':6} {calls} x {size / 1e6:.1f} MB: {wall:.2f}s "
            f"(CPU {cpu:.2f}), tables grew {grown[inline][0] / 1e6:.1f} MB")
    inline_bytes = grown[True][0] / few * count
    apart_bytes = grown[False][0]
    case = f"enqueue {count} calls sharing one {size / 1e6:.1f} MB argument (delay_many)"
    rows = [
        Result(26, "values", case, db, "keyjobs", grown[False][1], "s", grown[True][1] / few * count,
               f"inline, scaled from {few}",
               note=f"CPU {grown[False][2]:.2f}s; {count / grown[False][1]:.0f} calls/s").judge(
            grown[False][1] / (grown[True][1] / few * count)),
        Result(26, "values", f"bytes stored for {count} calls sharing one {size / 1e6:.1f} MB argument", db,
               "keyjobs", apart_bytes / 1e6, "MB", inline_bytes / 1e6, f"inline, scaled from {few}",
               note="the tables' growth (PostgreSQL: with indexes and TOAST; SQLite: the file's pages)").judge(
            apart_bytes / inline_bytes if inline_bytes else None),
    ]
    return rows


def run_database(db: str, rows: list[str], quick: bool, results: Recorder) -> None:
    from bench import runs

    runs.setup(db)
    count = COUNT[quick]
    benches = {
        "claim": lambda: compared(db, "claim", count, claim_all, 1, "s"),
        "drain": lambda: compared(db, "drain", count, drain_all, 1, "s"),
        "list": lambda: compared(db, "list", count, list_pages, 5 / 1000, "ms"),
        "shared": lambda: shared(db, quick),
    }
    run_rows(db, rows, lambda row: benches[row](), results, target=26, metric="values")


def main(argv: list[str] | None = None) -> int:
    return bench_main(argv, module="bench.values", doc=__doc__ or "", rows=ROWS, timeout=1500,
                      quick_help=f"{COUNT[True]} invocations, {SHARED[True]} sharing calls.",
                      title="keyjobs, large arguments kept in the row or stored apart (issue 26)",
                      run=lambda args, results: run_database(args.db, args.only.split(","), args.quick, results))


if __name__ == "__main__":
    sys.exit(main())
