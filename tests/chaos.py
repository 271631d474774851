"""A chaos run: runworker processes killed with SIGKILL and replaced, the database restarted, then checked.

Shared by the short chaos test in the suite and ``bench/chaos.py``.
"""

import itertools
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from django.db import InterfaceError, OperationalError, connection

from keyjobs.models import Event, Invocation
from keyjobs.status import FINAL, Status

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ChaosReport:
    invocations: int = 0
    kills: int = 0
    database_restarts: int = 0
    recoveries: int = 0
    re_executions: int = 0
    overlaps: list[str] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)
    not_final: list[int] = field(default_factory=list)
    recovered_without_history: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        return [
            f"invocations       {self.invocations}",
            f"kills (SIGKILL)   {self.kills}",
            f"database restarts {self.database_restarts}",
            f"recoveries        {self.recoveries}",
            f"re-executions     {self.re_executions}",
            f"overlaps          {len(self.overlaps)} (must be 0)",
            f"lost              {len(self.lost)} (must be 0)",
            f"not final         {len(self.not_final)} (must be 0)",
            f"seconds           {self.seconds:.1f}",
        ]


def restart_postgres() -> None:
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"], check=True,
                   capture_output=True)


def start_worker(threads: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "manage.py", "runworker", "--noreload", "--threads", str(threads), "-v0"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_chaos(
    *,
    env: dict[str, str],
    log: Path,
    keys: int,
    per_key: int,
    hold: float,
    workers: int = 3,
    threads: int = 8,
    kill_every: float | None = 2.0,
    restart_database_at: float | Sequence[float] | None = None,
    timeout: float = 300,
) -> ChaosReport:
    """Enqueue keyed work, run it under kills and database restarts, and check the outcome.

    A worker is killed every ``kill_every`` seconds (None: never); PostgreSQL
    is restarted ``restart_database_at`` seconds (one time, or several) after
    the first run started, so that the restarts hit work, not start-up.
    """
    from tests import jobs

    report = ChaosReport()
    calls = [((f"key-{k}", n, hold, str(log)), {}) for n in range(per_key) for k in range(keys)]
    ids = [inv.pk for inv in jobs.record_span.delay_many(calls)]
    report.invocations = len(ids)
    killed_at: dict[int, float] = {}
    began = time.monotonic()
    processes = [start_worker(threads, env) for _ in range(workers)]
    next_kill = began + (kill_every or 0.0)
    if restart_database_at is None:
        restarts: list[float] = []
    elif isinstance(restart_database_at, (int, float)):
        restarts = [restart_database_at]
    else:
        restarts = sorted(restart_database_at)
    working_since: float | None = None
    try:
        while True:
            now = time.monotonic()
            if now - began > timeout:
                break
            if working_since is None and log.exists():
                working_since = now
            if (working_since is not None and report.database_restarts < len(restarts)
                    and now - working_since >= restarts[report.database_restarts]):
                restart_postgres()
                report.database_restarts += 1
                connection.close()
            if kill_every is not None and now >= next_kill:
                victim = processes.pop(0)
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                killed_at[victim.pid] = time.time()
                report.kills += 1
                processes.append(start_worker(threads, env))
                next_kill = now + kill_every
            try:
                if not Invocation.objects.filter(pk__in=ids).exclude(status__in=FINAL).exists():
                    break
            except (OperationalError, InterfaceError):
                connection.close()  # the database is restarting
            time.sleep(0.2)
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    report.seconds = time.monotonic() - began
    _check(report, ids, log, killed_at, keys, per_key)
    return report


def _check(report: ChaosReport, ids: list[int], log: Path, killed_at: dict[int, float], keys: int, per_key: int) -> None:
    starts: dict[tuple[str, int, int], float] = {}
    spans: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    completed: set[tuple[str, int]] = set()
    runs = 0
    for line in (log.read_text() if log.exists() else "").splitlines():
        kind, key, number, at, pid = line.split()
        ident = (key, int(number), int(pid))
        if kind == "S":
            starts[ident] = float(at)
            runs += 1
        else:
            spans[key].append((starts.pop(ident), float(at), f"{number}@{pid}"))
            completed.add((key, int(number)))
    for (key, number, pid), start in starts.items():  # runs cut short by a kill
        spans[key].append((start, killed_at.get(pid, float("inf")), f"{number}@{pid} (killed)"))
    for key, intervals in spans.items():
        intervals.sort()
        for (s1, e1, a), (s2, e2, b) in itertools.pairwise(intervals):
            if s2 < e1:
                report.overlaps.append(f"{key}: {a} [{s1:.3f}, {e1:.3f}] and {b} [{s2:.3f}, {e2:.3f}]")
    expected = {(f"key-{k}", n) for k in range(keys) for n in range(per_key)}
    report.re_executions = runs - len(expected)
    statuses = dict(Invocation.objects.filter(pk__in=ids).values_list("pk", "status"))
    report.not_final = [pk for pk, status in statuses.items() if status not in FINAL]
    report.lost = sorted(
        [pk for pk in ids if pk not in statuses]
        + [pk for pk, status in statuses.items() if status != Status.SUCCESS and status in FINAL]
    )
    if expected - completed:
        report.lost += [0] * len(expected - completed)
    recovered = set(
        Event.objects.filter(invocation_id__in=ids, note__startswith="recovered:").values_list("invocation_id", flat=True)
    )
    report.recoveries = len(recovered)
    rerun = set(Invocation.objects.filter(pk__in=ids, attempts__gt=1).values_list("pk", flat=True))
    report.recovered_without_history = sorted(rerun - recovered)
