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


def test_a_listener_whose_callback_raises_logs_it_and_listens_again(caplog):
    from keyjobs.store import store

    heard, stop = [], threading.Event()

    def on_wake(payload: str) -> None:
        heard.append(payload)
        if payload == "first":
            raise RuntimeError("a bug in the callback")

    listener = store("default").listen(on_wake, stop)
    try:
        for payload in ("first", "second"):
            deadline = time.monotonic() + 10
            while payload not in heard and time.monotonic() < deadline:  # a hint sent while it reconnects is lost
                store("default").notify(payload)
                time.sleep(0.1)
        assert heard[0] == "first" and "second" in heard  # it listened again, instead of leaving the runner to poll
        assert "could not listen for wake-ups" in caplog.text and "a bug in the callback" in caplog.text
    finally:
        stop.set()
        listener.join(5)
        connection.close()


def test_a_rate_window_whose_tokens_are_all_being_taken_defers_nothing_and_records_nothing():
    # Every token of the key locked by claims not committed yet: whether the window is full is not known yet.
    from keyjobs.models import Event, RateToken

    waiting = jobs.rated.delay("acme", 1)
    RateToken.objects.bulk_create([RateToken(task_name=waiting.task_name, running_key=waiting.running_key, number=n)
                                   for n in range(3)])
    holding, release = threading.Event(), threading.Event()

    def hold_tokens():
        try:
            with transaction.atomic():
                list(RateToken.objects.select_for_update().filter(task_name=waiting.task_name))
                holding.set()
                release.wait(10)
        finally:
            connection.close()

    holder = threading.Thread(target=hold_tokens)
    holder.start()
    try:
        assert holding.wait(10)
        runner = RunnerFactory()
        for _ in range(3):  # each claim of a thread, every 50 ms, wrote a DEFERRED event and moved its run_after
            assert claim(runner, using="default", start=True) == []
    finally:
        release.set()
        holder.join(10)
    waiting.refresh_from_db()
    assert waiting.status == "REGISTERED" and waiting.run_after is None
    assert not Event.objects.filter(invocation=waiting, kind=Event.Kind.DEFERRED).exists()
    [taken] = claim(runner, using="default", start=True)  # once they commit (here: give up), it is decided
    assert taken.pk == waiting.pk

