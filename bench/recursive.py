"""The recursive case of issue 15: a task that fans out to 4 children and waits for them, three levels deep, on 2 threads.

    .venv/bin/python -m bench.recursive [--db sqlite|postgres|both] [--quick] [--json FILE]

keyjobs: one ``runworker --threads 2`` process; ``bench.tasks.fan_out(3)``
delays 4 children and waits for each, and so on down to the leaves: 1 + 4 +
16 + 64 = 85 invocations, 21 of them waiting at once at most. Each wait
pauses its run and lends its thread, so the tree completes; it is timed from
the root's creation to its end, on the database's clock, and set beside the
time the same worker takes to drain 85 no-op invocations that wait on nothing.

The peer: the same tree on a plain ``concurrent.futures.ThreadPoolExecutor``
of 2 threads, each task submitting its children and waiting on their
futures. Its two threads block in the first two waits with the children
queued behind them: it deadlocks, shown by a timeout.
"""

import argparse
import contextlib
import sys
import threading
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from .harness import Recorder, Result, exit_on_sigterm, run_children, say, table, without

WIDTH, LEVELS, THREADS = 4, 3, 2
#: How long the thread pool is given before it is called deadlocked.
POOL_TIMEOUT = {True: 3.0, False: 10.0}


def tree_size(levels: int, width: int) -> int:
    return sum(width**level for level in range(levels + 1))


def thread_pool(levels: int, width: int, threads: int, timeout: float) -> tuple[bool, int]:
    """Run the tree on a plain thread pool; return (whether it completed within ``timeout``, how many tasks began)."""
    began = 0
    lock = threading.Lock()
    pool = ThreadPoolExecutor(max_workers=threads)

    def node(levels: int) -> int:
        nonlocal began
        with lock:
            began += 1
        if levels == 0:
            return 1
        children: list[Future[int]] = [pool.submit(node, levels - 1) for _ in range(width)]
        return 1 + sum(child.result() for child in children)

    root = pool.submit(node, levels)
    try:
        root.result(timeout=timeout)
        completed = True
    except FutureTimeout:
        completed = False
    # Cancelling what is queued makes the blocked waits raise CancelledError, so the threads can end.
    pool.shutdown(wait=False, cancel_futures=True)
    with contextlib.suppress(CancelledError, FutureTimeout):
        root.result(timeout=timeout)
    return completed, began


def keyjobs_tree(db: str, quick: bool) -> list[Result]:
    from bench import runs, tasks
    from keyjobs.models import Invocation

    total = tree_size(LEVELS, WIDTH)
    results = []
    with runs.Workers(1, THREADS, name=f"recursive-{db}") as pool:
        runs.clear()
        tasks.noop.delay_many([((), {})] * total)
        runs.wait_finished(total, timeout=120, workers=pool)
        drained, _ = runs.span()
        runs.clear()
        root = tasks.fan_out.delay(LEVELS, WIDTH)
        runs.wait_finished(total, timeout=300, workers=pool)
    root.refresh_from_db()
    elapsed = (root.finished_at - root.created_at).total_seconds() if root.finished_at else None
    _, statuses = runs.span()
    paused = Invocation.objects.filter(events__to_status="PAUSED").distinct().count()
    say(f"  {db:8} fan-out {WIDTH}x{LEVELS} on {THREADS} threads: {elapsed or 0:.2f}s, root returned "
        f"{root.return_value} ({total} invocations, {paused} paused; 85 no-ops drain in {drained or 0:.2f}s) "
        f"{runs.describe(statuses)}")
    result = Result(15, "recursive", f"fan-out {WIDTH}x{LEVELS} levels t{THREADS}", db, "keyjobs", elapsed, "s",
                    reference=drained, reference_label=f"{total} no-ops drained",
                    note=f"{total} invocations, {paused} paused, root returned {root.return_value} "
                         f"{runs.describe(statuses)}".strip())
    result.judge(elapsed / drained if elapsed and drained else None)
    result.ok = root.status == "SUCCESS" and root.return_value == total
    results.append(result)
    return results


def pool_row(quick: bool) -> Result:
    timeout = POOL_TIMEOUT[quick]
    total = tree_size(LEVELS, WIDTH)
    completed, began = thread_pool(LEVELS, WIDTH, THREADS, timeout)
    say(f"  thread pool of {THREADS}: {'completed' if completed else 'deadlocked'}; {began} of {total} tasks began "
        f"in {timeout:g}s")
    return Result(15, "recursive", f"fan-out {WIDTH}x{LEVELS} levels t{THREADS}", "-", "ThreadPoolExecutor",
                  None if not completed else timeout, "s", ok=None,
                  note=f"{'completed' if completed else 'DEADLOCKED'}: {began} of {total} tasks began in {timeout:g}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.recursive", description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="A shorter timeout for the thread pool.")
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-pool", action="store_true", help="Leave out the thread pool's row.")
    parser.add_argument("--pool-only", action="store_true", help="Only the thread pool's row.")
    args = parser.parse_args(argv)
    results = Recorder(args.json)
    if args.pool_only:
        pass
    elif args.db == "both":
        child_argv = without(list(argv if argv is not None else sys.argv[1:]), "--db", "--json")
        results.add(*run_children("bench.recursive", ["sqlite", "postgres"], [*child_argv, "--no-pool"],
                                  timeout=900))
    else:
        exit_on_sigterm()
        from bench import runs

        runs.setup(args.db, name="kj_bench_recursive")
        results.add(*keyjobs_tree(args.db, args.quick))
    if not args.no_pool:
        results.add(pool_row(args.quick))
    if not args.json:
        print(table(results, title="keyjobs: a recursive task graph on 2 threads"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
