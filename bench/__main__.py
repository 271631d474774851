"""Every bench of issue 6 in one run: keyjobs on SQLite and PostgreSQL, and its peers beside it.

    .venv-bench/bin/python -m bench [--quick] [--only keyed,webapp,slots,rates,hotkey,drain,...] [--db both]

Each part runs in a process of its own, one after the other (the machine has
two cores): keyjobs' keyed workloads and queue costs per database, then
Procrastinate, Celery and DBOS Transact from the peers' venv. The final table sets each
keyjobs figure beside its limit, baseline or the best peer of the same run.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .harness import ROOT, Result, postgres_reachable, run_children, say, table
from .throughput import METRICS as COST_METRICS

METRICS = ("keyed", "webapp", "slots", "rates", *COST_METRICS, "connections", "schedules", "django", "recursive",
           "values", "workflows", "boost")
PEER_METRICS = {"keyed", "webapp", "drain", "latency", "enqueue"}
PEERS = ("bench.peers.procrastinate_bench", "bench.peers.celery_bench", "bench.peers.dbos_bench")
#: What each peer needs beside the base set ``peers_python()`` probes for.
PEER_IMPORTS = {"bench.peers.dbos_bench": "dbos"}
#: Where each run's results are kept, as JSON (ignored by git).
RESULTS = ROOT / "bench" / "results"
#: Seconds a part may take before it is stopped.
BUDGET = {True: 420, False: 1500}
VENV_SETUP = (".venv-bench: python3.13 -m venv .venv-bench && "
              ".venv-bench/bin/pip install -e . -r bench/requirements.txt")


def peers_python() -> str | None:
    """Return a Python that has the peers installed: this one, or .venv-bench's."""
    probe = "import procrastinate, celery, redis, httpx, django, environ"
    for candidate in (sys.executable, str(ROOT / ".venv-bench" / "bin" / "python")):
        if Path(candidate).exists() and subprocess.run([candidate, "-c", probe], capture_output=True).returncode == 0:
            return candidate
    return None


def importable(python: str, module: str) -> bool:
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0


def redis_reachable() -> bool:
    redis_cli = shutil.which("redis-cli")
    if redis_cli is None:
        return True  # let the Celery bench say what is wrong
    return subprocess.run([redis_cli, "-h", "127.0.0.1", "-p", "6379", "ping"], capture_output=True).returncode == 0


def compare(results: list[Result]) -> list[Result]:
    """Set keyjobs' figures beside the best peer of the same run, where the issue asks for it."""
    peers = [r for r in results if r.system != "keyjobs"]

    def best(metric: str, case: str, *, low: bool = False) -> Result | None:
        found = [r for r in peers if r.metric == metric and r.case.startswith(case) and r.measured is not None]
        if not found:
            return None
        return (min if low else max)(found, key=lambda r: r.measured or 0.0)

    for r in results:
        if r.metric == "webapp" and r.system not in ("keyjobs", "no queue") and r.measured is not None:
            workload = r.case.split(" grouped,")[0].split(" interleaved,")[0]
            bare = next((p for p in results if p.system == "no queue" and p.db == "postgres"
                         and p.case == f"{workload} direct"), None)
            if bare and bare.measured:
                r.note = f"{r.note}; {r.measured / bare.measured:.2f}x the no-queue run ({bare.measured:.2f} s)"
        if r.system != "keyjobs" or r.measured is None:
            continue
        if r.metric == "drain":
            peer = best("drain", "no-op drain")
            if peer:
                r.reference, r.reference_label = peer.measured, f"{peer.system}"
                r.judge(r.measured / (peer.measured or 1), at_least=2.0)
        elif r.metric == "enqueue" and r.case.startswith("enqueue one at a time"):
            peer = best("enqueue", "enqueue one at a time")
            if peer:
                r.reference, r.reference_label = peer.measured, f"{peer.system}"
                r.judge(r.measured / (peer.measured or 1), at_least=1.0)
        elif r.metric == "keyed":
            # Beside the limit, the same workload with no queue at all: the provider's own round trip.
            workload = r.case.rsplit(" ", 2)[0]
            bare = next((p for p in peers if p.system == "no queue" and p.db == r.db and p.case == f"{workload} direct"),
                        None)
            if bare and bare.measured:
                r.note = f"{r.note}; {r.measured / bare.measured:.2f}x the no-queue run ({bare.measured:.2f} s)"
        elif r.metric == "latency":
            percentile_label = r.case.split()[1]
            peer = best("latency", f"enqueue-to-start {percentile_label}", low=True)
            if peer:
                r.reference, r.reference_label = peer.measured, f"{peer.system}"
                r.ratio = r.measured / (peer.measured or 1)
    return results


