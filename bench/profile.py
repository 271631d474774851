"""Where keyjobs spends its CPU: per Python frame (py-spy), per SQL statement (``bench.census``), per process.

    .venv-bench/bin/python -m bench.profile [--db sqlite|postgres] [--workload short] [--task call]
                                            [--workers 2] [--census] [--top 30]
    .venv-bench/bin/python -m bench.profile --workload drain [--threads 4] [--count 5000] [--census]

With a workload of ``bench.workloads`` (``short``: 100 accounts x 50 calls of
10 ms on 8 threads), the calls are made as a web app makes them, one
``delay()`` each from a client process (``bench.webapp.Client``), onto real
worker processes calling the demo's provider, and it prints:

- the CPU per invocation of each part over the run: the worker processes,
  the client, the provider, and on PostgreSQL the backends serving the
  workers and the client (each process's CPU clock);
- without ``--census``: where the workers' CPU goes, sampled by py-spy (from
  ``bench/requirements.txt``; threads waiting on a socket, a lock or the GIL
  are not sampled), as the frames with the most samples by self and by total;
- with ``--census``: every SQL statement the workers and the client sent, by
  engine step and kind, per invocation: count, round trips, wall time, the
  sending thread's CPU and the backend's CPU. The census adds a few
  microseconds a statement: time nothing with it.

``--workload drain`` queues ``--count`` no-op invocations with one
``delay_many()`` and profiles one worker of ``--threads`` draining them
(``--task noop_keyed``: all of one key, which run one at a time).
"""

import argparse
import collections
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .harness import SCRATCH, Backends, ProviderProcess, cpu_seconds, exit_on_sigterm, say


def py_spy() -> str | None:
    return shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")


@contextlib.contextmanager
def spying(pids: list[int], seconds: float, name: str, *, skip: bool = False) -> Iterator[list[Path]]:
    """Sample each of ``pids`` with py-spy while the block runs (``seconds`` at most); yield the raw output files,
    written once the block ends. Nothing with ``skip`` (a census run: sampling would distort its timings)."""
    spy = py_spy()
    if spy is None and not skip:
        say("bench: py-spy not found (pip install py-spy): no frames")
    if spy is None or skip:
        yield []
        return
    processes, outputs = [], []
    for pid in pids:
        raw = SCRATCH / f"{name}-{pid}.txt"
        raw.unlink(missing_ok=True)
        processes.append(subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))), "--rate", "250",
             "--gil", "--nonblocking", "--nolineno", "--format", "raw", "--output", str(raw)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        outputs.append(raw)
    try:
        yield outputs
    finally:
        for process in processes:
            process.send_signal(signal.SIGINT)  # py-spy writes what it sampled so far, as on Ctrl-C
        for process in processes:
            process.wait(30)


