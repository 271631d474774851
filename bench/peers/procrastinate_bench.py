"""Procrastinate on PostgreSQL, on the same workloads as keyjobs (run in ``.venv-bench``).

    .venv-bench/bin/python -m bench.peers.procrastinate_bench [--quick] [--only keyed,drain,latency,enqueue]

Its database is kj_bench_procrastinate, recreated. Jobs are timed by
Procrastinate's own events table (database clock): started to succeeded.
"""

import os
import sys
import time
from typing import Any

from bench.harness import (
    POSTGRES_URL,
    Connection,
    ProviderProcess,
    Recorder,
    Result,
    median,
    percentile,
    recreate_postgres,
    say,
    spawn,
    stop,
    wait_for_postgres,
    wait_until,
)
from bench.peers import run_peer
from bench.workloads import Sizes, Workload, latency_gaps

DATABASE = "kj_bench_procrastinate"
SYSTEM = "procrastinate"


class Bench:
    def __init__(self) -> None:
        self.dsn = recreate_postgres(DATABASE).replace("postgres://", "postgresql://", 1)
        os.environ["BENCH_PROCRASTINATE_DSN"] = self.dsn

        from bench.peers import procrastinate_app

        self.app = procrastinate_app.app
        self.module = procrastinate_app
        self.app.open()
        self.app.schema_manager.apply_schema()
        self.db = Connection(self.dsn)

    def close(self) -> None:
        self.db.close()
        self.app.close()

    def reconnect(self) -> None:
        """Open every connection afresh, after the server restarted."""
        self.close()
        self.app.open()

    def clear(self) -> None:
        self.db.execute("TRUNCATE procrastinate_events, procrastinate_periodic_defers, procrastinate_jobs")

    def done(self) -> int:
        return int(self.db.scalar("SELECT count(*) FROM procrastinate_jobs WHERE status IN ('succeeded', 'failed')"))

    def span(self) -> tuple[float | None, int]:
        """Seconds from the first start to the last end (events, database clock); jobs that failed."""
        first, last = self.db.execute(
            "SELECT min(at) FILTER (WHERE type = 'started'), max(at) FILTER (WHERE type IN ('succeeded', 'failed')) "
            "FROM procrastinate_events").fetchone()  # type: ignore[misc]
        failed = int(self.db.scalar("SELECT count(*) FROM procrastinate_jobs WHERE status = 'failed'"))
        return (None if first is None or last is None else (last - first).total_seconds()), failed

    def worker(self, concurrency: int, provider_url: str = "", name: str = "procrastinate") -> Any:
        process = spawn(
            [sys.executable, "-m", "procrastinate", "--app=bench.peers.procrastinate_app.app", "worker",
             "--concurrency", str(concurrency), "--fetch-job-polling-interval", "5"],
            name=name, env={"PROVIDER_URL": provider_url, "BENCH_PROCRASTINATE_DSN": self.dsn,
                            "BENCH_POOL_SIZE": str(concurrency + 8)},
        )
        try:
            wait_until(lambda: self.db.scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                           "AND query ILIKE 'LISTEN%%' AND pid <> pg_backend_pid()") >= 1,
                       timeout=60, what="the procrastinate worker listening", processes=[process])
        except BaseException:
            stop([process])
            raise
        return process

    def defer_all(self, task_name: str, calls: list[dict[str, Any]], locks: list[str | None]) -> None:
        """Insert every job in one statement, in list order, as keyjobs' delay_many() does."""
        from procrastinate import jobs

        self.app.job_manager.batch_defer_jobs([
            jobs.Job(id=None, queue="default", lock=lock, queueing_lock=None, task_name=task_name, task_kwargs=kwargs)
            for kwargs, lock in zip(calls, locks, strict=True)
        ])

    # -- target 1 ---------------------------------------------------------

    def keyed(self, workloads: tuple[Workload, ...], orders: tuple[str, ...], provider: ProviderProcess,
              results: Recorder) -> None:
        for workload in workloads:
            # One worker process with the workload's threads as its concurrency, as the issue measured it.
            process = self.worker(workload.threads, provider.url, name="procrastinate-keyed")
            try:
                for order in orders:
                    try:
                        results.add(self.keyed_one(workload, order, provider, process))
                    except Exception as exc:
                        say(f"  procrastinate {workload.label()} {order}: {type(exc).__name__}: {exc}")
                        results.add(Result(1, "keyed", f"{workload.label()} {order} w1", "postgres", SYSTEM, None,
                                           "s", workload.limit, "limit", note=f"{type(exc).__name__}"))
                        stop([process])
                        process = self.worker(workload.threads, provider.url, name="procrastinate-keyed")
            finally:
                stop([process])
        return results

    def keyed_one(self, workload: Workload, order: str, provider: ProviderProcess, process: Any) -> Result:
        self.clear()
        provider.reset(workload.seconds)
        calls = workload.calls_in(order)
        case = f"{workload.label()} {order} w1"
        result = Result(1, "keyed", case, "postgres", SYSTEM, None, "s", workload.limit, "limit")
        start = time.perf_counter()
        self.defer_all("call", [{"account_id": a, "op": op} for a, op in calls], [a for a, _ in calls])
        timeout = workload.cutoff
        try:
            wait_until(lambda: self.done() >= len(calls), timeout=timeout, interval=0.05,
                       what="every job done", processes=[process])
        except TimeoutError:
            result.note = f"cut at {timeout:.0f}s with {self.done()} of {len(calls)} done"
            say(f"  procrastinate {case:48} {result.note}")
            return result
        wall = time.perf_counter() - start
        elapsed, failed = self.span()
        stats = provider.stats()
        result.measured = elapsed
        result.judge(None if elapsed is None else elapsed / workload.limit)
        notes = [f"wall {wall:.2f}s"]
        if stats["collisions"]:
            notes.append(f"{stats['collisions']} collisions")
        if failed:
            notes.append(f"{failed} failed")
        result.note = "; ".join(notes)
        result.extra = {"wall": wall, "collisions": stats["collisions"], "failed": failed}
        say(f"  procrastinate {case:48} {elapsed or 0:6.2f}s  limit {workload.limit:.2f}s  {result.note}")
        return result

    # -- target 3 ---------------------------------------------------------

    def drain(self, size: Sizes) -> list[Result]:
        results = []
        for task_name, label in (("noop", "sync"), ("noop_async", "async")):
            self.clear()
            self.defer_all(task_name, [{}] * size.drain, [None] * size.drain)
            process = self.worker(size.drain_threads, name="procrastinate-drain")
            try:
                wait_until(lambda: self.done() >= size.drain, timeout=max(120.0, size.drain / 20), interval=0.1,
                           what="the drain", processes=[process])
            except TimeoutError as exc:
                results.append(Result(3, "drain", f"no-op drain c{size.drain_threads} {label} task", "postgres",
                                      SYSTEM, None, "/s", note=str(exc)))
                continue
            finally:
                stop([process])
            elapsed, _ = self.span()
            rate = size.drain / elapsed if elapsed else None
            say(f"  procrastinate drain ({label}): {rate or 0:,.0f}/s")
            results.append(Result(3, "drain", f"no-op drain c{size.drain_threads} {label} task", "postgres", SYSTEM,
                                  rate, "/s", note=f"{size.drain} jobs"))
        return results

    # -- target 4 ---------------------------------------------------------

    def latency(self, size: Sizes) -> list[Result]:
        self.clear()
        process = self.worker(size.drain_threads, name="procrastinate-latency")
        try:
            for gap in latency_gaps(size.latency_samples):
                self.module.noop_async.defer()
                time.sleep(gap)
            wait_until(lambda: self.done() >= size.latency_samples, timeout=30, what="the latency samples",
                       processes=[process])
        finally:
            stop([process])
        rows = self.db.execute(
            "SELECT extract(epoch FROM s.at - d.at) FROM procrastinate_events d "
            "JOIN procrastinate_events s ON s.job_id = d.job_id AND s.type = 'started' "
            "WHERE d.type = 'deferred'").fetchall()
        samples = [float(seconds) * 1000 for (seconds,) in rows]
        say(f"  procrastinate latency p50 {median(samples):.1f} ms, p99 {percentile(samples, 0.99):.1f} ms")
        return [
            Result(4, "latency", "enqueue-to-start p50, idle worker", "postgres", SYSTEM, median(samples), "ms",
                   note=f"{len(samples)} samples, async no-op"),
            Result(4, "latency", "enqueue-to-start p99, idle worker", "postgres", SYSTEM,
                   percentile(samples, 0.99), "ms", note=f"{len(samples)} samples, async no-op"),
        ]

    # -- target 5 ---------------------------------------------------------

    def enqueue(self, size: Sizes) -> list[Result]:
        self.clear()
        noop = self.module.noop
        noop.defer()  # the connection pool opens on first use
        start = time.perf_counter()
        for _ in range(size.enqueue_single):
            noop.defer()
        single = size.enqueue_single / (time.perf_counter() - start)
        start = time.perf_counter()
        noop.batch_defer(*[{} for _ in range(size.enqueue_bulk)])
        bulk = size.enqueue_bulk / (time.perf_counter() - start)
        self.clear()
        say(f"  procrastinate defer {single:,.0f}/s, batch_defer {bulk:,.0f}/s")
        return [
            Result(5, "enqueue", "enqueue one at a time", "postgres", SYSTEM, single, "/s", note="task.defer()"),
            Result(5, "enqueue", "enqueue in bulk", "postgres", SYSTEM, bulk, "/s",
                   note=f"task.batch_defer(), {size.enqueue_bulk} jobs"),
        ]


def main(argv: list[str] | None = None) -> int:
    def recover(bench: Bench) -> bool:
        # PostgreSQL may have been restarted under the run by another suite on this machine.
        if not wait_for_postgres():
            return False
        bench.reconnect()
        return True

    return run_peer(argv, prog="python -m bench.peers.procrastinate_bench", description=__doc__.split("\n\n")[0],
                    system=SYSTEM, banner=f"bench: procrastinate on {POSTGRES_URL}/{DATABASE}", bench=Bench,
                    recover=recover, close=lambda bench: bench.close())


if __name__ == "__main__":
    sys.exit(main())
