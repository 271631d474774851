"""What every bench shares: results, the provider, scratch databases, child processes, the table.

Standard library only (plus psycopg to recreate a PostgreSQL database), so
that both the project's venv and the peers' venv can import it.
"""

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: Scratch files: SQLite databases and the logs of every process a bench starts.
SCRATCH = Path(os.environ.get("KEYJOBS_BENCH_SCRATCH", Path(tempfile.gettempdir()) / "keyjobs-bench"))
#: The PostgreSQL server the benches use; each bench recreates its own database on it.
POSTGRES_URL = os.environ.get("KEYJOBS_BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("KEYJOBS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")


# -- results --------------------------------------------------------------


@dataclass
class Result:
    """One line of the final table."""

    target: int  # the number of the target in issue 6
    metric: str  # keyed | hotkey | drain | latency | enqueue | history
    case: str  # what was run, e.g. "blocked 3x4x0.4s t8 grouped w2"
    db: str  # sqlite | postgres | redis
    system: str  # keyjobs | procrastinate | celery ...
    measured: float | None
    unit: str  # s | /s | ms
    reference: float | None = None  # the limit, a baseline or a peer's figure
    reference_label: str = ""  # what reference is
    ratio: float | None = None
    goal: str = ""  # e.g. "<= 1.10"
    ok: bool | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def judge(self, ratio: float | None, *, at_most: float | None = None, at_least: float | None = None) -> "Result":
        """Set the ratio and, when a goal is given, whether it is met."""
        self.ratio = ratio
        if at_most is not None:
            self.goal = f"<= {at_most:g}"
            self.ok = ratio is not None and ratio <= at_most
        if at_least is not None:
            self.goal = f">= {at_least:g}"
            self.ok = ratio is not None and ratio >= at_least
        return self


def latency_results(target: int, metric: str, what: str, db: str, samples: Sequence[float], *, note: str,
                    p99_goal: bool = True) -> list[Result]:
    """The p50 and p99 rows of a start latency, in ms, on an idle worker; on PostgreSQL judged against the goals
    of issue 6 (p50 under 3 ms, and p99 under 10 ms unless ``p99_goal`` is false)."""
    p50, p99 = median(samples), percentile(samples, 0.99)
    p50_result = Result(target, metric, f"{what} p50, idle worker", db, "keyjobs", p50, "ms", note=note)
    p99_result = Result(target, metric, f"{what} p99, idle worker", db, "keyjobs", p99, "ms", note=note)
    if db == "postgres":
        p50_result.goal, p50_result.ok = "< 3 ms", p50 < 3
        if p99_goal:
            p99_result.goal, p99_result.ok = "< 10 ms", p99 < 10
    return [p50_result, p99_result]


def write_results(path: str | None, results: Sequence[Result]) -> None:
    if path:
        Path(path).write_text(json.dumps([asdict(result) for result in results], indent=1))


class Recorder(list[Result]):
    """The results of a bench process, written to ``path`` as each comes, so that a crash loses none."""

    def __init__(self, path: str | None) -> None:
        super().__init__()
        self.path = path

    def add(self, *results: Result) -> None:
        self.extend(results)
        write_results(self.path, self)


def read_results(path: Path) -> list[Result]:
    if not path.exists() or not path.read_text().strip():
        return []
    return [Result(**row) for row in json.loads(path.read_text())]


def percentile(values: Sequence[float], fraction: float) -> float:
    """Return the ``fraction`` quantile of ``values`` (nearest rank)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def say(*parts: object) -> None:
    """Progress on stderr, so that stdout keeps only the tables."""
    print(*parts, file=sys.stderr, flush=True)


# -- the table ------------------------------------------------------------


def _figure(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "ms":
        return f"{value:.1f} ms"
    if unit == "/s":
        return f"{value:,.0f}/s"
    return f"{value:g} {unit}"


def table(results: Sequence[Result], *, title: str = "") -> str:
    """Return ``results`` as an aligned text table."""
    header = ["#", "case", "db", "system", "measured", "vs", "ratio", "goal", "ok", "note"]
    rows = [header]
    for r in results:
        reference = r.reference_label
        if r.reference is not None:
            reference = f"{reference} {_figure(r.reference, r.unit)}"
        rows.append([
            str(r.target),
            r.case,
            r.db,
            r.system,
            _figure(r.measured, r.unit),
            reference.strip(),
            "-" if r.ratio is None else f"{r.ratio:.2f}x",
            r.goal,
            {True: "yes", False: "NO", None: ""}[r.ok],
            r.note,
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = [title] if title else []
    for number, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
        if number == 0:
            lines.append("  ".join("-" * width for width in widths) + "  ----")
    return "\n".join(line.rstrip() for line in lines)


# -- child processes ------------------------------------------------------


def log_path(name: str) -> Path:
    SCRATCH.mkdir(parents=True, exist_ok=True)
    return SCRATCH / f"{name}.log"


def spawn(argv: Sequence[str], *, name: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a process group of its own, its output in ``SCRATCH/name.log``."""
    with open(log_path(name), "ab") as log:
        return subprocess.Popen(
            list(argv), cwd=ROOT, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )


def stop(processes: Sequence[subprocess.Popen[bytes]], *, grace: float = 15.0) -> None:
    """SIGTERM each process group we started, wait up to ``grace`` seconds, then SIGKILL what is left."""
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError):
            # The group too: a prefork pool's children must not outlive their parent.
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_until(predicate: Any, *, timeout: float, interval: float = 0.05, what: str = "condition",
               processes: Sequence[subprocess.Popen[bytes]] = ()) -> None:
    """Poll ``predicate`` until true; TimeoutError past ``timeout``, RuntimeError if a process died."""
    deadline = time.monotonic() + timeout
    while not predicate():
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"{' '.join(map(str, process.args[:4]))} exited with {process.returncode} "
                                   f"while waiting for {what}; see {SCRATCH}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached in {timeout:.0f}s")
        time.sleep(interval)


