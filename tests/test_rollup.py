"""The statistics rollup: per task and per key per minute, read from the history by a duty, counted once.

Each test runs real invocations through a real (in-process) runner, then rolls the history up and compares
the rollup with the history and the invocations, read here independently of ``keyjobs.rollup``.
"""

import threading
from datetime import timedelta

import pytest
from django.db import connection, connections, transaction
from django.db.models import Sum
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from keyjobs import rollup
from keyjobs.duties import duties_of
from keyjobs.models import (
    DURATION_BUCKETS,
    WAIT_BUCKETS,
    Event,
    Invocation,
    KeyMinute,
    RollupMark,
    TaskMinute,
    TaskTotal,
)
from keyjobs.status import Status
from keyjobs.worker import Worker
from tests import jobs
from tests.factories import EventFactory, InvocationFactory

pytestmark = pytest.mark.django_db(transaction=True)

ACME = '{"account_id":"acme"}'


def run_all() -> None:
    Worker(threads=2, burst=True, poll_interval=0.01).run()


def total(task_name: str) -> TaskTotal:
    return TaskTotal.objects.get(task_name=task_name)


def summed(model: type, **filters: object) -> dict[str, int]:
    names = ["enqueued", "started", "succeeded", "failed", "retried", "dropped", "merged", "runs", "waits",
             *DURATION_BUCKETS, *WAIT_BUCKETS]
    return model.objects.filter(**filters).aggregate(**{name: Sum(name) for name in names})


def test_the_rollup_counts_what_the_history_says_per_task_per_key_and_in_all(tmp_path) -> None:
    for number in range(5):
        jobs.add.delay(number, 1)
    jobs.flaky.delay(str(tmp_path / "count"), 2)  # two failed attempts, then a success
    jobs.boom.delay("no")
    jobs.once_per_key.delay("acme", op="one")
    jobs.once_per_key.delay("acme", op="one")  # merged into the first: no new invocation
    run_all()

    rollup.roll_up(using="default")

    add = total("tests.jobs.add")
    assert (add.enqueued, add.started, add.succeeded, add.runs, add.waits) == (5, 5, 5, 5, 5)
    flaky = total("tests.jobs.flaky")
    assert (flaky.enqueued, flaky.started, flaky.retried, flaky.succeeded, flaky.runs, flaky.waits) == (1, 3, 2, 1, 3, 1)
    assert (total("tests.jobs.boom").failed, total("tests.jobs.once_per_key").merged) == (1, 1)
    # The minutes add up to the totals, and the key's rows hold what its task's do.
    for task_name in ("tests.jobs.add", "tests.jobs.flaky", "tests.jobs.once_per_key"):
        assert summed(TaskMinute, task_name=task_name) == summed(TaskTotal, task_name=task_name)
    assert summed(KeyMinute, task_name="tests.jobs.once_per_key", key=ACME) == summed(
        TaskTotal, task_name="tests.jobs.once_per_key")
    # Every run and first start in exactly one bucket of its histogram.
    assert sum(getattr(add, name) for name in DURATION_BUCKETS) == add.runs
    assert sum(getattr(add, name) for name in WAIT_BUCKETS) == add.waits


def test_durations_and_waits_are_those_of_the_history() -> None:
    invocation = InvocationFactory(task_name="tests.jobs.add", status=Status.SUCCESS)
    created = Invocation.objects.get(pk=invocation.pk).created_at
    start = created + timedelta(milliseconds=300)
    for came, went, at in [(Status.REGISTERED, Status.PENDING, start), (Status.PENDING, Status.RUNNING, start),
                           (Status.RUNNING, Status.SUCCESS, start + timedelta(milliseconds=2_200))]:
        EventFactory(invocation=invocation, from_status=came, to_status=went, at=at)

    rollup.roll_up(using="default")

    row = total("tests.jobs.add")
    assert (row.runs, row.duration_ms, row.waits, row.wait_ms, row.wait_max_ms) == (1, 2_200, 1, 300, 300)
    assert (row.d_2500, row.w_500) == (1, 1)


