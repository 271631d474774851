"""keyjobs through Django's tasks framework (``django.tasks``, issue 13), beside ``delay()`` in the same run.

    .venv/bin/python -m bench.backend [--db sqlite|postgres|both] [--quick]

- enqueue: ``enqueue()`` one at a time through the backend, and ``delay()``
  one at a time, in alternating rounds so that both meet the same machine;
  goal: the backend's rate within 10% of delay()'s (ratio >= 0.90);
- keyed: a keyed workload enqueued with ``enqueue()`` (each call, one
  transaction) on real worker processes, timed as ``bench.keyed`` times
  ``delay_many()``: elapsed over the workload's limit, goal <= 1.10; the
  same workload enqueued with ``delay()`` one at a time is measured beside it.
"""

import sys
import time
from collections.abc import Callable

from .harness import ProviderProcess, Recorder, Result, bench_main, say
from .workloads import BLOCKED, WIDE, Workload

#: The scratch database: not the shared benches' kj_bench, which others may be measuring on.
SCRATCH = "kj_bench_backend"
ROUNDS = 10


def enqueue_rates(db: str, single: int) -> list[Result]:
    """Return enqueue() through the backend and delay() one at a time, in calls per second."""
    from bench import backend_tasks, runs, tasks

    runs.clear()
    tasks.noop.delay()  # the connection opens on first use
    backend_tasks.noop.enqueue()
    results = []
    for label, keyjobs_task, django_task, args in (
        ("no-op", tasks.noop, backend_tasks.noop, ()),
        ("keyed", tasks.call, backend_tasks.call, ("acct", "op")),
    ):
        spent = {"delay": 0.0, "enqueue": 0.0}
        ways: dict[str, Callable[[], object]] = {
            "delay": lambda task=keyjobs_task, args=args: task.delay(*args),
            "enqueue": lambda task=django_task, args=args: task.enqueue(*args),
        }
        per_round = max(1, single // ROUNDS)
        for number in range(ROUNDS):
            # Alternate which goes first: neither always meets a warmer cache or a fuller table.
            for way in (("delay", "enqueue") if number % 2 else ("enqueue", "delay")):
                call = ways[way]
                start = time.perf_counter()
                for _ in range(per_round):
                    call()
                spent[way] += time.perf_counter() - start
            runs.clear()
        count = per_round * ROUNDS
        delay_rate, enqueue_rate = count / spent["delay"], count / spent["enqueue"]
        say(f"  {db:8} one at a time, {label}: enqueue() {enqueue_rate:,.0f}/s, delay() {delay_rate:,.0f}/s "
            f"({enqueue_rate / delay_rate:.2f}x)")
        result = Result(13, "django", f"enqueue() one at a time ({label})", db, "keyjobs", enqueue_rate, "/s",
                        delay_rate, "delay()", note=f"{count} calls each, {ROUNDS} alternating rounds")
        results.append(result.judge(enqueue_rate / delay_rate, at_least=0.90))
    return results


def keyed(db: str, workload: Workload, workers: int, provider: ProviderProcess) -> list[Result]:
    """Return the keyed workload's time over its limit, enqueued through django.tasks and through delay()."""
    from django.db import transaction

    from bench import backend_tasks, runs, tasks

    results = []
    with runs.Workers(workers, workload.threads, name=f"django-{db}", env={"PROVIDER_URL": provider.url}) as pool:
        # Each worker imports a task's module when it first meets one: not inside either measurement.
        runs.clear()
        provider.reset(0.0)
        for number in range(workload.threads):
            backend_tasks.call.enqueue(f"warm-up {number}", "x")
            tasks.call.delay(f"warm-up {number}", "y")
        runs.wait_finished(2 * workload.threads, timeout=60, workers=pool)
        for way, enqueue in (("enqueue()", backend_tasks.call.enqueue), ("delay()", tasks.call.delay)):
            runs.clear()
            provider.reset(workload.seconds)
            calls = workload.calls_in("interleaved")
            with transaction.atomic():
                for account, op in calls:
                    enqueue(account, op)
            case = f"{workload.label()} interleaved w{workers} via {way}"
            result = Result(13, "django", case, db, "keyjobs", None, "s", workload.limit, "limit")
            try:
                runs.wait_finished(len(calls), timeout=workload.cutoff, workers=pool)
            except TimeoutError:
                results.append(result.judge(None, at_most=1.10))
                result.note = f"cut at {workload.cutoff:.0f}s"
                continue
            elapsed, statuses = runs.span()
            collisions = provider.stats()["collisions"]
            result.measured = elapsed
            result.judge(None if elapsed is None else elapsed / workload.limit, at_most=1.10)
            problems = [f"{collisions} collisions"] if collisions else []
            if runs.describe(statuses):
                problems.append(runs.describe(statuses))
            if problems:
                result.ok = False
            result.note = "; ".join(problems)
            say(f"  {db:8} {case:56} {elapsed or 0:6.2f}s  limit {workload.limit:.2f}s  {result.note}")
            results.append(result)
    return results


def run_database(db: str, quick: bool, results: Recorder) -> None:
    from bench import runs

    runs.setup(db, name=SCRATCH)
    import bench.backend_tasks  # noqa: F401  (declares the django.tasks twins in this process)

    results.add(*enqueue_rates(db, 500 if quick else 2000))
    with ProviderProcess() as provider:
        for workload in (BLOCKED, WIDE):
            results.add(*keyed(db, workload, 2, provider))


def main(argv: list[str] | None = None) -> int:
    return bench_main(argv, module="bench.backend", doc=__doc__ or "", quick_help="Fewer enqueue() calls.",
                      title="keyjobs through django.tasks: enqueue() beside delay(), keyed work over its limit",
                      run=lambda args, results: run_database(args.db, args.quick, results))


if __name__ == "__main__":
    sys.exit(main())
