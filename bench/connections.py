"""PostgreSQL connections a runner holds, idle and under a keyed load, against the documented bound (issue 15).

    .venv/bin/python -m bench.connections [--quick] [--no-pool]

Real ``manage.py runworker --threads 8`` processes on a scratch database
(kj_bench_connections, recreated), their connections named by an
application_name and counted in pg_stat_activity every 20 ms: for 3 s while
idle, then while they run a keyed workload (each call an HTTP call to the
demo's provider, no query of its own). One process, then two side by side,
then ``runworker --processes 2`` where this checkout has it (a supervisor
holds one connection more), then one on Django's pool (``DATABASE_POOL``, the demo's knob for
``OPTIONS["pool"]``). The bound (docs/howto/many-hosts.md): per process, an idle
runner holds 3 (its scout, its duty thread, its LISTEN) once idle for 5 s;
a busy one at most threads + 2; with a pool, at most its ``max_size`` + 1,
busy or idle (a pool keeps what it opened for ``max_idle``, 10 minutes by
default).

Run from a checkout of another commit (the bench module copied in), it
measures that commit's runner the same way: that is how "before" was measured.
"""

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .harness import (
    POSTGRES_URL,
    ROOT,
    ProviderProcess,
    Recorder,
    Result,
    bench_main,
    sampled,
    say,
    spawn,
    stop,
    wait_until,
)
from .workloads import Workload

THREADS = 8
POOL = (1, 4)
NAME = "kj-bench-runner"
#: 64 accounts x 5 calls of 50 ms: every thread of one runner busy for about 2 s.
ACCOUNTS, CALLS, SECONDS = 64, 5, 0.05


@contextmanager
def sampling() -> Iterator[list[int]]:
    """Count the runners' connections every 20 ms while the block runs, on a connection of its own."""
    import psycopg

    def count(connection: Any) -> int:
        row = connection.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                                 [NAME]).fetchone()
        return int(row[0]) if row else 0

    with (psycopg.connect(f"{POSTGRES_URL}/postgres", autocommit=True) as connection,
          sampled(lambda: count(connection)) as samples):
        yield samples


def supervised() -> bool:
    """Whether this checkout's runworker has --processes (a supervisor of worker processes)."""
    help_text = subprocess.run([sys.executable, "manage.py", "runworker", "--help"], cwd=ROOT, capture_output=True,
                               text=True).stdout
    return "--processes" in help_text


class Supervisor:
    """One ``runworker --processes N --threads T``: a supervisor and its N worker processes."""

    def __init__(self, processes: int, threads: int, env: dict[str, str]) -> None:
        self.argv = [sys.executable, "manage.py", "runworker", "--processes", str(processes), "--threads", str(threads)]
        self.count = processes
        self.env = env
        self.processes: list[Any] = []

    def __enter__(self) -> "Supervisor":
        import psycopg

        self.processes.append(spawn(self.argv, name="connections-supervisor", env=self.env))

        def listening() -> bool:
            with psycopg.connect(f"{POSTGRES_URL}/postgres", autocommit=True) as connection:
                row = connection.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                                         "AND query ILIKE 'LISTEN%%'", [NAME]).fetchone()
            return bool(row and row[0] >= self.count)

        try:
            wait_until(listening, timeout=60, what="the worker processes listening", processes=self.processes)
        except BaseException:
            stop(self.processes)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        stop(self.processes)


def measure(processes: int, provider: ProviderProcess, *, pool: tuple[int, int] | None, idle: float,
            supervisor: bool = False) -> list[Result]:
    from bench import runs, tasks

    url = runs._url
    env = {"DATABASE_URL": f"{url}?application_name={NAME}", "PROVIDER_URL": provider.url}
    if pool is not None:
        env["DATABASE_POOL"] = ",".join(map(str, pool))
    # A pool keeps what it opened for max_idle (psycopg_pool: 10 minutes) before it shrinks to min_size.
    # A supervisor holds one connection of its own (its heartbeat).
    bound_idle = processes * ((pool[1] + 1) if pool is not None else 3) + supervisor
    bound_busy = processes * ((pool[1] + 1) if pool is not None else THREADS + 2) + supervisor
    label = (f"--processes {processes} --threads {THREADS}" if supervisor else f"t{THREADS} w{processes}") + (
        f" pool {pool[0]},{pool[1]}" if pool is not None else "")
    results = []
    runs.clear()
    pool_of_runners = (Supervisor(processes, THREADS, env) if supervisor else
                       runs.Workers(processes, THREADS * processes, name="connections", env=env))
    with pool_of_runners as workers:
        # Every thread takes its first look; waiting threads let go of their connections at once with a
        # pool, else once idle for keyjobs.worker.IDLE_CONNECTION_GRACE (5 s).
        time.sleep(1.0 if pool is not None else 7.0)
        with sampling() as samples:
            time.sleep(idle)
        results.append(row(f"idle {label}", samples, bound_idle))
        load = Workload("keyed", ACCOUNTS, CALLS, SECONDS, THREADS * processes)
        provider.reset(load.seconds)
        calls = load.calls_in("interleaved")
        with sampling() as samples:
            tasks.call.delay_many([((account, op), {}) for account, op in calls])
            runs.wait_finished(len(calls), timeout=120, workers=workers)
        busy = row(f"keyed {ACCOUNTS}x{CALLS} {SECONDS * 1000:g}ms {label}", samples, bound_busy)
        elapsed, statuses = runs.span()
        collisions = provider.stats()["collisions"]
        busy.note += f"; ran in {elapsed or 0:.2f} s (limit {load.limit:.2f} s), {collisions} collisions"
        if collisions or runs.describe(statuses):
            busy.ok = False
            busy.note += f" {runs.describe(statuses)}"
        results.append(busy)
    return results


def row(case: str, samples: list[int], bound: int) -> Result:
    result = Result(15, "connections", case, "postgres", "keyjobs", float(max(samples, default=0)), "conns",
                    float(bound), "bound")
    result.judge(result.measured / bound if result.measured is not None else None, at_most=1.0)
    result.note = f"mean {statistics.fmean(samples) if samples else 0:.1f} over {len(samples)} samples"
    say(f"  postgres {case:44} max {max(samples, default=0):3d}  {result.note}  bound {bound}")
    return result


def run_database(quick: bool, no_pool: bool, results: Recorder) -> None:
    from bench import runs

    runs.setup("postgres", name="kj_bench_connections")
    idle = 2.0 if quick else 3.0
    with ProviderProcess() as provider:
        results.add(*measure(1, provider, pool=None, idle=idle))
        # Two runworker processes side by side, and the same under one supervisor where runworker has one.
        results.add(*measure(2, provider, pool=None, idle=idle))
        if supervised():
            results.add(*measure(2, provider, pool=None, idle=idle, supervisor=True))
        if not no_pool:
            results.add(*measure(1, provider, pool=POOL, idle=idle))


def _no_pool_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-pool", action="store_true", help="Without the pooled rows (a checkout without it).")


def main(argv: list[str] | None = None) -> int:
    return bench_main(argv, module="bench.connections", doc=__doc__ or "", databases=("postgres",),
                      quick_help="One idle period of 2 s instead of 3 s.",
                      title="keyjobs: PostgreSQL connections held by runners, against the bound",
                      options=_no_pool_option,
                      run=lambda args, results: run_database(args.quick, args.no_pool, results))


if __name__ == "__main__":
    sys.exit(main())
