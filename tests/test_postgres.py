"""What only PostgreSQL does: row locks between connections, the claim's index, LISTEN/NOTIFY."""

import threading
import time

import pytest
from django.db import connection, connections, transaction

from keyjobs.claim import claim
from keyjobs.models import Invocation
from keyjobs.worker import Worker
from tests import jobs
from tests.factories import RunnerFactory

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def test_a_claim_skips_an_invocation_another_connection_has_locked():
    locked, free = jobs.add.delay(1), jobs.add.delay(2)
    holding, release = threading.Event(), threading.Event()

    def hold_lock():
        try:
            with transaction.atomic():
                Invocation.objects.select_for_update().get(pk=locked.pk)
                holding.set()
                release.wait(10)
        finally:
            connection.close()

    thread = threading.Thread(target=hold_lock)
    thread.start()
    holding.wait(10)
    try:
        assert [inv.pk for inv in claim(RunnerFactory(), using="default")] == [free.pk]
    finally:
        release.set()
        thread.join()


def test_notify_wakes_an_idle_worker_long_before_its_poll_interval():
    worker = Worker(threads=1, poll_interval=30)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        time.sleep(1.0)  # the worker is idle, listening
        begun = time.monotonic()
        invocation = jobs.add.delay(1)
        assert invocation.wait(timeout=10) == "SUCCESS"
        assert time.monotonic() - begun < 5, "the worker waited for its poll instead of the notification"
    finally:
        worker.stop()
        thread.join(10)
        connections.close_all()
    assert not thread.is_alive(), "the worker did not stop"
