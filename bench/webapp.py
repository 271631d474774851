"""Keyed work enqueued as a web app enqueues it (issue 22): one ``delay()`` per call, from a process of its own.

    .venv/bin/python -m bench.webapp [--db sqlite|postgres|both] [--workers 1,2] [--orders grouped,interleaved]
                                     [--quick] [--only short,wide,slots3,cpu]

Each row: the workload run with no queue at all in this process (threads
calling the demo's provider directly, ``bench.keyed.direct``), then on real
``manage.py runworker`` processes while a client process (``bench.client``)
makes each call with its own ``delay()``, in autocommit: each account's
calls together ("grouped": a busy key's later calls park at enqueue and are
handed over as it frees, the keyed path), and round-robin across the accounts
("interleaved"). A row is timed from the first ``delay()`` to the end of the
provider's last call, so that what enqueueing costs counts, which one
``delay_many()`` (``bench.keyed``) hides:

- short: 100 accounts x 50 calls of 10 ms, 8 threads;
- wide: 200 accounts x 5 calls of 50 ms, 16 threads;
- slots3: ``running_limit=3``, 8 accounts x 15 calls of 0.1 s, 16 threads
  (its bound: max(chain / 3, work / threads));
- cpu: the CPU seconds per invocation of the short run (worker processes,
  the client, and on PostgreSQL the backends serving them, each process's
  CPU clock read over the run) beside the same calls through a task without
  a key (``bench.tasks.call_plain``: each call its own account), in the
  first order.

Goals (issue 22): each row within 1.10x of its no-queue run; CPU per keyed
invocation within 1.5x of a keyless one. ``--quick``: 100 x 10 short calls
and 100 x 5 wide ones, grouped only.
"""

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from .harness import (
    ROOT,
    Backends,
    ProviderProcess,
    Recorder,
    Result,
    bench_main,
    cpu_seconds,
    log_path,
    run_rows,
    say,
    stop,
    wait_for_postgres,
)
from .keyed import direct
from .workloads import DELAYED, DELAYED_QUICK, Workload

ROWS = ("short", "wide", "slots3", "cpu")
#: The enqueue orders: each account's calls together (its later calls wait behind its first: the keyed path,
#: parking and hand-off), and round-robin across the accounts. --quick runs the first only.
ORDERS = ("grouped", "interleaved")
#: The application_name of the client's connection (libpq's PGAPPNAME), for ``Backends``.
CLIENT_APP = "kjbench-client"
#: The task each workload calls; the keyless twin the cpu row compares with.
TASKS = {"short": "call", "wide": "call", "slots3": "call_three"}
KEYLESS = "call_plain"


class Client:
    """A ``bench.client`` process: set up and connected on entry; ``go()`` starts its calls.

    ``system`` keyjobs (on the scratch database of ``bench.runs``) or dbos (``env`` names its database).
    """

    def __init__(self, task: str, workload: Workload, order: str, *, census: str | None = None,
                 system: str = "keyjobs", env: dict[str, str] | None = None) -> None:
        self.argv = [sys.executable, "-m", "bench.client", task, workload.name, order, "--system", system,
                     *(["--census", census] if census else [])]
        self.env = {**os.environ, "PGAPPNAME": CLIENT_APP, **(env or {})}
        if system == "keyjobs":
            from bench import runs

            self.env["DATABASE_URL"] = runs.url()
        self.process: subprocess.Popen[str] | None = None

    def __enter__(self) -> "Client":
        with open(log_path("client"), "ab") as log:
            self.process = subprocess.Popen(self.argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=log, text=True, env=self.env, start_new_session=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line.strip() != "ready":
            stop([self.process])  # type: ignore[list-item]
            raise RuntimeError(f"bench.client did not start ({line.strip() or 'no output'}); see {log_path('client')}")
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def go(self) -> None:
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def sent(self) -> dict[str, Any]:
        """Wait for the client's report: when its first delay() began and its last returned, and its CPU."""
        assert self.process is not None and self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"bench.client ended without a report; see {log_path('client')}")
        report: dict[str, Any] = json.loads(line)
        return report

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            assert self.process.stdin is not None
            self.process.stdin.close()  # its cue to exit
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                stop([self.process])  # type: ignore[list-item]


