import itertools
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from django.db import connection

from keyjobs import Status
from keyjobs.models import Invocation, Runner
from keyjobs.worker import Worker
from tests import jobs
from tests.waiting import wait_for


def read_runs(log: Path) -> list[tuple[str, int, float, float, int]]:
    runs = []
    for line in log.read_text().splitlines():
        account, number, start, end, pid = line.split()
        runs.append((account, int(number), float(start), float(end), int(pid)))
    return runs


def assert_no_two_runs_of_a_key_overlapped(runs):
    by_key: dict[str, list[tuple[float, float]]] = {}
    for account, _, start, end, _ in runs:
        by_key.setdefault(account, []).append((start, end))
    for account, spans in by_key.items():
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start >= end, f"two runs of {account} overlapped"


@pytest.mark.django_db(transaction=True)
def test_a_burst_worker_runs_everything_and_stops(tmp_path):
    log = tmp_path / "runs.log"
    for account in ("acme", "globex"):
        for number in range(3):
            jobs.record_run.delay(account, number, 0.01, str(log))
    Worker(threads=4, burst=True).run()
    assert set(Invocation.objects.values_list("status", flat=True)) == {Status.SUCCESS}
    runs = read_runs(log)
    assert_no_two_runs_of_a_key_overlapped(runs)
    for account in ("acme", "globex"):
        assert [number for acct, number, *_ in sorted(runs, key=lambda r: r[2]) if acct == account] == [0, 1, 2]
    runner = Runner.objects.get()
    assert runner.stopped_at is not None and runner.threads == 4


@pytest.mark.django_db(transaction=True)
def test_a_worker_serves_only_its_queues():
    mine = jobs.add.using(queue="mine").delay(1)
    theirs = jobs.add.using(queue="theirs").delay(1)
    Worker(threads=1, burst=True, queues=["mine"]).run()
    assert [Invocation.objects.get(pk=inv.pk).status for inv in (mine, theirs)] == [Status.SUCCESS, Status.REGISTERED]


@pytest.mark.django_db(transaction=True)
def test_stop_lets_running_invocations_finish(tmp_path):
    marker = str(tmp_path / "slow")
    invocation = jobs.sleep_then_return.delay(0.5, marker)
    worker = Worker(threads=2, poll_interval=0.01)
    thread = threading.Thread(target=worker.run)
    thread.start()
    deadline = time.monotonic() + 10
    while not os.path.exists(marker + ".started") and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.stop()
    thread.join(10)
    assert not thread.is_alive()
    assert invocation.wait(timeout=1) == Status.SUCCESS
    connection.close()


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_sigterm_stops_claiming_lets_running_work_finish_and_marks_the_runner_stopped(worker_process, tmp_path):
    marker = str(tmp_path / "slow")
    running = jobs.sleep_then_return.delay(1.0, marker)
    worker = worker_process("--threads", "1")
    deadline = time.monotonic() + 20
    while not os.path.exists(marker + ".started") and time.monotonic() < deadline:
        time.sleep(0.02)
    queued = jobs.add.delay(1)
    worker.signal(signal.SIGTERM)
    worker.wait(timeout=20)
    assert Invocation.objects.get(pk=running.pk).status == Status.SUCCESS
    assert Invocation.objects.get(pk=queued.pk).status == Status.REGISTERED
    assert Runner.objects.get().stopped_at is not None


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_a_second_signal_exits_at_once(worker_process, tmp_path):
    marker = str(tmp_path / "slow")
    jobs.sleep_then_return.delay(30, marker)
    worker = worker_process("--threads", "1")
    deadline = time.monotonic() + 20
    while not os.path.exists(marker + ".started") and time.monotonic() < deadline:
        time.sleep(0.02)
    worker.signal(signal.SIGTERM)
    time.sleep(0.2)
    worker.signal(signal.SIGTERM)
    assert worker.process.wait(timeout=5) == 128 + signal.SIGTERM
    worker.kill()


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_worker_processes_keep_each_key_serial_and_lose_nothing(worker_process, tmp_path):
    """Two runworker processes with eight threads each, many keys, many invocations per key."""
    log = tmp_path / "runs.log"
    keys, per_key = 24, 6
    calls = [(f"account-{k}", n, 0.02, str(log)) for n in range(per_key) for k in range(keys)]
    workers = [worker_process("--threads", "8") for _ in range(2)]
    # Both running before the work arrives: a worker alone would take it all before the other started.
    wait_for(lambda: Runner.objects.active().count() == 2, timeout=60, what="both workers started")
    invocations = jobs.record_run.delay_many([(call, {}) for call in calls])
    wait_for(lambda: Invocation.objects.finished().count() == len(invocations), timeout=120, what="every run final")
    for worker in workers:
        worker.signal(signal.SIGTERM)
        worker.wait(timeout=30)
    assert Invocation.objects.filter(status=Status.SUCCESS).count() == len(invocations)
    runs = read_runs(log)
    assert sorted((account, number) for account, number, *_ in runs) == sorted((c[0], c[1]) for c in calls)
    assert_no_two_runs_of_a_key_overlapped(runs)
    for k in range(keys):
        in_order = [n for account, n, *_ in sorted(runs, key=lambda r: r[2]) if account == f"account-{k}"]
        assert in_order == list(range(per_key)), f"account-{k} ran out of order"
    assert len({pid for *_, pid in runs}) == 2, "both worker processes took work"


@pytest.mark.django_db(transaction=True)
def test_a_prefetching_worker_runs_everything(tmp_path):
    invocations = jobs.add.delay_many([((n,), {}) for n in range(30)])
    Worker(threads=2, burst=True, prefetch=8).run()
    assert Invocation.objects.filter(status=Status.SUCCESS).count() == len(invocations)


@pytest.mark.django_db
def test_a_stopping_runner_gives_back_what_it_prefetched_but_never_started():
    from keyjobs.claim import claim
    from keyjobs.execute import give_back
    from tests.factories import RunnerFactory

    runner = RunnerFactory()
    jobs.add.delay_many([((n,), {}) for n in range(3)])
    batch = claim(runner, using="default", limit=3)
    assert len(give_back(batch, runner, using="default")) == 3
    assert Invocation.objects.filter(status=Status.REGISTERED).count() == 3


@pytest.mark.django_db
def test_a_runner_that_leaves_work_owned_is_not_marked_stopped_so_that_recovery_takes_it_back():
    from tests.factories import InvocationFactory, RunnerFactory

    worker = Worker(threads=1)
    worker.runner = RunnerFactory()
    stuck = InvocationFactory(status=Status.RUNNING, runner=worker.runner)
    worker._mark_stopped()
    assert Runner.objects.get(pk=worker.runner.pk).stopped_at is None
    assert Runner.objects.silent(lease=-1).filter(pk=worker.runner.pk).exists()  # recovery will find it
    Invocation.objects.filter(pk=stuck.pk).update(status=Status.SUCCESS)
    worker._mark_stopped()
    assert Runner.objects.get(pk=worker.runner.pk).stopped_at is not None
