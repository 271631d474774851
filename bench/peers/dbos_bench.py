"""DBOS Transact on PostgreSQL, on the same workloads as keyjobs (run in ``.venv-bench``).

    .venv-bench/bin/python -m bench.peers.dbos_bench [--quick] [--only keyed,drain,latency,enqueue,webapp]

Its system database is kj_bench_dbos, recreated. Every metric runs twice:
with DBOS's default queue polling (every 1 s, system ``dbos``) and every
0.01 s (``dbos p0.01``). A keyed call is a workflow on a partitioned queue,
the account its partition key, ``partition_concurrency`` its limit per key
(``bench.peers.dbos_app``). The keyed rows enqueue every call before the
worker starts, as the Celery rows do (in one transaction, as keyjobs'
``delay_many()`` does), and are timed by the provider's log
(first call's start to last call's end); the webapp rows enqueue each call
from a client process while one worker process runs, timed from the first
enqueue, as ``bench.webapp`` times keyjobs. No-op workflows are timed by
DBOS's own records (``workflow_status``, epoch milliseconds).
"""

import contextlib
import functools
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from bench.harness import (
    POSTGRES_URL,
    SCRATCH,
    Backends,
    Connection,
    ProviderProcess,
    Recorder,
    Result,
    cpu_seconds,
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
from bench.workloads import DELAYED, DELAYED_QUICK, Sizes, Workload, latency_gaps

DATABASE = "kj_bench_dbos"
#: The queue polling intervals measured, by the system name of their rows: DBOS's default, and a short one.
POLLINGS = {"dbos": 1.0, "dbos p0.01": 0.01}
#: The application_name of DBOS's connections (its engine's own setting), and of its client's.
WORKER_APP, CLIENT_APP = "dbos_transact", "dbos_transact_client"
#: Seconds a drain is given at most.
DRAIN_WINDOW = 15.0


class Bench:
    def __init__(self) -> None:

        self.dsn = recreate_postgres(DATABASE).replace("postgres://", "postgresql://", 1)
        os.environ["BENCH_DBOS_DSN"] = self.dsn
        from bench.peers import dbos_app

        self.app = dbos_app
        self.db = Connection(self.dsn)
        self.client: Any = None
        self.quick = False  # set by run_peer
        # The first worker creates DBOS's tables; the client needs them.
        with self.workers(1, 1, 1.0):
            pass
        from dbos import DBOSClient

        self.client = DBOSClient(system_database_url=self.dsn, application_name=dbos_app.APP)

    def close(self) -> None:
        self.client.destroy()
        self.db.close()

    def clear(self) -> None:
        self.db.execute("TRUNCATE dbos.workflow_status CASCADE")

    def done(self) -> int:
        return int(self.db.scalar("SELECT count(*) FROM dbos.workflow_status WHERE status IN ('SUCCESS', 'ERROR')"))

    def failed(self) -> int:
        return int(self.db.scalar("SELECT count(*) FROM dbos.workflow_status WHERE status = 'ERROR'"))

    @contextlib.contextmanager
    def workers(self, count: int, threads: int, polling: float, provider_url: str = "",
                name: str = "dbos") -> Iterator[list[Any]]:
        """``count`` worker processes of ``threads`` each, started and ready, stopped on exit."""
        if self.client is not None:
            self.app.register_queues(functools.partial(self.client.register_queue, application_name=self.app.APP),
                                     threads, polling)
        processes = []
        ready = [SCRATCH / f"{name}-{number}.ready" for number in range(count)]
        try:
            for number, flag in enumerate(ready):
                flag.unlink(missing_ok=True)
                processes.append(spawn(
                    [sys.executable, "-m", "bench.peers.dbos_app"], name=f"{name}-{number}",
                    env={"BENCH_DBOS_DSN": self.dsn, "BENCH_DBOS_THREADS": str(threads),
                         "BENCH_DBOS_POLLING": str(polling), "BENCH_DBOS_EXECUTOR": f"{name}-{number}",
                         "BENCH_DBOS_READY": str(flag), "PROVIDER_URL": provider_url}))
            # Ready: launched, its queues registered with this polling.
            wait_until(lambda: all(flag.exists() for flag in ready), timeout=90, what="the DBOS workers",
                       processes=processes)
            time.sleep(0.5)  # past launch: its queue threads take their first look
            yield processes
        finally:
            stop(processes)

    def put(self, workflow: str, queue: str, *args: Any, partition: str | None = None, connection: Any = None) -> None:
        """Enqueue one workflow, as a client outside the application does: in a transaction of its own, or in
        ``connection``'s (SQLAlchemy's, on the system database)."""
        options: dict[str, Any] = {"workflow_name": workflow, "queue_name": queue}
        if partition is not None:
            options["queue_partition_key"] = partition
        if connection is None:
            self.client.enqueue(options, *args)
        else:
            self.client.enqueue_in_transaction(connection, options, *args)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        """One transaction on the system database for many ``put()``: work queued at once, as keyjobs'
        delay_many() and Procrastinate's batch_defer_jobs() queue it (DBOS has no bulk enqueue)."""
        import sqlalchemy

        engine = sqlalchemy.create_engine(self.dsn.replace("postgresql://", "postgresql+psycopg://", 1))
        try:
            with engine.begin() as connection:
                yield connection
        finally:
            engine.dispose()

    def span(self) -> float | None:
        """Seconds from the first no-op's start to the last one's end, by DBOS's records."""
        first, last = self.db.execute("SELECT min(started_at_epoch_ms), max(updated_at) FROM dbos.workflow_status "
                                      "WHERE status = 'SUCCESS'").fetchone()
        return None if first is None or last is None else (last - first) / 1000

    # -- target 1: the keyed workloads, every call enqueued before the worker starts -------------

    def keyed(self, workloads: tuple[Workload, ...], orders: tuple[str, ...], provider: ProviderProcess,
              results: Recorder) -> None:
        for system, polling in POLLINGS.items():
            for workload in workloads:
                for order in orders:
                    try:
                        results.add(self.keyed_one(system, polling, workload, order, provider))
                    except Exception as exc:
                        say(f"  {system} {workload.label()} {order}: {type(exc).__name__}: {exc}")
                        results.add(Result(1, "keyed", f"{workload.label()} {order} w1", "postgres", system, None,
                                           "s", workload.limit, "limit", note=f"{type(exc).__name__}"))

    def begin(self, result: Result, polling: float, workload: Workload, provider: ProviderProcess) -> bool:
        """Make ready for ``result``'s run: no workflow left, the provider holding calls for the workload.

        False, with a note on ``result``, for a run --quick leaves out: one DBOS cannot end before its
        cutoff, as it starts at most a process's worker_concurrency (the threads) of a queue's workflows per poll.
        """
        least = polling * workload.total / workload.threads
        if self.quick and least > workload.cutoff:
            result.note = (f"not run with --quick: at most {workload.threads} starts per {polling:g}s poll, so at "
                           f"least {least:.0f}s, past its cutoff of {workload.cutoff:.0f}s")
            say(f"  dbos {result.case}: {result.note}")
            return False
        self.clear()
        provider.reset(workload.seconds)
        return True

    def keyed_one(self, system: str, polling: float, workload: Workload, order: str,
                  provider: ProviderProcess) -> Result:
        case = f"{workload.label()} {order} w1"
        result = Result(1, "keyed", case, "postgres", system, None, "s", workload.limit, "limit")
        if not self.begin(result, polling, workload, provider):
            return result
        calls = workload.calls_in(order)
        queue = self.app.KEYED[workload.slots]
        with self.transaction() as connection:
            for account, op in calls:
                self.put("call", queue, account, op, workload.slots, partition=account, connection=connection)
        timeout = workload.cutoff
        with self.workers(1, workload.threads, polling, provider.url, name="dbos-keyed") as processes:
            try:
                wait_until(lambda: self.done() >= len(calls), timeout=timeout, interval=0.1, what="every call made",
                           processes=processes)
            except TimeoutError:
                result.note = f"cut at {timeout:.0f}s with {self.done()} of {len(calls)} done"
                say(f"  {system} {case:48} {result.note}")
                return result
        stats = provider.stats()
        elapsed = provider.span(stats)
        result.measured = elapsed
        result.judge(None if elapsed is None else elapsed / workload.limit)
        failed = self.failed()
        result.note = "; ".join([f"polling {polling:g}s", *([f"{stats['collisions']} collisions"]
                                                             if stats["collisions"] else []),
                                 *([f"{failed} failed"] if failed else [])])
        result.extra = {"collisions": stats["collisions"], "failed": failed, "polling": polling}
        say(f"  {system} {case:48} {elapsed or 0:6.2f}s  limit {workload.limit:.2f}s  {result.note}")
        return result

    # -- issue 22's rows: one enqueue per call from a client process, onto a running worker --------

    def webapp(self, quick: bool, provider: ProviderProcess, results: Recorder) -> None:
        for system, polling in POLLINGS.items():
            for workload in DELAYED_QUICK if quick else DELAYED:
                try:
                    results.add(self.webapp_one(system, polling, workload, provider))
                except Exception as exc:
                    say(f"  {system} {workload.label()}: {type(exc).__name__}: {exc}")
                    results.add(Result(22, "webapp", f"{workload.label()} grouped, enqueue() each w1", "postgres",
                                       system, None, "s", note=f"{type(exc).__name__}: {str(exc)[:80]}"))

    def webapp_one(self, system: str, polling: float, workload: Workload, provider: ProviderProcess) -> Result:
        from bench.webapp import ORDERS, Client

        order = ORDERS[0]
        case = f"{workload.label()} {order}, enqueue() each w1"
        result = Result(22, "webapp", case, "postgres", system, None, "s", workload.limit, "limit")
        if not self.begin(result, polling, workload, provider):
            return result
        assert provider.process is not None
        with self.workers(1, workload.threads, polling, provider.url, name="dbos-webapp") as processes, \
                Client("call", workload, order, system="dbos", env={"BENCH_DBOS_DSN": self.dsn}) as client:
            pids = {"worker": [p.pid for p in processes], "client": [client.pid], "provider": [provider.process.pid]}
            with Backends(self.dsn) as backends:
                before = {part: sum(cpu_seconds(pid) or 0.0 for pid in found) for part, found in pids.items()}
                client.go()
                try:
                    wait_until(lambda: self.done() >= workload.total, timeout=workload.cutoff, interval=0.1,
                               what="every call made", processes=processes)
                except TimeoutError:
                    result.note = f"cut at {workload.cutoff:.0f}s with {self.done()} of {workload.total} done"
                    say(f"  {system} {case:64} {result.note}")
                    return result
                sent = client.sent()
                cpu = {part: sum(cpu_seconds(pid) or 0.0 for pid in found) - before[part]
                       for part, found in pids.items()}
                cpu["client"] = sent["cpu"]
            # The client's application_name starts with the worker's.
            cpu["client backend"] = backends.seconds(CLIENT_APP)
            cpu["worker backends"] = backends.seconds(WORKER_APP) - cpu["client backend"]
        stats = provider.stats()
        ended = [call["ended"] for call in stats["log"] if call["ended"] is not None]
        seconds = max(ended) - sent["first"] if ended else None
        result.measured = seconds
        result.judge(seconds / workload.limit if seconds else None)
        queue_ms = 1000 * sum(v for k, v in cpu.items() if k != "provider") / workload.total
        failed = self.failed()
        result.note = "; ".join([f"polling {polling:g}s", f"enqueue() x {workload.total} in "
                                 f"{sent['last'] - sent['first']:.2f}s", f"{queue_ms:.2f} CPU ms per invocation "
                                 f"(worker {1000 * cpu['worker'] / workload.total:.2f}, its backends "
                                 f"{1000 * cpu['worker backends'] / workload.total:.2f}, client and its backend "
                                 f"{1000 * (cpu['client'] + cpu['client backend']) / workload.total:.2f})",
                                 *([f"{stats['collisions']} collisions"] if stats["collisions"] else []),
                                 *([f"{failed} failed"] if failed else [])])
        result.extra = {"cpu": cpu, "calls": workload.total, "polling": polling, "collisions": stats["collisions"]}
        say(f"  {system} {case:64} {seconds or 0:6.2f}s  limit {workload.limit:.2f}s  {result.note}")
        return result

    # -- target 3 ---------------------------------------------------------

    def drain(self, size: Sizes) -> list[Result]:
        """No-op workflows queued, then one worker dequeuing them: finished per second, over at most
        ``DRAIN_WINDOW`` seconds (at its default polling DBOS starts a poll's worth, its concurrency, a second)."""
        results = []
        for system, polling in POLLINGS.items():
            self.clear()
            with self.transaction() as connection:
                for _ in range(size.drain):
                    self.put("noop", self.app.PLAIN, connection=connection)
            case = f"no-op drain c{size.drain_threads}"
            with self.workers(1, size.drain_threads, polling, name="dbos-drain") as processes:
                began = time.monotonic()
                wait_until(lambda began=began: self.done() >= size.drain or time.monotonic() - began > DRAIN_WINDOW,
                           timeout=DRAIN_WINDOW + 30, interval=0.1, what="the drain", processes=processes)
            done, elapsed = self.done(), self.span()
            rate = done / elapsed if elapsed else None
            say(f"  {system} drain: {rate or 0:,.0f}/s ({done} of {size.drain})")
            results.append(Result(3, "drain", case, "postgres", system, rate, "/s",
                                  note=f"{done} of {size.drain} workflows in {DRAIN_WINDOW:g}s at most, "
                                       f"polling {polling:g}s"))
        return results

    # -- target 4 ---------------------------------------------------------

    def latency(self, size: Sizes) -> list[Result]:
        results = []
        for system, polling in POLLINGS.items():
            self.clear()
            with self.workers(1, size.drain_threads, polling, name="dbos-latency") as processes:
                for gap in latency_gaps(size.latency_samples):
                    self.put("noop", self.app.PLAIN)
                    time.sleep(gap)
                wait_until(lambda: self.done() >= size.latency_samples, timeout=60, what="the latency samples",
                           processes=processes)
            rows = self.db.execute("SELECT started_at_epoch_ms - created_at FROM dbos.workflow_status").fetchall()
            samples = [float(ms) for (ms,) in rows if ms is not None]
            say(f"  {system} latency p50 {median(samples):.1f} ms, p99 {percentile(samples, 0.99):.1f} ms")
            note = f"{len(samples)} samples, polling {polling:g}s"
            results += [
                Result(4, "latency", "enqueue-to-start p50, idle worker", "postgres", system, median(samples), "ms",
                       note=note),
                Result(4, "latency", "enqueue-to-start p99, idle worker", "postgres", system,
                       percentile(samples, 0.99), "ms", note=note),
            ]
        return results

    # -- target 5 ---------------------------------------------------------

    def enqueue(self, size: Sizes) -> list[Result]:
        self.clear()
        self.put("noop", self.app.PLAIN)  # the client's pool opens on first use
        start = time.perf_counter()
        for _ in range(size.enqueue_single):
            self.put("noop", self.app.PLAIN)
        single = size.enqueue_single / (time.perf_counter() - start)
        self.clear()
        say(f"  dbos enqueue {single:,.0f}/s")
        return [Result(5, "enqueue", "enqueue one at a time", "postgres", "dbos", single, "/s",
                       note="DBOSClient.enqueue(); DBOS has no bulk enqueue")]


def main(argv: list[str] | None = None) -> int:
    def recover(bench: Bench) -> bool:
        # PostgreSQL may have been restarted under the run by another suite on this machine.
        return wait_for_postgres()

    return run_peer(argv, prog="python -m bench.peers.dbos_bench", description=__doc__.split("\n\n")[0],
                    system="dbos", banner=f"bench: DBOS Transact on {POSTGRES_URL}/{DATABASE}", bench=Bench,
                    recover=recover, close=lambda bench: bench.close())


if __name__ == "__main__":
    sys.exit(main())