@dataclass
class Run:
    """One delayed run: its time, and the CPU seconds of each part over it."""

    seconds: float | None  # the first delay() to the provider's last call's end
    calls: int
    wall: float
    cpu: dict[str, float] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    collisions: int = 0
    sent_in: float = 0.0  # seconds the client took for its delay() calls

    def per_call_ms(self, *parts: str) -> float:
        return 1000 * sum(self.cpu.get(part, 0.0) for part in parts) / max(self.calls, 1)

    @property
    def queue_ms(self) -> float:
        """CPU ms per invocation of the queue's side: workers, client, and the backends serving them."""
        return self.per_call_ms("workers", "worker backends", "client", "client backend")

    def breakdown(self) -> str:
        parts = ", ".join(f"{name} {self.per_call_ms(name):.2f}" for name in
                          ("workers", "worker backends", "client", "client backend", "provider") if name in self.cpu)
        return f"CPU ms per invocation: {parts}"


def run_delayed(workload: Workload, task: str, pool: Any, provider: ProviderProcess, *, order: str,
                census: str | None = None) -> Run:
    """Run ``workload`` on the running ``pool``, each call delayed by a client process; measure it."""
    from django.db import connection

    from bench import runs

    runs.clear()
    provider.reset(workload.seconds)
    assert provider.process is not None
    postgres = connection.vendor == "postgresql"
    calls = workload.total
    with Client(task, workload, order, census=census) as client:
        pids = {"workers": [process.pid for process in pool.processes], "client": [client.pid],
                "provider": [provider.process.pid]}
        # Stopped (its last sample taken) while the client and the workers still hold their backends.
        with Backends(runs.url()) if postgres else contextlib.nullcontext() as backends:
            before = {part: _cpu(pid_list) for part, pid_list in pids.items()}
            start = time.perf_counter()
            client.go()
            runs.wait_finished(calls, timeout=workload.cutoff, workers=pool)
            wall = time.perf_counter() - start
            sent = client.sent()
            cpu = {part: _cpu(pid_list) - before[part] for part, pid_list in pids.items()}
            cpu["client"] = sent["cpu"]  # its own count, from its first delay() on (not its start-up)
    if backends is not None:
        cpu["worker backends"] = backends.seconds(runs.WORKER_APP)
        cpu["client backend"] = backends.seconds(CLIENT_APP)
    stats = provider.stats()
    ended = [call["ended"] for call in stats["log"] if call["ended"] is not None]
    _, statuses = runs.span()
    return Run(max(ended) - sent["first"] if ended else None, calls, wall, cpu, statuses, stats["collisions"],
               sent["last"] - sent["first"])


def _cpu(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) or 0.0 for pid in pids)


def delayed_row(workload: Workload, order: str, workers: int, db: str, bare: Result, run: Run) -> Result:
    case = f"{workload.label()} {order}, delay() each w{workers}"
    result = Result(22, "webapp", case, db, "keyjobs", run.seconds, "s", bare.measured, "no queue")
    result.judge(run.seconds / bare.measured if run.seconds and bare.measured else None, at_most=1.10)
    problems = [f"{run.collisions} collisions"] if run.collisions else []
    from bench import runs

    if runs.describe(run.statuses):
        problems.append(runs.describe(run.statuses))
    if problems:
        result.ok = False
    limit = f"{run.seconds / workload.limit:.2f}x" if run.seconds else "-"
    result.note = "; ".join([f"{limit} its limit ({workload.limit:.2f} s)", f"delay() x {run.calls} in "
                             f"{run.sent_in:.2f}s", f"{run.queue_ms:.2f} CPU ms per invocation", *problems])
    result.extra = {"wall": run.wall, "cpu": run.cpu, "calls": run.calls, "sent_in": run.sent_in,
                    "collisions": run.collisions, "statuses": run.statuses, "limit": workload.limit}
    say(f"  {db:8} {case:64} {run.seconds or 0:6.2f}s  {result.ratio or 0:.2f}x no queue  {result.note}")
    return result


