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
from collections.abc import Iterator
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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    other = "sqlite" if TEST_DB == "postgres" else "postgres"
    keep, drop = [], []
    for item in items:
        unusable = item.get_closest_marker(other) or (
            not HAS_DJANGO_TASKS and item.get_closest_marker("django_tasks")
        )
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
    if IN_CI and TEST_DB == "postgres" and report.skipped:
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


class WorkerProcess:
    """A real ``manage.py runworker`` process on the test database.

    ``--noreload``: the demo's settings, which the tests extend, turn DEBUG and so the reloader on.
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
        )

    def wait(self, timeout: float = 60) -> str:
        """Wait for the process to exit; return its output; fail the test if it did not exit 0."""
        try:
            output, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            output, _ = self.process.communicate()
            pytest.fail(f"runworker did not exit within {timeout}s:\n{output}")
        assert self.process.returncode == 0, f"runworker exited {self.process.returncode}:\n{output}"
        return output

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def kill(self) -> None:
        """Kill the process if it still runs, and reap it."""
        if self.process.poll() is None:
            self.process.kill()
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