def test_rolling_up_twice_counts_nothing_twice() -> None:
    jobs.add.delay(1, 2)
    run_all()
    rollup.roll_up(using="default")
    before = summed(TaskTotal)

    assert rollup.roll_up(using="default") == 0
    assert summed(TaskTotal) == before


def test_recording_an_outcome_writes_nothing_to_the_rollup() -> None:
    # The rollup is the duty's: the hot path's statements stay what they were.
    for number in range(3):
        jobs.add.delay(number, 1)
    with CaptureQueriesContext(connection) as queries:
        Worker(threads=1, burst=True, poll_interval=0.01).run()
    rollups = [query["sql"] for query in queries.captured_queries
               if any(table in query["sql"] for table in ("keyjobs_taskminute", "keyjobs_keyminute",
                                                          "keyjobs_tasktotal", "keyjobs_rollupmark"))
               and "keyjobs_event" not in query["sql"].split("FROM")[0]]
    # Only the duty's own round (a burst runner may run it once before it stops), never per invocation.
    assert len([sql for sql in rollups if sql.lstrip().upper().startswith("INSERT INTO")]) <= 3, rollups


def test_the_roll_up_is_a_duty_of_every_runner() -> None:
    assert "roll up statistics" in [duty.name for duty in duties_of(Worker(threads=1))]


def test_the_queue_depth_is_sampled_per_task_and_an_empty_queue_as_zero() -> None:
    for _ in range(3):
        InvocationFactory(task_name="tests.jobs.add", status=Status.REGISTERED)
    now = timezone.now()

    rollup.sample_depth(using="default", now=now)
    assert TaskMinute.objects.get(task_name="tests.jobs.add").waiting_now == 3

    Invocation.objects.update(status=Status.SUCCESS)
    rollup.sample_depth(using="default", now=now)
    assert TaskMinute.objects.get(task_name="tests.jobs.add").waiting_now == 0


@pytest.mark.postgres
def test_an_event_committed_after_a_later_one_is_counted_when_it_shows() -> None:
    # Ids are handed out at insert, not at commit: a transaction still open holds an id below the mark.
    invocation = InvocationFactory(task_name="tests.jobs.add")
    inserted, release, done = threading.Event(), threading.Event(), threading.Event()
    slow: list[int] = []

    def slow_writer() -> None:
        try:
            with transaction.atomic():
                slow.append(Event.objects.create(invocation_id=invocation.pk, from_status=Status.REGISTERED,
                                                 to_status=Status.CONCURRENCY_CONTROLLED_FINAL).pk)
                inserted.set()
                release.wait(10)
        finally:
            connections.close_all()
            done.set()

    thread = threading.Thread(target=slow_writer)
    thread.start()
    assert inserted.wait(10)
    EventFactory(invocation=invocation, from_status=Status.REGISTERED, to_status=Status.REROUTED)

    rollup.roll_up(using="default")
    assert (total("tests.jobs.add").parked, total("tests.jobs.add").dropped) == (1, 0)
    assert str(slow[0]) in RollupMark.objects.get(name="events").gaps, "the open transaction's id is remembered"

    release.set()
    assert done.wait(10)
    thread.join()
    rollup.roll_up(using="default")
    assert (total("tests.jobs.add").parked, total("tests.jobs.add").dropped) == (1, 1)
    assert str(slow[0]) not in RollupMark.objects.get(name="events").gaps


def test_a_duration_falls_in_the_first_bucket_whose_bound_holds_it() -> None:
    from keyjobs.models import BUCKETS_MS

    assert [rollup.bucket(ms) for ms in (0, 5, 6, 10, 899_999, 900_000, 900_001)] == [0, 0, 1, 1, 14, 14, 15]
    assert len(BUCKETS_MS) == 15
