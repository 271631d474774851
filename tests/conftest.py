"""Shared fixtures: the database under test, factories' data, and real worker processes.

The suite runs once per database (KEYJOBS_TEST_DB=sqlite|postgres). Tests
marked ``postgres`` or ``sqlite`` are deselected on the other database; in CI
a ``postgres`` test that is skipped counts as a failure, and an unreachable
PostgreSQL fails the run instead of skipping it.
"""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import django
import pytest
from django.db import connection

ROOT = Path(__file__).resolve().parent.parent
TEST_DB = os.environ.get("KEYJOBS_TEST_DB", "sqlite")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


#: Django's tasks framework with task options is Django 6.1's: before it, keyjobs.backend is refused by a
#: check (keyjobs.E132) and its tests are deselected, not skipped (a skipped PostgreSQL test fails CI).
HAS_DJANGO_TASKS = django.VERSION >= (6, 1)

#: Where several suites share one PostgreSQL server (engineers side by side on one machine), a test that
#: restarts it breaks the others' runs: KEYJOBS_TEST_NO_RESTART=1 deselects those tests. CI refuses it.
NO_RESTART = os.environ.get("KEYJOBS_TEST_NO_RESTART") == "1"
if NO_RESTART and IN_CI:
    raise RuntimeError("KEYJOBS_TEST_NO_RESTART=1 in CI: every PostgreSQL test must run there")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    other = "sqlite" if TEST_DB == "postgres" else "postgres"
    keep, drop = [], []
    for item in items:
        unusable = item.get_closest_marker(other) or (
            not HAS_DJANGO_TASKS and item.get_closest_marker("django_tasks")
        ) or (NO_RESTART and item.get_closest_marker("restarts_postgres"))
        (drop if unusable else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_report_header(config: pytest.Config) -> str:
    header = f"keyjobs test database: {TEST_DB}{' (CI: skipped PostgreSQL tests fail)' if IN_CI else ''}"
    if not HAS_DJANGO_TASKS:
        header += f"\nDjango {django.get_version()}: the django.tasks backend's tests are deselected (Django 6.1's)"
    return header


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    # An expected failure (xfail, reported as skipped) ran: it is a known gap held by its test, not a skip.
    if IN_CI and TEST_DB == "postgres" and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every PostgreSQL test must run: {report.longrepr}"
    return report


def pytest_sessionstart(session: pytest.Session) -> None:
    if TEST_DB != "postgres":
        return
    import psycopg
    from django.conf import settings

    url = os.environ.get("KEYJOBS_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/keyjobs")
    params = settings.DATABASES["default"]
    try:
        psycopg.connect(
            dbname="postgres", user=params["USER"], host=params["HOST"], port=params["PORT"] or 5432,
            password=params["PASSWORD"], connect_timeout=5,
        ).close()
    except psycopg.OperationalError as exc:
        message = f"PostgreSQL at {url} is not reachable: {str(exc).strip()}"
        if IN_CI:
            raise pytest.UsageError(message) from None
        pytest.exit(f"{message}\nStart it, or run only the SQLite half with `make test-sqlite`.", returncode=1)


def _sessions_of_others() -> list[tuple[Any, ...]]:
    """Return the other sessions on the test database: (pid, application, state, last statement)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid, application_name, state, left(query, 200) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return cursor.fetchall()


@pytest.fixture(autouse=True)
def _no_session_left_open(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a PostgreSQL test that leaves a session open on the test database once its fixtures are torn down.

    A thread of this process that ended without closing its connection, or one still running, keeps a session:
    PostgreSQL then refuses to drop the test database at the end of the run, and the whole run fails on a test
    that did not cause it. Here the test that did is named, and the sessions it left are ended, so that the
    tests after it and the teardown are not hurt. Sessions of processes that were killed get a moment to go.
    """
    yield
    marker = request.node.get_closest_marker("django_db")
    if TEST_DB != "postgres" or not (marker and marker.kwargs.get("transaction")) or \
            request.node.get_closest_marker("restarts_postgres"):  # a restart ends every session, its own included
        return
    deadline = time.monotonic() + 5
    while (left := _sessions_of_others()) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", [[row[0] for row in left]])
        pytest.fail(f"the test left {len(left)} session(s) open on the test database: {left}")


def _parents() -> dict[int, tuple[int, int]]:
    """Return each process's (parent, session), read from /proc."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    # pid (comm) state ppid pgrp session ...: comm may hold spaces and parentheses.
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # it ended meanwhile
            found[int(entry)] = (int(fields[1]), int(fields[3]))
    return found


def kill_tree(pid: int) -> None:
    """Kill process ``pid``, a child of this one not reaped yet that leads a session of its own, and all it started.

    However they detached: a supervisor's worker processes take process
    groups of their own (so a group kill misses them), the demo's take
    sessions of their own. Each is stopped as it is found, so that none
    starts another meanwhile; all are then killed. Those left by a leader
    that died before keep its session, and are found by it.
    """
    stopped: list[int] = []
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            os.kill(current, signal.SIGSTOP)
        except ProcessLookupError:
            continue
        stopped.append(current)
        pending += [child for child, (parent, session) in _parents().items()
                    if (parent == current or session == pid) and child not in stopped and child not in pending]
    for each in stopped:
        with suppress(ProcessLookupError):
            os.kill(each, signal.SIGKILL)


class WorkerProcess:
    """A real ``manage.py runworker`` process on the test database, in a session of its own.

    ``--noreload``: the demo's settings, which the tests extend, turn DEBUG and so the reloader on. Its own
    session: ``kill()`` ends the whole tree (a supervisor's worker processes too), so that none is left
    holding its output (and the test waiting for it) once a test fails.
    """

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        environment = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "KEYJOBS_TEST_DB_NAME": connection.settings_dict["NAME"],
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "runworker", "--noreload", *args],
            cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )

    def wait(self, timeout: float = 60) -> str:
        """Wait for the process to exit; return its output; fail the test if it did not exit 0."""
        try:
            output, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(self.process.pid)
            output, _ = self.process.communicate()
            pytest.fail(f"runworker did not exit within {timeout}s:\n{output}")
        assert self.process.returncode == 0, f"runworker exited {self.process.returncode}:\n{output}"
        return output

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def kill(self) -> None:
        """Kill the process and all it started, if any still runs, and reap it."""
        if self.process.returncode is None:  # not reaped yet: its pid (and session) cannot be another's
            kill_tree(self.process.pid)
        if not self.process.stdout.closed:
            self.process.communicate()


@pytest.fixture
def worker_process() -> Iterator[type[WorkerProcess]]:
    """Start real runworker processes (with transaction=True tests); all are killed at teardown."""
    started: list[WorkerProcess] = []

    class Tracked(WorkerProcess):
        def __init__(self, *args: str, **kwargs: dict[str, str]) -> None:
            super().__init__(*args, **kwargs)
            started.append(self)

    yield Tracked
    for process in started:
        process.kill()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless chromium for a module's page tests (``tests.browser``), quit after the module."""
    from tests.browser import chromium

    with chromium() as driver:
        yield driver
