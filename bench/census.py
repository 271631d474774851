"""A census of the SQL a keyjobs process sends: each statement by kind and by the engine step that sent it.

    python -m bench.census OUT.json runworker --threads 4      # manage.py's arguments after the file

Installed in a process (``install()``), a recording ``execute_wrapper`` on
every connection Django opens counts each statement, the round trips it
costs (psycopg's implicit ``BEGIN`` included) and, around it, the wall time,
the calling thread's CPU and, on PostgreSQL, the serving backend's CPU (read
from its CPU clock, so to the nanosecond). Commits and rollbacks are counted
the same way. The step is the innermost keyjobs function above the store
that sent the statement (``claim.wake_next``), beside the outermost one
(``execute.finish``). The census is written to a JSON file every second and
at exit, for ``bench.profile`` to add up.

A measuring tool: it adds a few microseconds to every statement. Time a run
without it.
"""

import atexit
import hashlib
import json
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .harness import cpu_seconds

#: Modules whose functions are the mechanics of a step, not the step: a statement is charged to their caller.
MECHANICS = ("keyjobs.store", "keyjobs.transitions", "keyjobs.models", "keyjobs.status", "keyjobs.faults")
#: The worker's own loop: the outermost step is the one below it.
LOOPS = ("keyjobs.worker", "keyjobs.supervisor", "keyjobs.management")

_CTE = re.compile(r"(\w+) AS (?:MATERIALIZED )?\(", re.IGNORECASE)
_TABLE = re.compile(r'\b(?:FROM|INTO|UPDATE)\s+"?(\w+)"?', re.IGNORECASE)


def kind_of(sql: str) -> str:
    """Name a statement's shape: its CTEs in order for a WITH, else its verb and first table, and a short hash."""
    text = " ".join(sql.split())
    head = text.split(" ", 1)[0].upper()
    if head in ("SAVEPOINT", "RELEASE", "ROLLBACK", "BEGIN", "COMMIT"):
        return " ".join(text.split(" ")[:2]).upper() if head in ("RELEASE", "ROLLBACK") else head
    digest = hashlib.blake2s(text.encode(), digest_size=3).hexdigest()
    if head == "WITH":
        names = list(dict.fromkeys(_CTE.findall(text)))
        return f"WITH {','.join(names)} #{digest}"
    table = _TABLE.search(text)
    target = table.group(1).removeprefix("keyjobs_") if table else text[7:40]
    return f"{head} {target} #{digest}"


class Census:
    """Statements by (outer step, step, kind): count, round trips, wall, thread CPU and backend CPU seconds."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.lock = threading.Lock()
        self.rows: dict[tuple[str, str, str], list[float]] = {}
        self.samples: dict[str, str] = {}
        #: Each backend's CPU clock when first met (its start-up) and at its last statement.
        self.backends: dict[int, list[float]] = {}
        self._kinds: dict[str, str] = {}

    def add(self, where: tuple[str, str], kind: str, *, trips: int, wall: float, cpu: float,
            server: float) -> None:
        key = (*where, kind)
        with self.lock:
            row = self.rows.get(key)
            if row is None:
                row = self.rows[key] = [0, 0, 0.0, 0.0, 0.0]
            row[0] += 1
            row[1] += trips
            row[2] += wall
            row[3] += cpu
            row[4] += server

    def kind(self, sql: str) -> str:
        kind = self._kinds.get(sql)
        if kind is None:
            kind = self._kinds[sql] = kind_of(sql)
            self.samples.setdefault(kind, " ".join(sql.split())[:600])
        return kind

    def backend(self, pid: int | None) -> float:
        """The CPU clock of backend ``pid`` now (0 without one), noting its first and latest reading."""
        if pid is None:
            return 0.0
        seconds = cpu_seconds(pid) or 0.0
        seen = self.backends.get(pid)
        if seen is None:
            self.backends[pid] = [seconds, seconds]
        else:
            seen[1] = max(seen[1], seconds)
        return seconds

    def dump(self, path: str) -> None:
        with self.lock:
            rows = [{"outer": outer, "step": step, "kind": kind, "count": r[0], "round_trips": r[1], "wall": r[2],
                     "client_cpu": r[3], "server_cpu": r[4]} for (outer, step, kind), r in self.rows.items()]
            data = {"role": self.role, "pid": os.getpid(), "process_cpu": cpu_seconds(os.getpid()), "rows": rows,
                    "sql": dict(self.samples), "backends": {str(pid): seen for pid, seen in self.backends.items()}}
        temporary = Path(f"{path}.tmp")
        temporary.write_text(json.dumps(data))
        temporary.replace(path)


def where(frame: Any) -> tuple[str, str]:
    """Return (outermost, innermost) keyjobs step above ``frame``, outside the store's mechanics and the loops."""
    inner = outer = ""
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.startswith("keyjobs."):
            if module.startswith(LOOPS):
                break
            name = f"{module.removeprefix('keyjobs.')}.{frame.f_code.co_name}"
            if not inner and not module.startswith(MECHANICS):
                inner = name
            outer = name
        frame = frame.f_back
    return outer or "(outside keyjobs)", inner or outer or "(outside keyjobs)"


