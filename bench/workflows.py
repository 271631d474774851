"""The workflow bench of issue 23: what a durable workflow's steps cost beside plain tasks.

    .venv-bench/bin/python -m bench.workflows [--db sqlite|postgres|both] [--quick] [--json FILE]

- **Overhead per step.** ``bench.tasks.child_steps(10)``: a workflow of 10
  no-op calls, each a child step it suspends on until the child ends, beside
  ``bench.tasks.chain_link(10)``: the same 10 calls as a plain chain of tasks
  (each delays the next as it ends). Both on one ``runworker --threads 2``,
  one at a time, timed from the first call's creation to the last one's end
  on the database's clock; the median of the repeats, as a ratio, and the
  difference per step.
- **Replay at step 100.** ``bench.tasks.inline_steps_then_an_event(100)``
  records 100 inline steps and suspends on an event; the event is sent and
  the resumed run (its replay of the 100 recorded steps, then its end) runs
  in this process (``workflows.resume()`` then ``execute.execute()``):
  its time and its statements, beside the same at step 1.
- **Rows per step.** The rows each of those runs left (invocations, their
  history, steps, messages), per step, beside the chain's per call.
"""

import os
import statistics
import sys
import time
from typing import Any

from .harness import Recorder, Result, bench_main, say

TARGET, METRIC = 23, "workflows"
STEPS = 10
REPLAY_AT = 100
#: Runs of each: the workflow and the chain, alternating; replays at step 100 and at step 1.
REPEATS = {True: 3, False: 10}
REPLAYS = {True: 2, False: 5}


def clear() -> None:
    """Delete every invocation and what refers to it (messages, steps, history), leaving the runners."""
    from django.db import connection

    from keyjobs.models import Event, Invocation, Message, Step

    with connection.cursor() as cursor:
        for model in (Message, Step, Event, Invocation):
            cursor.execute(f"DELETE FROM {connection.ops.quote_name(model._meta.db_table)}")


def rows(workflow: Any = None) -> int:
    """Return the rows of every table a workflow or a task writes as it runs: all, or ``workflow``'s own."""
    from keyjobs.models import Event, Invocation, Message, Step

    if workflow is None:
        return sum(model.objects.count() for model in (Invocation, Event, Step, Message))
    return (Invocation.objects.filter(pk=workflow.pk).count() + Event.objects.filter(invocation=workflow).count()
            + Step.objects.filter(workflow=workflow).count() + Message.objects.filter(workflow=workflow).count())


def elapsed(invocations: Any) -> float:
    """Return the seconds from the first creation to the last end of ``invocations``, on the database's clock."""
    from django.db.models import Max, Min

    bounds = invocations.aggregate(first=Min("created_at"), last=Max("finished_at"))
    return float((bounds["last"] - bounds["first"]).total_seconds())


def run_until_final(invocation: Any, total: int, *, workers: Any) -> None:
    from bench import runs

    runs.wait_finished(total, timeout=120, workers=workers, interval=0.01)
    invocation.refresh_from_db()
    if invocation.status != "SUCCESS":
        raise RuntimeError(f"#{invocation.pk} {invocation.task_name} ended {invocation.status}: {invocation.error}")


def steps_beside_a_chain(db: str, quick: bool, workers: Any) -> list[Result]:
    from bench import tasks
    from keyjobs.models import Invocation

    workflow_times, chain_times, workflow_rows, chain_rows = [], [], [], []
    for _ in range(REPEATS[quick]):
        clear()
        flow = tasks.child_steps.delay(STEPS)
        run_until_final(flow, STEPS + 1, workers=workers)
        workflow_times.append(elapsed(Invocation.objects.all()))
        workflow_rows.append(rows())
        clear()
        first = tasks.chain_link.delay(STEPS)
        run_until_final(first, STEPS, workers=workers)
        chain_times.append(elapsed(Invocation.objects.all()))
        chain_rows.append(rows())
    workflow, chain = statistics.median(workflow_times), statistics.median(chain_times)
    per_step = (workflow - chain) / STEPS * 1000
    say(f"  {db:8} {STEPS} child steps {workflow * 1000:.0f} ms, a chain of {STEPS} calls {chain * 1000:.0f} ms: "
        f"{workflow / chain:.2f}x, {per_step:+.1f} ms a step; rows {workflow_rows[-1]} vs {chain_rows[-1]}")
    case = f"{STEPS} child steps vs a chain of {STEPS} tasks t2"
    overhead = Result(TARGET, METRIC, case, db, "keyjobs", workflow, "s", reference=chain,
                      reference_label="the chain",
                      note=f"{per_step:+.1f} ms a step; median of {len(workflow_times)}")
    overhead.judge(workflow / chain)
    per = Result(TARGET, METRIC, f"overhead per child step ({STEPS} steps) t2", db, "keyjobs", per_step, "ms",
                 note="(workflow - chain) / steps")
    row_case = Result(TARGET, METRIC, f"rows per child step ({STEPS} steps)", db, "keyjobs",
                      round(workflow_rows[-1] / STEPS, 2), "rows", reference=chain_rows[-1] / STEPS,
                      reference_label="the chain, per call",
                      note="invocations, their history, steps, messages; the workflow's own included")
    row_case.judge(workflow_rows[-1] / chain_rows[-1])
    return [overhead, per, row_case]