def cpu_row(workload: Workload, order: str, workers: int, db: str, keyed: Run, keyless: Run, bare: Result) -> Result:
    bare_cpu = bare.extra.get("cpu", {})
    bare_ms = 1000 * (bare_cpu.get("process", 0.0) + bare_cpu.get("provider", 0.0)) / max(workload.total, 1)
    case = f"CPU per invocation, {workload.label()} {order} w{workers}"
    result = Result(22, "cpu", case, db, "keyjobs", keyed.queue_ms, "ms", keyless.queue_ms, "keyless")
    result.judge(keyed.queue_ms / keyless.queue_ms if keyless.queue_ms else None, at_most=1.5)
    result.note = (f"keyed: {keyed.breakdown()}; keyless: {keyless.breakdown()}; no queue {bare_ms:.2f} ms per call "
                   "(its threads and the provider)")
    result.extra = {"keyed": keyed.cpu, "keyless": keyless.cpu, "calls": workload.total, "no_queue_ms": bare_ms}
    say(f"  {db:8} {case:64} keyed {keyed.queue_ms:.2f} ms, keyless {keyless.queue_ms:.2f} ms per invocation")
    return result


def run_row(row: str, workload: Workload, orders: list[str], workers: int, db: str, provider: ProviderProcess,
            bare: Result, rows: list[str]) -> list[Result]:
    """Run ``row``'s workload in each order on fresh workers; for the cpu row, the first order's run beside
    the same calls through a task without a key."""
    from bench import runs

    found = []
    with runs.Workers(workers, workload.threads, name=f"webapp-{db}", env={"PROVIDER_URL": provider.url}) as pool:
        for order in orders:
            keyed = run_delayed(workload, TASKS[row], pool, provider, order=order)
            if row in rows:
                found.append(delayed_row(workload, order, workers, db, bare, keyed))
            if row == "short" and "cpu" in rows and order == orders[0]:
                keyless = run_delayed(workload, KEYLESS, pool, provider, order=order)
                found.append(cpu_row(workload, order, workers, db, keyed, keyless, bare))
    return found


def once_more(step: Any, db: str) -> Any:
    """Run ``step()``; if PostgreSQL restarted under it (another suite on this machine may do that), wait for the
    server and run it once more."""
    from django.db import DatabaseError, connections

    try:
        return step()
    except DatabaseError as exc:
        say(f"  {db:8} {type(exc).__name__}: {exc}; once more")
        connections.close_all()
        if db != "postgres" or not wait_for_postgres():
            raise
        return step()


def run_database(db: str, rows: list[str], orders: list[str], worker_counts: list[int], quick: bool,
                 results: Recorder) -> None:
    from bench import runs

    once_more(lambda: runs.setup(db), db)
    workloads = {workload.name.split("-")[0]: workload for workload in (DELAYED_QUICK if quick else DELAYED)}
    wanted = [name for name in ("short", "wide", "slots3") if name in rows or (name == "short" and "cpu" in rows)]
    with ProviderProcess() as provider:
        bare = {name: direct(workloads[name], db, provider) for name in wanted}
        results.add(*(bare[name] for name in wanted if name in rows))
        for workers in worker_counts:
            run_rows(db, wanted, lambda row, workers=workers: once_more(  # type: ignore[misc]
                lambda: run_row(row, workloads[row], orders, workers, db, provider, bare[row], rows), db),
                results, target=22, metric="webapp")


def _options(parser: Any) -> None:
    parser.add_argument("--workers", default="1,2", help="Worker processes, or a list (default %(default)s).")
    parser.add_argument("--orders", default=None,
                        help=f"Enqueue orders (default {','.join(ORDERS)}; with --quick, {ORDERS[0]}).")


def main(argv: list[str] | None = None) -> int:
    return bench_main(argv, module="bench.webapp", doc=__doc__ or "", rows=ROWS, options=_options,
                      quick_help="100 x 10 short calls and 100 x 5 wide ones.",
                      title="keyjobs, keyed work enqueued one delay() at a time (issue 22)",
                      run=lambda args, results: run_database(
                          args.db, args.only.split(","), (args.orders or (ORDERS[0] if args.quick else ",".join(ORDERS))).split(","),
                          [int(n) for n in args.workers.split(",")], args.quick, results))


if __name__ == "__main__":
    sys.exit(main())
