"""A runner's PostgreSQL connections: proportional to its work, within the documented bound, and behind PgBouncer.

Real ``runworker`` processes, each given an application_name of its own, and
pg_stat_activity counting what they hold: idle, busy on a keyed load, with
Django's pool, and through PgBouncer in transaction mode (CI starts it:
``KEYJOBS_TEST_PGBOUNCER_URL``).
"""

import os
import signal
import threading
import uuid
from collections.abc import Callable

import psycopg
import pytest
from django.db import connection

from bench.harness import sampled
from keyjobs import Status
from keyjobs.models import Invocation, Runner
from tests import jobs
from tests.test_worker import assert_no_two_runs_of_a_key_overlapped, read_runs
from tests.waiting import wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True), pytest.mark.slow]

#: Beside its busy threads, a runner process holds its duty thread's connection and its LISTEN connection.
BESIDE_THREADS = 2
#: An idle runner: its scout, its duty thread, its LISTEN.
IDLE = 3


def held(name: str, *, listening: bool = False) -> int:
    """Return how many connections to the server carry the application_name ``name`` (those that LISTEN)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                       + (" AND query ILIKE 'LISTEN%%'" if listening else ""), [name])
        (count,) = cursor.fetchone()
    return int(count)


def settling(condition: Callable[[], bool], checks: int = 20) -> Callable[[], bool]:
    """Return a condition that holds once ``condition`` has held on ``checks`` looks in a row."""
    streak = [0]

    def settled() -> bool:
        streak[0] = streak[0] + 1 if condition() else 0
        return streak[0] >= checks

    return settled


def keyed_load(log: str, *, keys: int, per_key: int, hold: float) -> list[Invocation]:
    calls = [((f"account-{k}", n, hold, log), {}) for n in range(per_key) for k in range(keys)]
    return jobs.record_run.delay_many(calls)


def start_workers(worker_process, count: int, threads: int, env: dict[str, str]) -> list:
    before = Runner.objects.active().count()
    workers = [worker_process("--threads", str(threads), env=env) for _ in range(count)]
    wait_for(lambda: Runner.objects.active().count() == before + count, timeout=60, what="the runners started")
    return workers


def stop_workers(workers: list) -> None:
    for worker in workers:
        worker.signal(signal.SIGTERM)
    for worker in workers:
        worker.wait(timeout=30)


def test_an_idle_runner_holds_three_connections_whatever_its_threads(worker_process):
    name = f"kj-idle-{uuid.uuid4().hex[:8]}"
    workers = start_workers(worker_process, 1, 8, {"KEYJOBS_TEST_APPLICATION_NAME": name})
    # Each thread connects for its first look, then lets go as it waits; only the scout keeps one.
    settled = settling(lambda: held(name) <= IDLE)
    wait_for(settled, timeout=60, what=f"the idle runner down to {IDLE} connections for a second")
    with sampled(lambda: held(name), closing=lambda: connection.close()) as samples:
        threading.Event().wait(2.5)  # a few polls, heartbeats and duty rounds
    assert samples and max(samples) <= IDLE, f"an idle runner of 8 threads held up to {max(samples)} connections"
    stop_workers(workers)


def test_a_busy_runner_holds_at_most_one_connection_per_thread_and_two_more(worker_process, tmp_path):
    name = f"kj-busy-{uuid.uuid4().hex[:8]}"
    log = str(tmp_path / "runs.log")
    workers = start_workers(worker_process, 1, 4, {"KEYJOBS_TEST_APPLICATION_NAME": name})
    with sampled(lambda: held(name), closing=lambda: connection.close()) as samples:
        invocations = keyed_load(log, keys=8, per_key=3, hold=0.1)
        wait_for(lambda: Invocation.objects.finished().count() == len(invocations), timeout=60,
                 what="every run final")
    assert max(samples) <= 4 + BESIDE_THREADS, f"4 threads held up to {max(samples)} connections"
    wait_for(settling(lambda: held(name) <= IDLE), timeout=60, what="the runner idle again, down to its idle connections")
    stop_workers(workers)
    assert_no_two_runs_of_a_key_overlapped(read_runs(tmp_path / "runs.log"))


def test_with_djangos_pool_busy_threads_share_its_connections(worker_process, tmp_path):
    """Eight threads busy on a pool of three: a run's own code holds no connection of keyjobs'."""
    name = f"kj-pool-{uuid.uuid4().hex[:8]}"
    log = str(tmp_path / "runs.log")
    workers = start_workers(worker_process, 1, 8, {"KEYJOBS_TEST_APPLICATION_NAME": name, "KEYJOBS_TEST_POOL": "1,3"})
    with sampled(lambda: held(name), closing=lambda: connection.close()) as samples:
        invocations = keyed_load(log, keys=8, per_key=3, hold=0.2)
        wait_for(lambda: Invocation.objects.finished().count() == len(invocations), timeout=60,
                 what="every run final")
    stop_workers(workers)
    assert Invocation.objects.filter(status=Status.SUCCESS).count() == len(invocations)
    # The pool's three, and the LISTEN connection.
    assert max(samples) <= 3 + 1, f"a pool of 3 and its LISTEN: up to {max(samples)} connections"
    runs = read_runs(tmp_path / "runs.log")
    assert_no_two_runs_of_a_key_overlapped(runs)
    assert max(sum(1 for _, _, s, e, _ in runs if s <= start < e) for _, _, start, _, _ in runs) > 3, \
        "more runs at once than the pool has connections"


PGBOUNCER_URL = os.environ.get("KEYJOBS_TEST_PGBOUNCER_URL", "")


@pytest.mark.skipif(not PGBOUNCER_URL, reason="KEYJOBS_TEST_PGBOUNCER_URL is not set (.ci/run starts PgBouncer)")
def test_behind_pgbouncer_in_transaction_mode_keys_stay_serial_and_nothing_is_lost(worker_process, tmp_path):
    """Two runners of 8 threads reach the database through PgBouncer, and LISTEN on a direct connection."""
    name = f"kj-bouncer-{uuid.uuid4().hex[:8]}"
    database = connection.settings_dict["NAME"]
    direct = os.environ.get("KEYJOBS_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/keyjobs")
    env = {"KEYJOBS_TEST_APPLICATION_NAME": name, "KEYJOBS_TEST_POSTGRES_URL": f"{PGBOUNCER_URL}/{database}",
           "KEYJOBS_TEST_LISTEN_URL": direct}
    with psycopg.connect(f"{PGBOUNCER_URL}/pgbouncer", autocommit=True) as console:
        console.execute("SHOW POOLS")  # PgBouncer's admin console answers: it is PgBouncer
        try:
            log = tmp_path / "runs.log"
            keys, per_key = 24, 6
            workers = start_workers(worker_process, 2, 8, env)
            # Their LISTEN reaches the server directly (KEYJOBS_LISTEN_DATABASE): PgBouncer cannot keep one.
            wait_for(lambda: held(name, listening=True) == 2, timeout=30, what="both runners listening")
            invocations = keyed_load(str(log), keys=keys, per_key=per_key, hold=0.02)
            clients = {row[-1] for row in console.execute("SHOW CLIENTS").fetchall()}
            assert name in clients, f"the runners are not PgBouncer's clients: {clients}"
            wait_for(lambda: Invocation.objects.finished().count() == len(invocations), timeout=120,
                     what="every run final")
            stop_workers(workers)
        finally:
            # Its server connections to the test database would keep the database from being dropped.
            console.execute(f'KILL "{database}"')
            console.execute(f'RESUME "{database}"')
    assert Invocation.objects.filter(status=Status.SUCCESS).count() == len(invocations)
    runs = read_runs(log)
    assert sorted((account, number) for account, number, *_ in runs) == sorted(
        (f"account-{k}", n) for n in range(per_key) for k in range(keys))
    assert_no_two_runs_of_a_key_overlapped(runs)
    for k in range(keys):
        in_order = [n for account, n, *_ in sorted(runs, key=lambda r: r[2]) if account == f"account-{k}"]
        assert in_order == list(range(per_key)), f"account-{k} ran out of order"
    assert len({pid for *_, pid in runs}) == 2, "both worker processes took work"
