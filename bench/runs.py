"""keyjobs on a scratch database: Django set-up, real worker processes, clean tables and timings.

A bench process measures one database: ``setup(db)`` points the demo's
settings at a fresh scratch database (``DATABASE_URL``) before Django starts,
and ``Workers`` runs ``manage.py runworker`` processes against the same one.
"""

import os
import sys
import time
from datetime import datetime
from typing import Any

from .harness import fresh_sqlite, recreate_postgres, spawn, stop, wait_until

DATABASES = ("sqlite", "postgres")
_url = ""


def setup(db: str, name: str | None = None) -> str:
    """Recreate the scratch database, start Django on it and migrate; return its URL.

    Its name is ``KEYJOBS_BENCH_DB`` (default kj_bench): benches run side by side each need their own.
    """
    global _url
    name = name or os.environ.get("KEYJOBS_BENCH_DB", "kj_bench")
    if db not in DATABASES:
        raise SystemExit(f"unknown database {db!r}; choose from {', '.join(DATABASES)}")
    _url = recreate_postgres(name) if db == "postgres" else fresh_sqlite(name)
    os.environ["DATABASE_URL"] = _url
    os.environ["DJANGO_SETTINGS_MODULE"] = "demo_project.settings"
    os.environ.setdefault("KEYJOBS_LOG_LEVEL", "WARNING")
    # As in production: with DEBUG on, Django's debug cursor times and records every query.
    os.environ.setdefault("DEBUG", "false")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    import bench.tasks  # noqa: F401  (registers the bench tasks in this process)

    return _url


def url() -> str:
    """The scratch database's URL, once ``setup()`` made it."""
    return _url


def clear() -> None:
    """Delete every invocation and event, leaving the runners (workers may be running, idle)."""
    from django.db import connection

    from keyjobs.models import Event, Invocation

    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {connection.ops.quote_name(Event._meta.db_table)}")
        cursor.execute(f"DELETE FROM {connection.ops.quote_name(Invocation._meta.db_table)}")


def finished() -> int:
    from keyjobs.models import Invocation

    return Invocation.objects.finished().count()


def wait_finished(total: int, *, timeout: float, workers: "Workers | None" = None, interval: float = 0.05) -> None:
    """Poll the database until ``total`` invocations are final."""
    from django.db import DatabaseError, connection

    def done() -> bool:
        try:
            return finished() >= total
        except DatabaseError:
            # The server restarted under us (another suite on this machine may do that): look again.
            connection.close()
            return False

    wait_until(done, timeout=timeout, interval=interval, what=f"{total} invocations final",
               processes=workers.processes if workers else ())


def span(queryset: Any = None) -> tuple[float | None, dict[str, int]]:
    """Return (last finished_at - first started_at in seconds, count per status) of ``queryset``."""
    from django.db.models import Count, Max, Min

    from keyjobs.models import Invocation

    queryset = Invocation.objects.all() if queryset is None else queryset
    bounds = queryset.aggregate(first=Min("started_at"), last=Max("finished_at"))
    statuses = dict(queryset.order_by().values_list("status").annotate(n=Count("id")))
    first: datetime | None = bounds["first"]
    last: datetime | None = bounds["last"]
    if first is None or last is None:
        return None, statuses
    return (last - first).total_seconds(), statuses


#: The application_name of the benches' worker processes' connections (libpq's PGAPPNAME): ``bench.harness.Backends``
#: tells their backends apart by it.
WORKER_APP = "kjbench-worker"


class Workers:
    """``count`` real ``manage.py runworker`` processes sharing ``threads`` runner threads.

    With ``census``, each runs under ``bench.census``, which writes the statements it sends to
    ``{census}-{number}.json``.
    """

    def __init__(self, count: int, threads: int, *, name: str = "worker", env: dict[str, str] | None = None,
                 census: str | None = None, command: list[str] | None = None) -> None:
        if threads % count:
            raise ValueError(f"{threads} threads do not split evenly over {count} workers")
        self.count = count
        self.threads = threads
        self.name = name
        self.env = env or {}
        self.census = census
        #: What runs ``manage.py``'s command instead of ``python manage.py`` (a runner patched for a comparison).
        self.command = command
        self.processes: list[Any] = []

    def __enter__(self) -> "Workers":
        from keyjobs.models import Runner

        before = Runner.objects.active().count()
        try:
            for number in range(self.count):
                command = ([sys.executable, "manage.py"] if self.census is None else
                           [sys.executable, "-m", "bench.census", f"{self.census}-{number}.json"])
                self.processes.append(spawn(
                    [*(self.command or command), "runworker", "--threads", str(self.threads // self.count)],
                    name=f"{self.name}-{number}",
                    env={"DATABASE_URL": _url, "PGAPPNAME": f"{WORKER_APP}-{number}", **self.env},
                ))
            wait_until(lambda: Runner.objects.active().count() >= before + self.count, timeout=60,
                       what=f"{self.count} runner(s) registered", processes=self.processes)
            self._wait_listening()
        except BaseException:
            stop(self.processes)
            raise
        return self

    def _wait_listening(self) -> None:
        """On PostgreSQL, wait until every worker LISTENs, so that the first wake-up is not lost to start-up."""
        from django.db import connection

        if connection.vendor != "postgresql":
            time.sleep(0.2)  # the pool's threads take their first look
            return

        def listening() -> bool:
            with connection.cursor() as cursor:
                cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                               "AND query ILIKE 'LISTEN%%' AND pid <> pg_backend_pid()")
                (count,) = cursor.fetchone()
            return bool(count >= self.count)

        wait_until(listening, timeout=30, what="workers listening", processes=self.processes)

    def __exit__(self, *exc: object) -> None:
        stop(self.processes)
        self.processes = []


def describe(statuses: dict[str, int]) -> str:
    """Return the statuses other than SUCCESS, e.g. "3 FAILED"."""
    bad = {status: n for status, n in statuses.items() if status != "SUCCESS"}
    return ", ".join(f"{n} {status}" for status, n in sorted(bad.items()))