def ordered(results: list[Result]) -> list[Result]:
    systems = {"keyjobs": 0, "procrastinate": 1, "celery": 2, "dbos": 3, "dbos p0.01": 4}
    dbs = {"sqlite": 0, "postgres": 1, "redis": 2}
    return sorted(results, key=lambda r: (r.target, r.metric, r.case.split(" w")[0], systems.get(r.system, 9),
                                          dbs.get(r.db, 9), r.case))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Fewer workloads, smaller counts: about thirteen minutes.")
    parser.add_argument("--only", default=",".join(METRICS), help="Comma-separated, from: %(default)s.")
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--no-peers", action="store_true", help="Measure keyjobs alone.")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    unknown = only - set(METRICS)
    if unknown:
        parser.error(f"unknown --only {', '.join(sorted(unknown))}; choose from {', '.join(METRICS)}")
    databases = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    if "postgres" in databases and not postgres_reachable():
        say("bench: PostgreSQL is not reachable at 127.0.0.1:5432: SQLite only, and no Procrastinate")
        databases = [db for db in databases if db != "postgres"]
    quick = ["--quick"] if args.quick else []
    budget = BUDGET[args.quick]
    began = time.monotonic()
    results: list[Result] = []

    def part(title: str, module: str, dbs: list[str], argv: list[str], python: str | None = None) -> None:
        say(f"== {title}")
        start = time.monotonic()
        results.extend(run_children(module, dbs, argv, timeout=budget, python=python))
        say(f"== {title}: {time.monotonic() - start:.0f}s")

    if "keyed" in only:
        part("keyjobs: keyed workloads", "bench.keyed", databases, [*quick, "--workers", "2" if args.quick else "1,2"])
    if "webapp" in only:
        # Issue 22: keyed rows enqueued one delay() at a time from a client process, and the CPU per invocation.
        part("keyjobs: keyed work enqueued as a web app does (issue 22)", "bench.webapp", databases, quick)
    if "slots" in only:
        part("keyjobs: slots and fairness (issue 12)", "bench.slots", databases, quick)
    if "rates" in only:
        part("keyjobs: rate windows and debounce (issue 12)", "bench.rates", databases, [])
    if "django" in only:
        # Issue 13: enqueue() through Django's tasks framework beside delay(), and keyed work enqueued through it.
        part("keyjobs: through django.tasks", "bench.backend", databases, quick)
    costs = [metric for metric in COST_METRICS if metric in only]
    if costs:
        part("keyjobs: queue costs", "bench.throughput", databases, [*quick, "--only", ",".join(costs)])

    if "connections" in only and "postgres" in databases:
        part("keyjobs: connections held", "bench.connections", ["postgres"], quick)
    if "schedules" in only:
        part("keyjobs: schedules (issue 14)", "bench.schedules", databases, quick)
    if "values" in only:
        # Issue 26: 100 KB arguments kept in the rows or stored apart, and one 2 MB value shared by many calls.
        part("keyjobs: large arguments (issue 26)", "bench.values", databases, quick)
    if "workflows" in only:
        # Issue 23: a 10-step workflow beside a chain of the same 10 tasks, a replay at step 100, rows per step.
        part("keyjobs: durable workflows (issue 23)", "bench.workflows", databases, quick)
    if "recursive" in only:
        part("keyjobs: a recursive task graph", "bench.recursive", databases, [*quick, "--no-pool"])
        part("a plain thread pool: the same graph", "bench.recursive", [""], [*quick, "--pool-only"])

    if "boost" in only:
        # Issue 23: a fan-out graph beside a backlog of 1,000 calls, with and without waited-on work going first.
        part("keyjobs: waited-on work goes first (issue 23)", "bench.boost", databases, quick)

    peer_metrics = sorted(PEER_METRICS & only)
    python = None if args.no_peers or not peer_metrics else peers_python()
    if peer_metrics and not args.no_peers and python is None:
        say(f"bench: the peers are not installed; create {VENV_SETUP}")
    if python is not None:
        for module in PEERS:
            if module.endswith("procrastinate_bench") and "postgres" not in databases:
                continue
            if module.endswith("celery_bench") and not redis_reachable():
                say("bench: Redis is not reachable at 127.0.0.1:6379: no Celery")
                continue
            if module.endswith("dbos_bench") and "postgres" not in databases:
                continue
            if module in PEER_IMPORTS and not importable(python, PEER_IMPORTS[module]):
                say(f"bench: {PEER_IMPORTS[module]} is not installed in {python}; update {VENV_SETUP}")
                continue
            name = module.rsplit(".", 1)[1].removesuffix("_bench")
            # DBOS runs each row at two pollings: with --quick, in one enqueue order.
            orders = ["--orders", "grouped"] if args.quick and module.endswith("dbos_bench") else []
            part(name, module, [""], [*quick, "--only", ",".join(peer_metrics), *orders], python=python)

    results = ordered(compare(results))
    RESULTS.mkdir(parents=True, exist_ok=True)
    saved = RESULTS / time.strftime("%Y%m%d-%H%M%S.json")
    saved.write_text(json.dumps([asdict(r) for r in results], indent=1))
    judged = [r for r in results if r.ok is not None]
    print(table(results, title=f"keyjobs bench{' (quick)' if args.quick else ''}: "
                               f"{sum(bool(r.ok) for r in judged)} of {len(judged)} goals met, "
                               f"{time.monotonic() - began:.0f}s"))
    say(f"bench: results in {saved.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
