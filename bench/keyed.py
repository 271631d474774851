"""Keyed workloads on keyjobs: measured time over the physical limit (issue 2; target 1 of issue 6).

    .venv/bin/python -m bench.keyed [--db sqlite|postgres|both] [--workers 2] [--quick]

For each database: a fresh scratch database (a SQLite file under /tmp, or the
PostgreSQL database kj_bench, recreated); each workload run with no queue at
all (threads calling the provider directly on a static schedule: what the
provider's own round trip adds to the limit); then for each workload and
enqueue order: real ``manage.py runworker`` processes, every call enqueued at
once with ``delay_many()``, a wait until every invocation is final, and the
elapsed time (last finished_at - first started_at, database clock) over the
workload's limit. Each call is an HTTP call to the demo's provider, which
must see no collision.
"""

import argparse
import contextlib
import itertools
import sys
import time
from typing import TYPE_CHECKING, Any

from .harness import (
    ProviderProcess,
    Recorder,
    Result,
    cpu_seconds,
    exit_on_sigterm,
    run_children,
    say,
    table,
    without,
)
from .workloads import ORDERS, Workload, by_name

if TYPE_CHECKING:
    from .runs import Workers



def run_one(workload: Workload, order: str, workers: int, db: str, provider: ProviderProcess,
            pool: "Workers") -> Result:
    """Enqueue the workload in ``order`` for the running ``pool`` and time it."""
    from bench import runs, tasks

    runs.clear()
    provider.reset(workload.seconds)
    calls = workload.calls_in(order)
    case = f"{workload.label()} {order} w{workers}"
    result = Result(1, "keyed", case, db, "keyjobs", None, "s", workload.limit, "limit")
    start = time.perf_counter()
    tasks.call.delay_many([((account, op), {}) for account, op in calls])
    timeout = workload.cutoff
    try:
        runs.wait_finished(len(calls), timeout=timeout, workers=pool)
    except TimeoutError:
        result.judge(None, at_most=1.10)
        result.note = f"cut at {timeout:.0f}s with {runs.finished()} of {len(calls)} final"
        say(f"  {db:8} {case:48} {result.note}")
        return result
    wall = time.perf_counter() - start
    elapsed, statuses = runs.span()
    stats = provider.stats()
    result.measured = elapsed
    result.judge(None if elapsed is None else elapsed / workload.limit, at_most=1.10)
    problems = [f"{stats['collisions']} collisions"] if stats["collisions"] else []
    if runs.describe(statuses):
        problems.append(runs.describe(statuses))
    if problems:
        result.ok = False
    result.note = "; ".join([f"wall {wall:.2f}s", *problems])
    result.extra = {"wall": wall, "collisions": stats["collisions"], "statuses": statuses,
                    "provider_span": provider.span(stats)}
    say(f"  {db:8} {case:48} {elapsed or 0:6.2f}s  limit {workload.limit:.2f}s  {result.note}")
    return result


def direct(workload: Workload, db: str, provider: ProviderProcess) -> Result:
    """The workload without a queue: each thread calls the provider itself for a fixed share of the accounts.

    Longest chains first, each to the thread with the least work (a static
    schedule that meets the limit exactly when the work divides evenly), so
    what it takes over the limit is the provider's own round trip: the
    floor any queue has to stand on. A workload of several slots per account
    has no such static schedule: its threads take the first call whose
    account has a slot free, from a list in memory. ``extra["cpu"]`` holds
    the CPU seconds it took, this process's and the provider's.
    """
    import threading

    from django.test import override_settings

    from demo_project.tasks import call_provider

    provider.reset(workload.seconds)
    if workload.slots > 1:
        run, shares = _in_memory_queue(workload, call_provider)
    else:
        chains: dict[str, list[str]] = {}
        for account, op in workload.calls_in("grouped"):
            chains.setdefault(account, []).append(op)
        shares = [[] for _ in range(workload.threads)]
        for account, ops in sorted(chains.items(), key=lambda item: -len(item[1])):
            min(shares, key=len).extend((account, op) for op in ops)

        def run(share: list[tuple[str, str]]) -> None:
            for account, op in share:
                call_provider(account, op)

    assert provider.process is not None
    with override_settings(PROVIDER_URL=provider.url):
        threads = [threading.Thread(target=run, args=(share,)) for share in shares]
        cpu, provider_cpu = time.process_time(), cpu_seconds(provider.process.pid) or 0.0
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - start
        cpu, provider_cpu = time.process_time() - cpu, (cpu_seconds(provider.process.pid) or 0.0) - provider_cpu
    collisions = provider.stats()["collisions"]
    how = "static schedule" if workload.slots == 1 else f"a list in memory, {workload.slots} per account at once"
    result = Result(1, "keyed", f"{workload.label()} direct", db, "no queue", seconds, "s", workload.limit, "limit",
                    note=f"threads call the provider directly, {how}; {collisions} collisions",
                    extra={"cpu": {"process": cpu, "provider": provider_cpu}, "calls": workload.total})
    result.judge(seconds / workload.limit)
    say(f"  {db:8} {workload.label() + ' direct':48} {seconds:6.2f}s  limit {workload.limit:.2f}s  no queue")
    return result


