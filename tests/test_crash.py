"""Crash safety with real processes: SIGKILL, replacement workers, a database restart."""

import os
import signal
import time

import pytest
from django.db import connection

from keyjobs import Status
from keyjobs.models import Event, Invocation, Runner
from tests import jobs
from tests.chaos import run_chaos
from tests.waiting import wait_for

FAST_LEASE = {"KEYJOBS_HEARTBEAT_INTERVAL": "0.25", "KEYJOBS_LEASE": "1.5"}


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_a_killed_workers_key_is_recovered_and_its_run_happens_again(worker_process, tmp_path):
    log = tmp_path / "spans.log"
    invocation = jobs.record_span.delay("acme", 0, 30.0, str(log))
    follower = jobs.record_span.delay("acme", 1, 0.0, str(log))
    doomed = worker_process("--threads", "2", env=FAST_LEASE)
    wait_for(lambda: log.exists() and log.read_text().startswith("S acme 0"), timeout=20, what="the first run to start")
    doomed.process.send_signal(signal.SIGKILL)
    doomed.kill()
    killed_at = time.time()
    Invocation.objects.filter(pk=invocation.pk).update(args=["acme", 0, 0.0, str(log)])  # the rerun is quick
    worker_process("--threads", "2", "--burst", env=FAST_LEASE).wait(timeout=60)
    invocation.refresh_from_db()
    assert (invocation.status, invocation.attempts) == (Status.SUCCESS, 2)
    assert Event.objects.filter(invocation=invocation, note__startswith="recovered:").exists()
    assert Invocation.objects.get(pk=follower.pk).status == Status.SUCCESS
    lines = log.read_text().splitlines()
    rerun_start = float([line for line in lines if line.startswith("S acme 0")][1].split()[3])
    assert rerun_start > killed_at, "the rerun started before the killed run was dead"
    assert Runner.objects.filter(lost=True).count() == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
@pytest.mark.postgres
def test_chaos_kills_and_a_database_restart_lose_nothing_and_never_overlap_a_key(tmp_path):
    env = {
        **os.environ,
        **FAST_LEASE,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "KEYJOBS_TEST_DB_NAME": connection.settings_dict["NAME"],
    }
    # Keyed work is serial, so each key's chain (10 x 0.4 s) is a floor on the run's length however
    # fast keyjobs gets: the kills (every second) and the restart (at 2 s) all land before it can end.
    report = run_chaos(env=env, log=tmp_path / "spans.log", keys=24, per_key=10, hold=0.4, workers=3, threads=8,
                       kill_every=1.0, restart_database_at=2.0, timeout=120)
    print("\n".join(report.lines()))
    assert report.kills >= 3 and report.database_restarts == 1
    assert report.overlaps == []
    assert report.lost == [] and report.not_final == []
    assert report.recovered_without_history == []
