import itertools
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from django.db import connection
from django.db.backends.signals import connection_created

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
def test_a_task_that_raises_system_exit_or_keyboard_interrupt_fails_and_the_thread_goes_on(worker_process):
    # One thread: had any of them ended the thread, nothing after it would run.
    kinds = ["SystemExit", "KeyboardInterrupt", "GeneratorExit", "Halt"]
    raised = [jobs.raise_base.delay("acme", kind) for kind in kinds] + [jobs.raise_base_async.delay("acme", "SystemExit")]
    after = jobs.keyed.delay("acme", "after")
    output = worker_process("--threads", "1", "--burst").wait(timeout=60)
    assert [Invocation.objects.get(pk=inv.pk).status for inv in raised] == [Status.FAILED] * len(raised), output
    assert Invocation.objects.get(pk=after.pk).status == Status.SUCCESS, output


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
def test_a_runner_thread_keeps_its_connection_from_heartbeat_to_heartbeat(settings):
    # CONN_MAX_AGE = 0, Django's default for requests: a runner thread's look at its connections,
    # once a heartbeat, keeps a usable one instead of reconnecting (and losing its prepared statements).
    assert connection.settings_dict["CONN_MAX_AGE"] == 0
    settings.KEYJOBS_HEARTBEAT_INTERVAL = 0.02
    opened: list[str] = []

    def note(sender, connection, **kwargs):
        if threading.current_thread().name.startswith("keyjobs-runner-"):
            opened.append(threading.current_thread().name)

    connection_created.connect(note, weak=False)
    worker = Worker(threads=1, poll_interval=0.01)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        for n in range(3):
            pk = jobs.add.delay(n).pk
            wait_for(lambda pk=pk: Invocation.objects.get(pk=pk).status == Status.SUCCESS, timeout=30)
            time.sleep(0.1)  # several heartbeats: the thread looks at its connection each time
    finally:
        worker.stop()
        thread.join(30)
        connection_created.disconnect(note)
    assert opened == ["keyjobs-runner-0"]


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


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_burst_exits_while_another_transaction_holds_a_waiting_invocation_locked(worker_process):
    # A row another transaction locks is not claimable (a claim skips it): --burst must not wait for it.
    import psycopg

    locked = jobs.add.delay(1)
    free = jobs.add.delay(2)
    holder = psycopg.connect(**connection.get_connection_params())  # a transaction of its own, left open
    try:
        holder.execute("SELECT id FROM keyjobs_invocation WHERE id = %s FOR UPDATE", [locked.pk])
        worker_process("--threads", "2", "--burst").wait(timeout=60)
        assert Invocation.objects.get(pk=free.pk).status == Status.SUCCESS
        assert Invocation.objects.get(pk=locked.pk).status == Status.REGISTERED
    finally:
        holder.close()


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_a_keyboard_interrupt_from_a_task_fails_its_run_but_ctrl_c_stops_the_runner_gracefully(worker_process,
                                                                                                 tmp_path):
    # Raised by the task's code: that run's failure, like any exception; the runner goes on to its next call.
    interrupted = jobs.raise_base.delay("acme", "KeyboardInterrupt")
    marker = str(tmp_path / "running")
    running = jobs.until_told.delay(marker)
    worker = worker_process("--threads", "1")
    wait_for(lambda: os.path.exists(marker + ".started"), timeout=60, what="the next call to run")
    interrupted.refresh_from_db()
    assert (interrupted.status, interrupted.error_type) == (Status.FAILED, "builtins.KeyboardInterrupt")
    # Ctrl-C sent to the runner: a request to stop, which reaches the runner, never the task's code. The run in
    # progress goes on to its end and its outcome is recorded; then the runner stops, marked stopped.
    worker.signal(signal.SIGINT)
    open(marker + ".go", "w").close()
    output = worker.wait(timeout=60)  # exit status 0
    assert Invocation.objects.get(pk=running.pk).status == Status.SUCCESS, output
    runner = Runner.objects.get()
    assert runner.stopped_at is not None and not runner.lost
    assert "SIGINT: finishing running invocations, then stopping" in output


