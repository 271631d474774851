"""``runworker --processes``: a supervisor and its worker processes, all real processes on the test database."""

import os
import signal
import threading
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


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_killing_a_pool_ends_its_worker_processes_too(worker_process, tmp_path):
    """What a failed test's teardown does: no worker process of the pool is left running, holding the output."""
    marker = str(tmp_path / "slow")
    jobs.sleep_then_return.delay(600, marker)
    pool = worker_process("--processes", "1", "--threads", "1", env={"KEYJOBS_LEASE": "600"})
    wait_for(lambda: os.path.exists(marker + ".started"), timeout=60, what="the run to start")
    [worker] = children()
    killing = threading.Thread(target=pool.kill)
    killing.start()
    killing.join(30)
    assert not killing.is_alive(), "kill() waited for the orphaned worker's output"
    wait_for(lambda: not alive(worker.pid), timeout=10, what="the worker process to end")


def test_a_poison_pill_ends_failed_after_max_recoveries_and_the_other_keys_are_served(worker_process, tmp_path):
    log = tmp_path / "attempts"
    pill = jobs.poison_pill.delay("pill", str(log))
    # Calls of four other keys made after it, long enough to share the pill's process when it dies.
    others = [jobs.keyed.delay(f"other-{n}", "sync", hold=0.5) for n in range(4)]
    pool = worker_process("--processes", "1", "--threads", "2", env={"KEYJOBS_LEASE": "600"})
    assert pill.wait(timeout=120) == Status.FAILED
    for other in others:
        assert other.wait(timeout=120) == Status.SUCCESS
        # A process-mate is run again, and alone: a second death would have been its own.
        assert Invocation.objects.get(pk=other.pk).recoveries <= 1, [
            (e.at.time(), e.from_status, e.to_status, e.runner_id, e.runner_thread, e.note)
            for e in Event.objects.filter(invocation__in=[pill, *others]).order_by("pk")]
    pill.refresh_from_db()
    assert log.read_text().count("attempt") == 4 == pill.attempts  # max_recoveries (3) + 1, no more
    assert pill.recoveries == 3 and pill.error_type == "keyjobs.exceptions.RunnerDied"
    assert pill.error.startswith("Its runner died 4 times while running it, past its max_recoveries of 3: ")
    assert pill.error.count("died (exit on signal SIGKILL)") == 4
    wait_for(lambda: len(children()) == 5, timeout=60, what="each dead process replaced")
    pool.signal(signal.SIGTERM)
    pool.wait(timeout=30)


def test_a_parent_paused_past_its_hard_limit_is_not_killed_nor_are_its_process_mates(worker_process, tmp_path):
    # 0.6 s of work and a wait of 2.5 s on a child, under a hard limit of 1 s: the pause does not count.
    parent = jobs.patient_parent.delay(2.5, str(tmp_path / "child"))
    mate = jobs.sleep_then_return.delay(3.0, str(tmp_path / "mate"))
    pool = worker_process("--processes", "1", "--threads", "2", env={"KEYJOBS_LEASE": "600"})
    assert parent.wait(timeout=90) == Status.SUCCESS
    assert mate.wait(timeout=90) == Status.SUCCESS
    assert Invocation.objects.get(parent=parent).status == Status.SUCCESS
    assert not Event.objects.filter(kind=Event.Kind.OVERDUE).exists()
    assert set(Invocation.objects.values_list("attempts", flat=True)) == {1}
    assert len(children()) == 1, "no worker process was killed"
    pool.signal(signal.SIGTERM)
    pool.wait(timeout=30)


@pytest.mark.django_db(transaction=True)
def test_recovering_a_dead_process_work_gives_up_after_a_heartbeat_while_the_database_is_away(settings):
    # Reaping, restarts and hard limits go on; the lease's recovery takes the dead runner's work later.
    from keyjobs.supervisor import Supervisor
    from tests.factories import RunnerFactory
    from tests.fault_injection import while_the_database_is_away

    settings.KEYJOBS_HEARTBEAT_INTERVAL = 0.3
    supervisor = Supervisor(processes=1)
    supervisor.runner = RunnerFactory()
    how, what = while_the_database_is_away(lambda: supervisor._recover(12345, "died"), within=5)
    assert (how, what) == ("returned", [])