# -- the provider ---------------------------------------------------------


class ProviderProcess:
    """The demo's provider (``python -m demo_project.provider``) in a process of its own."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[str] | None = None
        self.url = ""

    def __enter__(self) -> "ProviderProcess":
        self.process = subprocess.Popen(
            [sys.executable, "-m", "demo_project.provider", "--port", "0", "--quiet", "--hold", "0"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
            start_new_session=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if "listening on " not in line:
            self.process.kill()
            raise RuntimeError(f"the provider did not start: {line.strip()}")
        self.url = line.split("listening on ", 1)[1].split()[0]
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.stdout and self.process.stdout.close()
            stop([self.process])  # type: ignore[list-item]

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            answer: dict[str, Any] = json.loads(response.read())
            return answer

    def reset(self, hold: float) -> None:
        self._request("POST", "/reset", {"hold": hold})

    def stats(self) -> dict[str, Any]:
        return self._request("GET", "/stats")

    def span(self, stats: dict[str, Any] | None = None) -> float | None:
        """Seconds from the first call's start to the last call's end, as the provider saw them."""
        log = (stats or self.stats())["log"]
        ended = [call["ended"] for call in log if call["ended"] is not None]
        if not log or not ended:
            return None
        return max(ended) - min(call["started"] for call in log)


# -- CPU ------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """CPU seconds process ``pid`` has used, all its threads, to the nanosecond; None once it has ended.

    Read from its CPU clock (the clock ``clock_getcpuclockid(3)`` names),
    not ``/proc/PID/stat``, whose ticks are 10 ms: a statement costs less.
    """
    try:
        return time.clock_gettime(((~pid) << 3) | 2)
    except OSError:
        return None


class Backends:
    """The CPU seconds of the PostgreSQL backends of this database, by ``application_name``, over a block.

    A thread samples ``pg_stat_activity`` and each backend's CPU clock every
    ``every`` seconds: a backend that ends between two samples loses what it
    used since the last. Start the processes measured with ``PGAPPNAME`` set
    (libpq's default ``application_name``) to tell their backends apart.
    """

    def __init__(self, url: str, *, every: float = 0.05) -> None:
        self.url = url
        self.every = every
        self._base: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._names: dict[int, str] = {}
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._connection: Any = None

    def __enter__(self) -> "Backends":
        import psycopg

        self._connection = psycopg.connect(self.url.replace("postgres://", "postgresql://", 1), autocommit=True)
        self._sample(first=True)
        self._thread = threading.Thread(target=self._run, name="bench-backends", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Take a last sample and stop sampling (before the processes measured stop: their backends end then)."""
        if self._thread is None:
            return
        self._done.set()
        self._thread.join(10)
        self._thread = None
        with contextlib.suppress(Exception):
            self._sample()
        self._connection.close()

    def _run(self) -> None:
        while not self._done.wait(self.every):
            with contextlib.suppress(Exception):
                self._sample()

    def _sample(self, *, first: bool = False) -> None:
        rows = self._connection.execute(
            "SELECT pid, application_name FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchall()
        for pid, name in rows:
            seconds = cpu_seconds(pid)
            if seconds is None:
                continue
            if pid not in self._base:
                # One there before the block counts from now; one born during it, from its birth.
                self._base[pid] = seconds if first else 0.0
            self._last[pid] = seconds
            self._names[pid] = name or ""

    def seconds(self, prefix: str = "") -> float:
        """CPU seconds used within the block by the backends whose application_name starts with ``prefix``."""
        return sum(self._last[pid] - self._base[pid] for pid, name in self._names.items() if name.startswith(prefix))

    def count(self, prefix: str = "") -> int:
        """How many backends whose application_name starts with ``prefix`` were seen."""
        return sum(1 for name in self._names.values() if name.startswith(prefix))


# -- scratch databases ----------------------------------------------------


def recreate_postgres(name: str) -> str:
    """Drop and create the PostgreSQL database ``name``; return its URL.

    If the server is restarting (another suite on this machine may restart it), wait for it and try again.
    """
    import psycopg

    for attempt in (1, 2, 3):
        try:
            with psycopg.connect(f"{POSTGRES_URL}/postgres", autocommit=True) as connection:
                connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                connection.execute(f'CREATE DATABASE "{name}"')
            break
        except psycopg.OperationalError:
            if attempt == 3 or not wait_for_postgres():
                raise
            time.sleep(1.0)
    return f"{POSTGRES_URL}/{name}"


class Connection:
    """A bench's own autocommit connection to a PostgreSQL database, opened again after the server restarted
    (another suite on this machine may restart it): a statement that meets a lost connection runs once more."""

    def __init__(self, url: str) -> None:
        self.url = url.replace("postgres://", "postgresql://", 1)
        self._connection: Any = None

    @property
    def connection(self) -> Any:
        import psycopg

        if self._connection is None or self._connection.closed or self._connection.broken:
            self._connection = psycopg.connect(self.url, autocommit=True)
        return self._connection

    def execute(self, query: str, params: Sequence[Any] = ()) -> Any:
        import psycopg

        try:
            return self.connection.execute(query, params)
        except psycopg.OperationalError:
            self.close()
            return self.connection.execute(query, params)

    def scalar(self, query: str, *params: Any) -> Any:
        return self.execute(query, params).fetchone()[0]

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def fresh_sqlite(name: str) -> str:
    """Remove the SQLite file ``SCRATCH/name.sqlite3`` and its journals; return its URL."""
    SCRATCH.mkdir(parents=True, exist_ok=True)
    path = SCRATCH / f"{name}.sqlite3"
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return f"sqlite:///{path}"


def wait_for_postgres(timeout: float = 60.0) -> bool:
    """Wait until PostgreSQL takes connections again (another suite on this machine may restart it)."""
    deadline = time.monotonic() + timeout
    while not postgres_reachable():
        if time.monotonic() > deadline:
            return False
        time.sleep(1.0)
    return True


def postgres_reachable() -> bool:
    try:
        import psycopg

        with psycopg.connect(f"{POSTGRES_URL}/postgres", connect_timeout=3):
            return True
    except Exception:
        return False


# -- running a bench per database in a child -------------------------------


def run_children(module: str, databases: Sequence[str], argv: Sequence[str], *, timeout: float,
                 python: str | None = None) -> list[Result]:
    """Run ``python -m module --db X argv --json F`` for each database; return every child's results.

    A child past ``timeout`` gets SIGTERM, which it turns into SystemExit so
    that its ``finally`` blocks stop the workers it started.
    """
    results: list[Result] = []
    for db in databases:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
            out = Path(handle.name)
        argv_db = ["--db", db] if db else []
        child = subprocess.Popen([python or sys.executable, "-m", module, *argv_db, *argv, "--json", str(out)],
                                 cwd=ROOT, stdin=subprocess.DEVNULL)
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:
            say(f"bench: {module} {db} ran over {timeout:.0f}s: stopping it")
            child.terminate()
            try:
                child.wait(60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        except BaseException:
            child.terminate()
            child.wait()
            raise
        if child.returncode:
            say(f"bench: {module} {db} exited with {child.returncode}")
        results += read_results(out)
        out.unlink(missing_ok=True)
    return results


def without(argv: Sequence[str], *options: str) -> list[str]:
    """Return ``argv`` without ``options`` and their values (``--db x`` or ``--db=x``)."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in options:
            skip = True
            continue
        if any(arg.startswith(option + "=") for option in options):
            continue
        kept.append(arg)
    return kept


def run_rows(db: str, rows: Sequence[str], run: Callable[[str], Sequence[Result]], results: Recorder, *,
             target: int, metric: str) -> None:
    """Run each row with ``run(row)``; a row that times out or fails becomes a failed row, and the next runs."""
    for row in rows:
        try:
            results.add(*run(row))
        except (TimeoutError, RuntimeError) as exc:
            say(f"  {db:8} {row}: {type(exc).__name__}: {exc}")
            results.add(Result(target, metric, row, db, "keyjobs", None, "", ok=False,
                               note=f"{type(exc).__name__}: {str(exc)[:80]}"))


def bench_main(argv: list[str] | None, *, module: str, doc: str, title: str,
               run: Callable[[argparse.Namespace, Recorder], None], rows: Sequence[str] = (),
               quick_help: str = "Smaller counts.", timeout: float = 1800,
               options: Callable[[argparse.ArgumentParser], None] | None = None,
               databases: Sequence[str] = ("sqlite", "postgres")) -> int:
    """The command line every per-database bench shares: ``--db sqlite|postgres|both``, ``--quick``, ``--json``,
    and ``--only`` when the bench has ``rows``.

    ``--db both`` runs the bench once per database of ``databases``, each in a
    child process given the same arguments; otherwise ``run(args, results)``
    runs here. A bench of one database offers only it.
    Without ``--json`` the results are printed as a table under ``title``.
    """
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0])
    choices = [*databases, "both"] if len(databases) > 1 else list(databases)
    parser.add_argument("--db", choices=choices, default=choices[-1])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    if rows:
        parser.add_argument("--only", default=",".join(rows), help="Comma-separated, from: %(default)s.")
    parser.add_argument("--json", default=None, help="Also write the results to this file.")
    if options:
        options(parser)
    args = parser.parse_args(argv)
    if rows:
        unknown = set(args.only.split(",")) - set(rows)
        if unknown:
            parser.error(f"unknown --only {', '.join(sorted(unknown))}; choose from {', '.join(rows)}")
    results = Recorder(args.json)
    if args.db == "both":
        child_argv = without(argv if argv is not None else sys.argv[1:], "--db", "--json")
        results.add(*run_children(module, databases, child_argv, timeout=timeout))
    else:
        exit_on_sigterm()
        run(args, results)
    if not args.json:
        print(table(results, title=title))
    return 0


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that ``finally`` blocks stop what this process started."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


@contextlib.contextmanager
def sampled(count: Callable[[], int], *, every: float = 0.02,
            closing: Callable[[], None] | None = None) -> Iterator[list[int]]:
    """Sample ``count()`` every ``every`` seconds on a thread of its own while the block runs; yield the samples.

    ``closing`` runs on that thread when it ends (to close the connection it used: pass
    ``lambda: connection.close()``, since Django's ``connection.close`` binds the caller's thread).
    """
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        try:
            while not done.wait(every):
                samples.append(count())
        finally:
            if closing:
                closing()

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        done.set()
        thread.join(10)


@contextlib.contextmanager
def timed() -> Iterator[list[float]]:
    """``with timed() as t: ...``; then ``t[0]`` is the seconds the block took."""
    box: list[float] = []
    start = time.perf_counter()
    try:
        yield box
    finally:
        box.append(time.perf_counter() - start)