@pytest.mark.django_db(transaction=True)
def test_a_recovered_run_taken_away_while_it_waited_to_go_alone_leaves_the_process_usable():
    from keyjobs.current import Run
    from keyjobs.exceptions import NotOwner
    from tests.factories import RunnerFactory

    runner = RunnerFactory()
    invocation = jobs.add.delay(1)
    Invocation.objects.filter(pk=invocation.pk).update(status=Status.RUNNING, runner=runner, recoveries=1)
    invocation.refresh_from_db()
    worker = Worker(threads=2)
    run = Run(invocation, runner, "default", 0, worker)
    worker._alone.enter()  # another thread's run in progress: the recovered run must wait for it
    raised: list[BaseException] = []

    def recovered_run() -> None:
        worker._alone.enter()  # its own thread's claim
        try:
            with worker.calls(run):
                pass
        except NotOwner as exc:
            raised.append(exc)
        finally:
            worker._alone.leave()
            connection.close()

    thread = threading.Thread(target=recovered_run)
    thread.start()
    wait_for(lambda: Invocation.objects.get(pk=invocation.pk).status == Status.PAUSED, timeout=30,
             what="the recovered run held back, PAUSED")
    # Its runner is declared lost meanwhile: recovery takes it back.
    Invocation.objects.filter(pk=invocation.pk).update(status=Status.REGISTERED, runner=None)
    worker._alone.leave()
    thread.join(30)
    assert not thread.is_alive() and len(raised) == 1
    # Nobody is left "alone": the next thread comes in at once.
    entered = threading.Thread(target=worker._alone.enter)
    entered.start()
    entered.join(5)
    assert not entered.is_alive()


@pytest.mark.django_db(transaction=True)
def test_a_burst_worker_is_not_kept_by_a_deferral_whose_rows_are_gone(monkeypatch):
    """The process's note of deferred work is a hint: with no waiting row carrying a time, --burst stops."""
    from datetime import timedelta

    from django.utils import timezone

    from keyjobs import worker as worker_module
    from keyjobs.claim import Releases

    hints = Releases()
    now = timezone.now()
    hints.note(now + timedelta(seconds=90), now)  # a rate window's deferral, whose rows were cancelled since
    monkeypatch.setattr(worker_module, "releases", hints)
    jobs.add.delay(1, 2)
    burst = threading.Thread(target=Worker(threads=1, burst=True, poll_interval=0.01).run)
    burst.start()
    burst.join(timeout=30)
    assert not burst.is_alive(), "the burst worker waited for deferred work that no row holds"
    assert set(Invocation.objects.values_list("status", flat=True)) == {Status.SUCCESS}


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_burst_worker_waits_for_the_retry_its_own_duty_is_registering_again(monkeypatch, tmp_path):
    """A duty holds the retry it registers again locked; --burst's look skips locked rows, so it must count the
    duty as work in progress, not stop while the retry is out of its sight."""
    from django.db import transaction

    from keyjobs import duties

    promote = duties.promote_due_retries

    def slowly(*, using, runner=None, limit=1000):
        with transaction.atomic(using=using):
            held = list(Invocation.objects.using(using).filter(status=Status.RETRY).select_for_update())
            if held:
                time.sleep(1.0)  # the retry locked, as a promotion of many rows holds them
        return promote(using=using, runner=runner, limit=limit)

    monkeypatch.setattr(duties, "promote_due_retries", slowly)
    invocation = jobs.flaky.delay(str(tmp_path / "count"), 1)
    Worker(threads=1, burst=True, poll_interval=0.01).run()
    invocation.refresh_from_db()
    assert (invocation.status, invocation.attempts) == (Status.SUCCESS, 2)
