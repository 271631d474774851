"""Where a keyjobs worker spends its time draining no-op invocations.

    .venv-bench/bin/python -m bench.profile [--db sqlite|postgres] [--threads 4] [--seconds 8]

Queues no-op invocations, starts one real worker on them and, while it
drains, measures the CPU the worker process and the PostgreSQL server
processes use per invocation, and samples the worker with py-spy (from
``bench/requirements.txt``) while it holds the GIL: the frames printed are
where its CPU goes.
"""

import argparse
import collections
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .harness import SCRATCH, exit_on_sigterm, say


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu_seconds() -> float:
    """CPU seconds of every PostgreSQL server process on this machine."""
    total = 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/comm").read_text().startswith("postgres"):
                total += cpu_seconds(int(pid))
        except (OSError, IndexError):
            pass  # it ended meanwhile
    return total


def py_spy() -> str | None:
    return shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")


def summarize(raw: Path, top: int) -> str:
    """Return the frames holding most GIL samples (inclusive), from py-spy's raw output."""
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        total += int(count)
        names = set()
        for frame in stack.split(";"):
            function, _, where = frame.partition(" (")
            names.add(f"{function} ({where.split(':')[0].rsplit('/', 1)[-1]})")
        for name in names:
            inclusive[name] += int(count)
    lines = [f"{100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join([f"{total} samples with the GIL held, inclusive:", *lines])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="postgres")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args(argv)
    exit_on_sigterm()
    from bench import runs, tasks

    runs.setup(args.db)
    tasks.noop.delay_many([((), {})] * 20_000)
    raw = SCRATCH / f"profile-{args.db}.txt"
    spy = py_spy()
    with runs.Workers(1, args.threads, name=f"profile-{args.db}") as pool:
        pid = pool.processes[0].pid
        time.sleep(1.0)  # past start-up
        before = (time.monotonic(), runs.finished(), cpu_seconds(pid), server_cpu_seconds())
        if spy:
            subprocess.run([spy, "record", "--pid", str(pid), "--duration", str(int(args.seconds)), "--rate", "200",
                            "--gil", "--nonblocking", "--format", "raw", "--output", str(raw)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        else:
            say("bench: py-spy not found (pip install py-spy): CPU figures only")
            time.sleep(args.seconds)
        after = (time.monotonic(), runs.finished(), cpu_seconds(pid), server_cpu_seconds())
    seconds, done = after[0] - before[0], after[1] - before[1]
    worker_ms = 1000 * (after[2] - before[2]) / max(done, 1)
    server_ms = 1000 * (after[3] - before[3]) / max(done, 1)
    print(f"{args.db}: {done / seconds:,.0f} no-op invocations/s on {args.threads} threads; "
          f"worker process {100 * (after[2] - before[2]) / seconds:.0f}% CPU, {worker_ms:.2f} ms per invocation; "
          f"database server {server_ms:.2f} ms per invocation")
    if spy and raw.exists():
        print(summarize(raw, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
