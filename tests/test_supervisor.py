"""``runworker --processes``: a supervisor and its worker processes, all real processes on the test database."""

import os
import signal
import time

import pytest

from keyjobs import Status
from keyjobs.models import Event, Invocation, Runner
from tests import jobs
from tests.waiting import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def children(supervisor: Runner | None = None) -> list[Runner]:
    return list(Runner.objects.filter(supervisor__isnull=False, **({"supervisor": supervisor} if supervisor else {}))
                .order_by("pk"))


def test_a_pool_runs_everything_and_its_runners_are_linked_to_the_supervisor(worker_process):
    invocations = jobs.add.delay_many([((n,), {}) for n in range(20)])
    worker_process("--processes", "2", "--threads", "2", "--burst").wait(timeout=90)
    assert Invocation.objects.filter(status=Status.SUCCESS).count() == len(invocations)
    supervisor = Runner.objects.get(supervisor__isnull=True)
    assert supervisor.threads == 0 and supervisor.stopped_at is not None
    workers = children(supervisor)
    assert len(workers) == 2 and {worker.threads for worker in workers} == {2}
    assert len({worker.pid for worker in workers} | {supervisor.pid}) == 3
    assert all(worker.stopped_at is not None and not worker.lost for worker in workers)


def test_a_sigkilled_worker_process_is_replaced_and_its_work_recovered_at_once(worker_process, tmp_path):
    marker = str(tmp_path / "slow")
    invocation = jobs.sleep_then_return.delay(1.0, marker)
    pool = worker_process("--processes", "1", "--threads", "1", env={"KEYJOBS_LEASE": "600"})
    wait_for(lambda: os.path.exists(marker + ".started"), timeout=60, what="the run to start")
    [doomed] = children()
    os.kill(doomed.pid, signal.SIGKILL)
    # Recovered by the supervisor, not by a lease of ten minutes running out.
    assert invocation.wait(timeout=60) == Status.SUCCESS
    assert Invocation.objects.get(pk=invocation.pk).attempts == 2
    recovered = Event.objects.get(invocation=invocation, from_status=Status.RUNNING, to_status=Status.REGISTERED)
    assert "died (exit on signal SIGKILL)" in recovered.note
    doomed.refresh_from_db()
    assert doomed.lost and doomed.stopped_at is not None
    assert len(children()) == 2, "a replacement started"
    pool.signal(signal.SIGTERM)
    pool.wait(timeout=30)


def test_a_hard_limited_run_is_killed_at_its_limit_its_key_frees_and_nothing_else_is_lost(worker_process, tmp_path):
    marker = str(tmp_path / "run")
    # One process of two threads: the hard-limited run and a neighbour share the process that is killed.
    stuck = jobs.hard_limited.delay("acme", 600, marker + "-stuck")
    neighbour = jobs.sleep_then_return.delay(1.5, marker + "-neighbour")
    next_of_key = jobs.hard_limited.delay("acme", 0, marker + "-next")
    pool = worker_process("--processes", "1", "--threads", "2", env={"KEYJOBS_LEASE": "600"})
    assert stuck.wait(timeout=60) == Status.FAILED
    stuck.refresh_from_db()
    assert stuck.error_type == "keyjobs.exceptions.TimeLimitExceeded"
    assert "stopped at its time limit of 1s: its process was killed" in stuck.error
    # Stopped at its limit, not at the end of its ten minutes.
    assert (stuck.finished_at - stuck.started_at).total_seconds() < 30
    assert next_of_key.wait(timeout=60) == Status.SUCCESS
    assert neighbour.wait(timeout=60) == Status.SUCCESS
    killed = Runner.objects.get(pk=stuck.runner_id)
    assert killed.lost and "passed its hard time limit of 1s" in killed.stop_reason
    assert len(children()) == 2, "a replacement started"
    pool.signal(signal.SIGTERM)
    pool.wait(timeout=30)


def test_sigterm_stops_the_pool_gracefully(worker_process, tmp_path):
    marker = str(tmp_path / "slow")
    running = jobs.sleep_then_return.delay(1.5, marker)
    pool = worker_process("--processes", "2", "--threads", "1")
    wait_for(lambda: os.path.exists(marker + ".started"), timeout=60, what="the run to start")
    pool.signal(signal.SIGTERM)
    pool.wait(timeout=30)
    assert Invocation.objects.get(pk=running.pk).status == Status.SUCCESS
    assert not Runner.objects.filter(stopped_at__isnull=True).exists()
    assert not Runner.objects.filter(lost=True).exists()


def test_a_second_signal_makes_the_workers_exit_at_once_and_their_work_goes_back_to_the_queue(worker_process, tmp_path):
    marker = str(tmp_path / "slow")
    running = jobs.sleep_then_return.delay(600, marker)
    pool = worker_process("--processes", "1", "--threads", "1", env={"KEYJOBS_LEASE": "600"})
    wait_for(lambda: os.path.exists(marker + ".started"), timeout=60, what="the run to start")
    pool.signal(signal.SIGTERM)
    time.sleep(0.5)  # two signals at once would be handled as one
    pool.signal(signal.SIGTERM)
    pool.wait(timeout=30)
    # Not left to a lease of ten minutes: the supervisor reaped the process and took its work back.
    assert Invocation.objects.get(pk=running.pk).status == Status.REGISTERED
    assert not Runner.objects.filter(stopped_at__isnull=True).exists()


def test_a_worker_process_is_replaced_after_max_tasks_per_child(worker_process):
    invocations = jobs.add.delay_many([((n,), {}) for n in range(5)])
    worker_process("--processes", "1", "--threads", "1", "--max-tasks-per-child", "2", "--burst").wait(timeout=90)
    assert Invocation.objects.filter(status=Status.SUCCESS).count() == len(invocations)
    ran = [Invocation.objects.filter(runner=worker).count() for worker in children()]
    assert ran == [2, 2, 1]
