"""``runworker --reload``: Django's autoreloader restarts the runner when code changes; DEBUG turns it on."""

import os
import signal
import subprocess
import sys
import time

import pytest
from django.db import connection

from keyjobs import Status
from keyjobs.models import Invocation, Runner
from tests.conftest import ROOT
from tests.waiting import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

PROBE = '''
from keyjobs import task


@task
def probe() -> str:
    return "{version}"
'''


def test_under_debug_a_code_change_restarts_the_runner_and_ctrl_c_stops_it_gracefully(tmp_path, monkeypatch):
    # A tasks module of its own, so that the test changes no file of the project.
    module = tmp_path / "kj_reload_probe.py"
    module.write_text(PROBE.format(version="first"))
    monkeypatch.syspath_prepend(str(tmp_path))
    from kj_reload_probe import probe  # type: ignore[import-not-found]

    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "DEBUG": "true", "PYTHONUNBUFFERED": "1",
           "KEYJOBS_TEST_DB_NAME": connection.settings_dict["NAME"], "PYTHONPATH": str(tmp_path)}
    # No --reload: DEBUG turns it on. A session of its own, to send it a terminal's Ctrl-C.
    log = tmp_path / "runworker.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "manage.py", "runworker"], cwd=ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        first = probe.delay()
        assert first.wait(timeout=60) == Status.SUCCESS and first.return_value == "first"
        [before] = Runner.objects.all()
        # The reloader looks once a second: it must have seen the first version before the change.
        time.sleep(2.5)
        module.write_text(PROBE.format(version="second"))
        later = time.time() + 5
        os.utime(module, (later, later))  # past the mtime of the first version, whatever the clock's grain
        wait_for(lambda: Runner.objects.count() == 2, timeout=60, what="the runner restarted")
        before.refresh_from_db()
        assert before.stopped_at is not None and not before.lost, "stopped as on SIGTERM, not left for recovery"
        second = probe.delay()
        assert second.wait(timeout=60) == Status.SUCCESS and second.return_value == "second"
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=60) == 0, log.read_text()
        assert not Invocation.objects.exclude(status=Status.SUCCESS).exists()
        assert not Runner.objects.filter(stopped_at__isnull=True).exists(), log.read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
