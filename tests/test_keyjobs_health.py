"""``manage.py keyjobs_health``: a liveness probe, run as a container runs it."""

import os
import socket
import subprocess
import sys
from datetime import timedelta

import pytest
from django.db import connection
from django.db.models.functions import Now

from keyjobs.models import Runner
from tests.conftest import ROOT
from tests.factories import RunnerFactory

pytestmark = pytest.mark.django_db(transaction=True)


def probe() -> subprocess.CompletedProcess[str]:
    """Run the probe on the test database; return its exit status and output."""
    test_database = {name: value for name, value in os.environ.items() if name.startswith("KEYJOBS_TEST")}
    return subprocess.run([sys.executable, "manage.py", "keyjobs_health"], cwd=ROOT, capture_output=True, text=True,
                          env={**test_database, "DJANGO_SETTINGS_MODULE": "tests.settings", "PATH": "/usr/bin:/bin",
                               "KEYJOBS_TEST_DB_NAME": connection.settings_dict["NAME"]})


def test_it_exits_0_while_this_hosts_runners_heartbeat_and_1_once_one_is_silent():
    runner = RunnerFactory(host=socket.gethostname())
    RunnerFactory(host="another-host", heartbeat_at=Now() - timedelta(hours=1))  # not this host's
    healthy = probe()
    assert healthy.returncode == 0, healthy.stderr
    assert healthy.stdout.startswith("ok: 1 runner(s) heartbeating on ")
    Runner.objects.filter(pk=runner.pk).update(heartbeat_at=Now() - timedelta(hours=1))
    silent = probe()
    assert silent.returncode == 1
    assert f"runner {runner.pk} (pid {runner.pid})" in silent.stderr and "sent no heartbeat" in silent.stderr


def test_it_exits_1_when_no_runner_runs_on_this_host():
    RunnerFactory(host=socket.gethostname(), stopped_at=Now())
    result = probe()
    assert result.returncode == 1
    assert "no runner is running on" in result.stderr
