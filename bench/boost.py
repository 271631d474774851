"""Waited-on work goes first (issue 23): a fan-out graph beside a backlog of unrelated calls, with and without the boost.

    .venv/bin/python -m bench.boost [--db sqlite|postgres|both] [--quick] [--json FILE]

keyjobs: one ``runworker --threads 2`` process. ``bench.tasks.fan_out(2)``
(1 + 4 + 16 = 21 invocations, each parent waiting on its children one by
one) is delayed first, then ``BACKLOG`` unrelated calls of ``CALL`` seconds each
(``bench.tasks.work``: a call to a service); the runner
starts once both are queued. The graph is timed from the root's start to
its end, on the database's clock. Its children are created after the
backlog, so without the boost each waits behind what is left of it; with
it, a child a paused parent waits on goes to the head of the queue.

"Without" runs the same runner with the waiters never counted
(``Store.counting_waiters`` patched to write nothing in the runner's
process): every effective priority is the call's own, the order keyjobs had
before. The figure is the ratio, without / with: how many times sooner the
graph finishes; no absolute target.
"""

import argparse
import sys

from .harness import Recorder, Result, exit_on_sigterm, run_children, say, table, without

LEVELS, WIDTH, THREADS = 2, 4, 2
BACKLOG = {True: 1000, False: 1000}
#: Seconds each of the backlog's calls works: 1,000 of them keep 2 threads busy for 5 s.
CALL = 0.01


def _without_boost(argv: list[str]) -> int:
    """Run ``manage.py`` ``argv`` with the waiters never counted: the runner of the run without the boost."""
    import django

    django.setup()
    from keyjobs.store.portable import Store

    Store.counting_waiters = lambda self, ids, change, statements: statements  # type: ignore[method-assign]
    from django.core.management import execute_from_command_line

    execute_from_command_line(["manage.py", *argv])
    return 0


def graph_beside_backlog(db: str, boost: bool, backlog: int) -> tuple[float | None, float | None, bool]:
    """Run the graph beside the backlog; return (the graph's seconds, the backlog's drain seconds, whether it ended
    as it should)."""
    from bench import runs, tasks
    from keyjobs.models import Invocation

    runs.clear()
    total = sum(WIDTH**level for level in range(LEVELS + 1))
    root = tasks.fan_out.delay(LEVELS, WIDTH)
    tasks.work.delay_many([((CALL,), {})] * backlog)
    command = None if boost else [sys.executable, "-m", "bench.boost", "--runner-without-boost"]
    with runs.Workers(1, THREADS, name=f"boost-{db}-{'on' if boost else 'off'}", command=command) as pool:
        runs.wait_finished(total + backlog, timeout=600, workers=pool)
    root.refresh_from_db()
    graph = ((root.finished_at - root.started_at).total_seconds()
             if root.finished_at and root.started_at else None)
    drained, statuses = runs.span(Invocation.objects.filter(task_name=tasks.work.name))
    ok = root.status == "SUCCESS" and root.return_value == total and set(statuses) == {"SUCCESS"}
    return graph, drained, ok


def compare(db: str, quick: bool) -> list[Result]:
    backlog = BACKLOG[quick]
    graph_on, drained_on, ok_on = graph_beside_backlog(db, True, backlog)
    graph_off, drained_off, ok_off = graph_beside_backlog(db, False, backlog)
    ratio = graph_off / graph_on if graph_on and graph_off else None
    say(f"  {db:8} fan-out {WIDTH}x{LEVELS} beside {backlog} calls of {CALL:g}s on {THREADS} threads: "
        f"with the boost {graph_on or 0:.2f}s, without {graph_off or 0:.2f}s: {ratio or 0:.1f}x sooner "
        f"(the backlog drained in {drained_on or 0:.2f}s and {drained_off or 0:.2f}s)")
    result = Result(23, "boost", f"fan-out {WIDTH}x{LEVELS} beside {backlog} calls of {CALL:g}s t{THREADS}", db, "keyjobs",
                    graph_on, "s", reference=graph_off, reference_label="without the boost",
                    note=f"backlog drained in {drained_on or 0:.2f}s with, {drained_off or 0:.2f}s without")
    result.judge(ratio)
    result.ok = ok_on and ok_off
    return [result]


def main(argv: list[str] | None = None) -> int:
    args_given = list(sys.argv[1:] if argv is None else argv)
    if args_given[:1] == ["--runner-without-boost"]:
        return _without_boost(args_given[1:])
    parser = argparse.ArgumentParser(prog="python -m bench.boost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="The same run (it is short already).")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(args_given)
    results = Recorder(args.json)
    if args.db == "both":
        results.add(*run_children("bench.boost", ["sqlite", "postgres"], without(args_given, "--db", "--json"),
                                  timeout=900))
    else:
        exit_on_sigterm()
        from bench import runs

        runs.setup(args.db, name="kj_bench_boost")
        results.add(*compare(args.db, args.quick))
    if not args.json:
        print(table(results, title="keyjobs: waited-on work goes first (graph time; ratio: without / with)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