def frames(raws: list[Path], top: int) -> str:
    """The frames with most samples, by self (the frame running) and by total (anywhere on the stack)."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for raw in raws:
        if not raw.exists():
            continue
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack:
                continue
            n = int(count)
            total += n
            names = [_frame(frame) for frame in stack.split(";")]
            own[names[-1]] += n
            for name in set(names):
                inclusive[name] += n
    if not total:
        return "py-spy: no samples"
    packages: collections.Counter[str] = collections.Counter()
    for name, n in own.items():
        packages[name.split(".", 1)[0] if not name.startswith("<") else "(builtins)"] += n
    lines = [f"py-spy: {total} samples of threads holding the GIL (250/s)",
             "self, by package: " + ", ".join(f"{package} {100 * n / total:.1f}%"
                                               for package, n in packages.most_common(12)),
             f"{'self':>6}  {'total':>6}  frame"]
    shown = [name for name, _ in own.most_common(top)]
    for name in shown:
        lines.append(f"{100 * own[name] / total:5.1f}%  {100 * inclusive[name] / total:5.1f}%  {name}")
    lines += ["", f"{'total':>6}  {'self':>6}  frame (by total)"]
    for name, n in inclusive.most_common(top):
        lines.append(f"{100 * n / total:5.1f}%  {100 * own[name] / total:5.1f}%  {name}")
    return "\n".join(lines)


def _frame(frame: str) -> str:
    """``function (path/to/module.py)`` as ``module.function``, the path shortened to its package."""
    function, _, where = frame.partition(" (")
    path = where.rstrip(")").split(":")[0]
    for marker in ("site-packages/", "lib/python3.13/", "lib/python3.11/", "/work/wt/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{path.removesuffix('.py').replace('/', '.')}.{function}"


def census_table(paths: list[Path], invocations: int) -> str:
    """The statements of every census file, per invocation: by step and kind, then by kind, then the totals."""
    from . import census

    rows: dict[tuple[str, str, str], list[float]] = {}
    samples: dict[str, str] = {}
    startup = 0.0
    for path in paths:
        data = census.read(path)
        if data is None:
            continue
        samples.update(data["sql"])
        for row in data["rows"]:
            key = (data["role"], row["step"], row["kind"])
            found = rows.setdefault(key, [0, 0, 0.0, 0.0, 0.0])
            for n, name in enumerate(("count", "round_trips", "wall", "client_cpu", "server_cpu")):
                found[n] += row[name]
        startup += sum(first for first, _ in data["backends"].values())
    n = max(invocations, 1)
    header = (f"{'per inv':>8} {'trips':>6} {'wall ms':>8} {'cli ms':>7} {'srv ms':>7} {'srv us/st':>9}  "
              "process / step / statement")
    lines = [f"census: {invocations} invocations", header]
    order = sorted(rows.items(), key=lambda item: -(item[1][3] + item[1][4]))
    totals = [0.0] * 5
    for (role, step, kind), (count, trips, wall, cpu, server) in order:
        lines.append(f"{count / n:8.3f} {trips / n:6.3f} {1000 * wall / n:8.3f} {1000 * cpu / n:7.3f} "
                     f"{1000 * server / n:7.3f} {1e6 * server / max(count, 1):9.1f}  {role} / {step} / {kind}")
        for i, value in enumerate((count, trips, wall, cpu, server)):
            totals[i] += value
    lines.append(f"{totals[0] / n:8.3f} {totals[1] / n:6.3f} {1000 * totals[2] / n:8.3f} {1000 * totals[3] / n:7.3f} "
                 f"{1000 * totals[4] / n:7.3f} {1e6 * totals[4] / max(totals[0], 1):9.1f}  all statements")
    lines.append(f"backend start-up (connections opened): {1000 * startup / n:.3f} ms per invocation")
    kinds = sorted({kind for _, _, kind in rows})
    lines += ["", "statements:"] + [f"  {kind}: {samples.get(kind, '')[:400]}" for kind in kinds]
    return "\n".join(lines)


def delayed(args: argparse.Namespace) -> int:
    """Profile a workload enqueued one delay() at a time onto ``args.workers`` worker processes."""
    from django.db import connection

    from bench import runs
    from bench.webapp import CLIENT_APP, Client
    from bench.workloads import named

    workload = named(args.workload)
    extra = dict(pair.split("=", 1) for pair in args.env)
    runs.setup(args.db)
    postgres = connection.vendor == "postgresql"
    census = str(SCRATCH / f"census-{args.db}") if args.census else None
    if census:
        for stale in SCRATCH.glob(f"census-{args.db}*.json"):
            stale.unlink()
    with ProviderProcess() as provider, \
            runs.Workers(args.workers, workload.threads, name=f"profile-{args.db}", census=census,
                         env={"PROVIDER_URL": provider.url, **extra}) as pool:
        assert provider.process is not None
        runs.clear()
        provider.reset(workload.seconds)
        with Client(args.task, workload, args.order, census=f"{census}-client.json" if census else None,
                    env=extra) as client:
            parts = {"workers": [p.pid for p in pool.processes], "client": [client.pid],
                     "provider": [provider.process.pid]}
            with Backends(runs.url()) if postgres else contextlib.nullcontext() as backends:
                before = {part: sum(cpu_seconds(pid) or 0.0 for pid in pids) for part, pids in parts.items()}
                started = time.perf_counter()
                client.go()
                sampled = args.seconds or workload.cutoff
                with spying(parts["workers"], sampled, f"spy-{args.db}", skip=bool(census)) as raws, \
                        spying(parts["client"], sampled, f"spy-client-{args.db}", skip=bool(census)) as client_raws:
                    runs.wait_finished(workload.total, timeout=workload.cutoff, workers=pool)
                    seconds = time.perf_counter() - started
                    sent = client.sent()
                    cpu = {part: sum(cpu_seconds(pid) or 0.0 for pid in pids) - before[part]
                           for part, pids in parts.items()}
                    cpu["client"] = sent["cpu"]
            if backends is not None:
                cpu["worker backends"] = backends.seconds(runs.WORKER_APP)
                cpu["client backend"] = backends.seconds(CLIENT_APP)
        _, statuses = runs.span()
    n = workload.total
    print(f"{args.db}: {workload.label()} {args.order}, task {args.task}, {args.workers} worker(s)"
          f"{' with ' + ' '.join(args.env) if args.env else ''}: {n} invocations in "
          f"{seconds:.2f}s (delay() x {n} in {sent['last'] - sent['first']:.2f}s) {runs.describe(statuses)}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("CPU ms per invocation: " + ", ".join(f"{part} {1000 * value / n:.3f}" for part, value in cpu.items())
          + f"; all but the provider {1000 * sum(v for k, v in cpu.items() if k != 'provider') / n:.3f}")
    if census:
        time.sleep(0.1)
        print(census_table(sorted(SCRATCH.glob(f"census-{args.db}*.json")), n))
    elif raws:
        print("the worker processes:")
        print(frames(raws, args.top))
        print("\nthe client process (its delay() calls):")
        print(frames(client_raws, args.top))
    return 0


def drain(args: argparse.Namespace) -> int:
    """One worker draining ``args.count`` queued no-ops: its CPU and its backends' per invocation, and its frames
    or (``--census``) its statements."""
    from bench import runs

    runs.setup(args.db)
    from bench import tasks  # its tasks' module imports models: after Django's set-up

    census = str(SCRATCH / f"census-drain-{args.db}") if args.census else None
    if census:
        for stale in SCRATCH.glob(f"census-drain-{args.db}*.json"):
            stale.unlink()
    # --task noop_keyed: one key's no-ops, serial (bench.hotkey's own drain); else keyless no-ops.
    keyed = args.task == "noop_keyed"
    (tasks.noop_keyed if keyed else tasks.noop).delay_many([(("hot",) if keyed else (), {})] * args.count)
    with runs.Workers(1, args.threads, name=f"profile-{args.db}", census=census) as pool:
        pid = pool.processes[0].pid
        with Backends(runs.url()) if args.db == "postgres" else contextlib.nullcontext() as backends:
            before = (time.monotonic(), cpu_seconds(pid) or 0.0)
            with spying([pid], args.seconds or 120.0, f"spy-drain-{args.db}", skip=bool(census)) as raws:
                runs.wait_finished(args.count, timeout=300, workers=pool, interval=0.1)
                after = (time.monotonic(), cpu_seconds(pid) or 0.0)
        server = backends.seconds(runs.WORKER_APP) if backends is not None else 0.0
    elapsed, _ = runs.span()
    n = args.count
    print(f"{args.db}: {n / (elapsed or 1):,.0f} no-op invocations/s (first start to last end) on {args.threads} "
          f"threads; CPU ms per invocation: worker {1000 * (after[1] - before[1]) / n:.3f}, its backends "
          f"{1000 * server / n:.3f}; load average {os.getloadavg()[0]:.1f}")
    if census:
        time.sleep(0.1)
        print(census_table(sorted(SCRATCH.glob(f"census-drain-{args.db}*.json")), n))
    elif raws:
        print(frames(raws, args.top))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="postgres")
    parser.add_argument("--workload", default="short", help="A workload of bench.workloads, or drain.")
    parser.add_argument("--task", default="call", help="The task of bench.tasks each call delays (default call).")
    parser.add_argument("--order", default="interleaved", help="grouped or interleaved (default %(default)s).")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4, help="The drain's worker threads.")
    parser.add_argument("--count", type=int, default=5000, help="The drain's no-op invocations.")
    parser.add_argument("--census", action="store_true", help="Count the statements instead of sampling frames.")
    parser.add_argument("--seconds", type=float, default=None, help="Seconds py-spy samples (default: the run).")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="An environment variable of the workers and the client, e.g. PGOPTIONS=\"-c "
                             "plan_cache_mode=force_generic_plan\" or KEYJOBS_PREPARE_STATEMENTS=false.")
    args = parser.parse_args(argv)
    exit_on_sigterm()
    return drain(args) if args.workload == "drain" else delayed(args)


if __name__ == "__main__":
    sys.exit(main())