def suspended_at(count: int, workers: Any) -> Any:
    """Return a workflow that recorded ``count`` inline steps and waits for its event, suspended."""
    from bench import tasks
    from bench.harness import wait_until
    from keyjobs.models import Invocation

    flow = tasks.inline_steps_then_an_event.delay(count)
    wait_until(lambda: Invocation.objects.filter(pk=flow.pk, status="PAUSED", runner__isnull=True).exists(),
               timeout=120, interval=0.01, what=f"the workflow of {count} steps to wait for its event",
               processes=workers.processes)
    return flow


def replay(flow: Any, runner: Any, *, count_queries: bool) -> tuple[float, int | None]:
    """Send the event, then resume and run ``flow`` here; return the seconds of its run and its statements."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from keyjobs import workflows
    from keyjobs.execute import execute

    workflows.send(flow, "go")
    resumed = workflows.resume(runner, using="default", queues=[], thread=0)
    if resumed is None or resumed.pk != flow.pk:
        raise RuntimeError(f"#{flow.pk} was not due after its event")
    began = time.perf_counter()
    if count_queries:
        with CaptureQueriesContext(connection) as queries:
            status = execute(resumed, runner, using="default", thread=0)
    else:
        status = execute(resumed, runner, using="default", thread=0)
    took = time.perf_counter() - began
    if status != "SUCCESS":
        raise RuntimeError(f"the replay of #{flow.pk} ended {status}")
    return took, len(queries.captured_queries) if count_queries else None


def replays(db: str, quick: bool) -> list[Result]:
    from bench import runs
    from keyjobs.models import Runner, Step

    clear()
    with runs.Workers(1, 2, name=f"workflows-replay-{db}") as workers:
        waiting = {count: [suspended_at(count, workers) for _ in range(REPLAYS[quick] + 1)]
                   for count in (REPLAY_AT, 1)}
    recorded = Step.objects.filter(workflow=waiting[REPLAY_AT][0]).count()
    runner = Runner.objects.create(host="bench", pid=os.getpid(), threads=1)
    figures: dict[int, tuple[list[float], int | None]] = {}
    for count, flows in waiting.items():
        times = [replay(flow, runner, count_queries=False)[0] for flow in flows[1:]]
        figures[count] = (times, replay(flows[0], runner, count_queries=True)[1])
    runner.delete()
    inline_rows = rows(waiting[REPLAY_AT][0])  # its whole life: recorded, suspended, sent its event, replayed, ended
    (at_100, queries_100), (at_1, queries_1) = figures[REPLAY_AT], figures[1]
    replay_100, replay_1 = statistics.median(at_100) * 1000, statistics.median(at_1) * 1000
    say(f"  {db:8} replay at step {REPLAY_AT}: {replay_100:.1f} ms, {queries_100} statements; at step 1: "
        f"{replay_1:.1f} ms, {queries_1} statements ({recorded} steps recorded before the event)")
    time_row = Result(TARGET, METRIC, f"replay at step {REPLAY_AT}", db, "keyjobs", replay_100, "ms",
                      reference=replay_1, reference_label="at step 1",
                      note=f"the resumed run to its end; median of {len(at_100)}; "
                           f"{(replay_100 - replay_1) / (REPLAY_AT - 1) * 1000:.0f} us a replayed step")
    time_row.judge(replay_100 / replay_1)
    query_row = Result(TARGET, METRIC, f"replay at step {REPLAY_AT}: statements", db, "keyjobs",
                       float(queries_100 or 0), "queries", reference=float(queries_1 or 0),
                       reference_label="at step 1", note="the resumed run's, to its end: the recorded steps are read in one query")
    query_row.judge((queries_100 or 0) / (queries_1 or 1))
    row_row = Result(TARGET, METRIC, f"rows per inline step ({REPLAY_AT} steps)", db, "keyjobs",
                     round(inline_rows / REPLAY_AT, 2), "rows",
                     note=f"{inline_rows} rows for {REPLAY_AT} steps and a wait: the workflow, its history, "
                          "its steps, its message")
    return [time_row, query_row, row_row]


def run(args: Any, results: Recorder) -> None:
    from bench import runs

    runs.setup(args.db, name="kj_bench_workflows")
    with runs.Workers(1, 2, name=f"workflows-{args.db}") as workers:
        results.add(*steps_beside_a_chain(args.db, args.quick, workers))
    results.add(*replays(args.db, args.quick))


def main(argv: list[str] | None = None) -> int:
    return bench_main(argv, module="bench.workflows", doc=__doc__, title="keyjobs: durable workflows (issue 23)",
                      run=run, quick_help=f"{REPEATS[True]} runs of each, {REPLAYS[True]} replays.")


if __name__ == "__main__":
    sys.exit(main())