def install(role: str, path: str) -> Census:
    """Count every statement of this process from now on; write the census to ``path`` every second and at exit."""
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.db.backends.signals import connection_created

    census = Census(role)

    def backend_pid(connection: Any) -> int | None:
        raw = connection.connection
        info = getattr(raw, "info", None)
        return getattr(info, "backend_pid", None)

    def opens_transaction(connection: Any) -> int:
        """1 if psycopg sends a BEGIN of its own before this statement (a round trip the wrapper does not see)."""
        raw = connection.connection
        if connection.vendor != "postgresql" or raw is None or raw.autocommit:
            return 0
        from psycopg import pq

        return int(raw.info.transaction_status == pq.TransactionStatus.IDLE)

    def record(execute: Any, sql: str, params: Any, many: bool, context: dict[str, Any]) -> Any:
        connection = context["connection"]
        pid = backend_pid(connection)
        begins = opens_transaction(connection)
        server, cpu, wall = census.backend(pid), time.thread_time(), time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            server = census.backend(pid) - server if pid is not None else 0.0
            census.add(where(sys._getframe(1)), census.kind(sql), trips=1 + begins, wall=wall, cpu=cpu,
                       server=server)

    def on_connection(sender: Any, connection: Any, **kwargs: Any) -> None:
        # Sent again each time a thread's connection reopens, to the same wrapper object.
        if record not in connection.execute_wrappers:
            connection.execute_wrappers.append(record)

    connection_created.connect(on_connection, weak=False)

    def ending(what: str, original: Any) -> Any:
        def end(self: Any) -> None:
            raw = self.connection
            if raw is None:
                return original(self)
            if self.vendor == "postgresql":
                from psycopg import pq

                trips = int(raw.info.transaction_status != pq.TransactionStatus.IDLE)
            else:
                trips = int(getattr(raw, "in_transaction", True))
            pid = backend_pid(self)
            server, cpu, wall = census.backend(pid), time.thread_time(), time.perf_counter()
            try:
                return original(self)
            finally:
                wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
                server = census.backend(pid) - server if pid is not None else 0.0
                if trips:
                    census.add(where(sys._getframe(1)), what, trips=trips, wall=wall, cpu=cpu, server=server)

        return end

    BaseDatabaseWrapper._commit = ending("COMMIT", BaseDatabaseWrapper._commit)  # type: ignore[method-assign]
    BaseDatabaseWrapper._rollback = ending("ROLLBACK", BaseDatabaseWrapper._rollback)  # type: ignore[method-assign]

    def keep_writing() -> None:
        while True:
            time.sleep(1.0)
            census.dump(path)

    threading.Thread(target=keep_writing, name="bench-census", daemon=True).start()
    atexit.register(census.dump, path)
    return census


def read(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        raise SystemExit("usage: python -m bench.census OUT.json COMMAND [ARGS...]  (manage.py's command)")
    out, command = args[0], args[1:]
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo_project.settings")
    install(command[0], out)
    from django.core.management import execute_from_command_line

    execute_from_command_line(["manage.py", *command])
    return 0


if __name__ == "__main__":
    sys.exit(main())
