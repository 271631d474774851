"""The long chaos run of issue 5, on PostgreSQL.

    .venv/bin/python -m bench.chaos [--keys 100] [--per-key 20] [--workers 3] [--threads 8]

Three runworker processes with eight threads run keyed invocations that log
their own start and end; one is killed with SIGKILL every few seconds and
replaced, and the PostgreSQL server is restarted once mid-run. Then it prints
kills, recoveries, re-executions, overlaps (must be 0) and lost (must be 0),
and exits 1 if either is not 0.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

import django
import psycopg

ROOT = Path(__file__).resolve().parent.parent
SERVER = "postgres://postgres@127.0.0.1:5432"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--per-key", type=int, default=80)
    parser.add_argument("--hold", type=float, default=0.1, help="seconds each invocation works")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--kill-every", type=float, default=2.0)
    parser.add_argument("--restart-at", type=float, default=10.0, help="seconds in; negative: never")
    parser.add_argument("--lease", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, default=900)
    options = parser.parse_args()

    database = "kj_chaos"
    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {database}")
    os.environ.update({
        "DJANGO_SETTINGS_MODULE": "demo_project.settings",
        "DATABASE_URL": f"{SERVER}/{database}",
        "KEYJOBS_HEARTBEAT_INTERVAL": str(options.lease / 6),
        "KEYJOBS_LEASE": str(options.lease),
        "KEYJOBS_LOG_LEVEL": "ERROR",
    })
    sys.path.insert(0, str(ROOT))
    django.setup()
    from django.core.management import call_command

    from tests.chaos import run_chaos

    call_command("migrate", verbosity=0)
    log = Path(tempfile.mkdtemp(prefix="keyjobs-chaos-")) / "spans.log"
    report = run_chaos(
        env=dict(os.environ), log=log, keys=options.keys, per_key=options.per_key, hold=options.hold,
        workers=options.workers, threads=options.threads, kill_every=options.kill_every,
        restart_database_at=options.restart_at if options.restart_at >= 0 else None, timeout=options.timeout,
    )
    print(f"chaos: {options.workers} workers x {options.threads} threads, {options.keys} keys x "
          f"{options.per_key} invocations of {options.hold}s, SIGKILL every {options.kill_every}s, "
          f"lease {options.lease}s")
    for line in report.lines():
        print("  " + line)
    for overlap in report.overlaps[:10]:
        print("  overlap:", overlap)
    return 1 if report.overlaps or report.lost or report.not_final or report.recovered_without_history else 0


if __name__ == "__main__":
    sys.exit(main())