def _in_memory_queue(workload: Workload, call: Any) -> tuple[Any, list[None]]:
    """A thread body taking, from one list, the first call whose account has fewer than its slots in flight."""
    import threading

    waiting = workload.calls_in("interleaved")
    in_flight: dict[str, int] = {}
    changed = threading.Condition()

    def run(_: None) -> None:
        while True:
            with changed:
                while True:
                    if not waiting:
                        return
                    taken = next((n for n, (account, _) in enumerate(waiting)
                                  if in_flight.get(account, 0) < workload.slots), None)
                    if taken is not None:
                        account, op = waiting.pop(taken)
                        in_flight[account] = in_flight.get(account, 0) + 1
                        break
                    changed.wait()
            try:
                call(account, op, workload.slots)
            finally:
                with changed:
                    in_flight[account] -= 1
                    changed.notify_all()

    return run, [None] * workload.threads


def run_database(db: str, workloads: tuple[Workload, ...], worker_counts: list[int], orders: tuple[str, ...],
                 results: Recorder) -> None:
    """Run every workload on one database: a process of its own, since Django is set up once per process."""
    from django.db import DatabaseError, connections

    from bench import runs

    runs.setup(db)
    with ProviderProcess() as provider:
        for workload in workloads:
            results.add(direct(workload, db, provider))
        for workers in worker_counts:
            # Workers stay up for every workload of one thread count: a queue's workers are long-lived.
            by_threads = sorted(workloads, key=lambda w: w.threads)
            for threads, group in itertools.groupby(by_threads, key=lambda w: w.threads):
                if threads % workers:
                    say(f"bench: {threads} threads do not split over {workers} workers; skipped")
                    continue
                todo = [(workload, order) for workload in group for order in orders]
                with contextlib.ExitStack() as stack:
                    pool = None
                    for workload, order in todo:
                        if pool is None:
                            pool = stack.enter_context(runs.Workers(workers, threads, name=f"keyed-{db}",
                                                                    env={"PROVIDER_URL": provider.url}))
                        try:
                            result = run_one(workload, order, workers, db, provider, pool)
                            results.add(result)
                            if result.measured is None:
                                # Cut short: its leftovers must not run into the next workload.
                                stack.close()
                                pool = None
                        except (DatabaseError, RuntimeError) as exc:
                            # A server restarted by someone else, or a worker that died: note it, start afresh.
                            say(f"  {db:8} {workload.label()} {order}: {type(exc).__name__}: {exc}")
                            results.add(Result(1, "keyed", f"{workload.label()} {order} w{workers}", db, "keyjobs",
                                               None, "s", workload.limit, "limit", ok=False,
                                               note=f"{type(exc).__name__}: {str(exc)[:80]}"))
                            connections.close_all()
                            stack.close()
                            pool = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--workers", default="2", help="Worker processes, or a list: 1,2 (default %(default)s).")
    parser.add_argument("--quick", action="store_true", help="Issue 2's two workloads only.")
    parser.add_argument("--workloads", default=None,
                        help="Comma-separated workload names (default: all, or issue 2's two with --quick).")
    parser.add_argument("--orders", default=",".join(ORDERS), help="Enqueue orders (default %(default)s).")
    parser.add_argument("--json", default=None, help="Also write the results to this file.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.keyed", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    workloads = by_name(args.workloads, quick=args.quick)
    worker_counts = [int(count) for count in args.workers.split(",")]
    orders = tuple(args.orders.split(","))
    results = Recorder(args.json)
    if args.db == "both":
        child_argv = without(list(argv if argv is not None else sys.argv[1:]), "--db", "--json")
        results.add(*run_children("bench.keyed", ["sqlite", "postgres"], child_argv, timeout=1800))
    else:
        exit_on_sigterm()
        run_database(args.db, workloads, worker_counts, orders, results)
    if not args.json:
        print(table(results, title="keyjobs, keyed workloads: measured time over the physical limit"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
