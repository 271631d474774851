"""Issue 15's process runner: CPU-bound work on processes against threads, and a hard limit's key freed.

    python -m bench.processes [--db sqlite|postgres|both] [--quick]

- ``cpu``: pure-Python tasks of about 50 ms on ``runworker --processes 2
  --threads 1`` against ``runworker --threads 2`` (one process), in the same
  run: the ratio of their throughputs, expected near 2 on two free cores.
  Throughput is counted from the database's stamps (first start to last
  finish), so that the processes' start-up is left out.
- ``limit``: a run of a ``kill_on_timeout`` task that would sleep a minute,
  under a limit of 1 s: seconds from its limit to its key being free (its
  FAILED stamp), against the goal of 1 s plus the heartbeat interval.
"""

import functools
import os
import sys
import time
from typing import Any

from .harness import Recorder, Result, bench_main, median, say, spawn, stop, wait_until
from .runs import setup

#: Seconds one spin should take.
SPIN_SECONDS = 0.05
HARD_LIMIT = 1.0


def calibrate() -> int:
    """Return the iterations of ``bench.tasks.spin`` that take about ``SPIN_SECONDS`` on this machine now."""
    from bench.tasks import spin

    iterations = 200_000
    began = time.perf_counter()
    spin.func(iterations)
    return max(1000, int(iterations * SPIN_SECONDS / (time.perf_counter() - began)))


def pool(db: str, name: str, *arguments: str) -> float:
    """Run ``runworker --burst arguments`` over the queued spins; return invocations per second."""
    from django.db.models import Max, Min

    from keyjobs.models import Invocation

    process = spawn([sys.executable, "manage.py", "runworker", "--noreload", "--burst", *arguments], name=name,
                    env={"DATABASE_URL": os.environ["DATABASE_URL"]})
    try:
        wait_until(lambda: process.poll() is not None, timeout=600, interval=0.2, what=f"{name} to drain the queue")
    finally:
        stop([process])
    done = Invocation.objects.filter(status="SUCCESS")
    bounds = done.aggregate(first=Min("started_at"), last=Max("finished_at"))
    return done.count() / (bounds["last"] - bounds["first"]).total_seconds()


def cpu(db: str, quick: bool) -> list[Result]:
    from bench.runs import clear
    from bench.tasks import spin

    count = 40 if quick else 120
    iterations = calibrate()
    rates = {}
    for label, arguments in (("threads", ("--threads", "2")), ("processes", ("--processes", "2", "--threads", "1"))):
        clear()
        spin.delay_many([((iterations,), {}) for _ in range(count)])
        rates[label] = pool(db, f"processes-cpu-{label}-{db}", *arguments)
        say(f"  {db:8} cpu: {label}: {rates[label]:.1f}/s")
    load = os.getloadavg()[0]
    result = Result(15, "cpu", f"cpu-bound {SPIN_SECONDS * 1000:.0f} ms x{count}, --processes 2 --threads 1", db,
                    "keyjobs", rates["processes"], "/s", rates["threads"], "--threads 2 (one process)",
                    note=f"{iterations:,} iterations a task; load average {load:.1f} on {os.cpu_count()} cores")
    return [result.judge(rates["processes"] / rates["threads"], at_least=1.6)]


def limit(db: str, quick: bool) -> list[Result]:
    from bench.runs import clear
    from bench.tasks import hang
    from keyjobs.conf import conf
    from keyjobs.models import Runner

    clear()
    rounds = 3 if quick else 6
    process = spawn([sys.executable, "manage.py", "runworker", "--noreload", "--processes", "2", "--threads", "1"],
                    name=f"processes-limit-{db}", env={"DATABASE_URL": os.environ["DATABASE_URL"]})
    delays: list[float] = []
    try:
        for number in range(rounds):
            wait_until(lambda: Runner.objects.alive().filter(supervisor__isnull=False).count() == 2, timeout=120,
                       what="two worker processes", processes=[process])
            stuck = hang.delay(f"account-{number}", 60)
            wait_until(functools.partial(_final, stuck), timeout=120, what="the hard limit", processes=[process])
            stuck.refresh_from_db()
            delays.append((stuck.finished_at - stuck.started_at).total_seconds() - HARD_LIMIT)
            say(f"  {db:8} limit: round {number + 1}: key free {delays[-1]:.2f}s after the limit ({stuck.status})")
    finally:
        stop([process])
    goal = 1.0 + conf.HEARTBEAT_INTERVAL
    return [Result(15, "limit", f"hard limit to key free, median of {rounds}", db, "keyjobs", median(delays), "s",
                   goal, "1 s + heartbeat interval", goal=f"<= {goal:g} s", ok=median(delays) <= goal,
                   note=f"worst {max(delays):.2f}s")]


def _final(invocation: Any) -> bool:
    invocation.refresh_from_db(fields=["status"])
    return invocation.is_final


METRICS = {"cpu": cpu, "limit": limit}


def run_database(db: str, only: list[str], quick: bool, results: Recorder) -> None:
    setup(db, name="kj_bench_processes")
    for metric in only:
        results.add(*METRICS[metric](db, quick))


def main(argv: list[str] | None = None) -> int:
    return bench_main(argv, module="bench.processes", doc=__doc__ or "", rows=tuple(METRICS),
                      quick_help="Fewer tasks and rounds.", title="keyjobs: processes",
                      run=lambda args, results: run_database(args.db, args.only.split(","), args.quick, results))


if __name__ == "__main__":
    sys.exit(main())
