"""Schedules with real runworker processes: each tick runs once, across a SIGKILL, and missed ticks make one run."""

import signal
import time
from datetime import timedelta
from itertools import pairwise

import pytest
from django.db.models.functions import Now

from keyjobs.models import Invocation, Runner, Schedule
from tests.waiting import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

SECOND = timedelta(seconds=1)


def every_second(log: str, name: str = "each second") -> Schedule:
    return Schedule.objects.create(name=name, task_name="tests.jobs.tick_log", kwargs={"log": log},
                                   interval=SECOND, next_run=Now())


def ticks_of(schedule: Schedule) -> list:
    return list(Invocation.objects.filter(cause_schedule=schedule).order_by("cause_tick")
                .values_list("cause_tick", flat=True))


def assert_every_tick_ran_once(ticks: list) -> None:
    assert len(ticks) == len(set(ticks)), "a tick ran twice"
    gaps = [later - earlier for earlier, later in pairwise(ticks)]
    assert all(gap == SECOND for gap in gaps), f"a tick was skipped or doubled: {gaps}"


def test_three_workers_run_each_tick_once_across_a_sigkill(worker_process, tmp_path):
    log = tmp_path / "ticks.log"
    schedule = every_second(str(log))
    workers = [worker_process("--threads", "2") for _ in range(3)]
    wait_for(lambda: Runner.objects.active().count() == 3, timeout=60, what="three workers started")
    start = len(ticks_of(schedule))
    wait_for(lambda: len(ticks_of(schedule)) >= start + 4, timeout=60, what="four ticks with three workers")
    # Every worker runs the tick duty; the one whose threads ran the latest tick is the one that created it
    # (it wakes its own pool at the tick first). Kill it without warning, whatever it is doing.
    latest = Invocation.objects.filter(cause_schedule=schedule, runner__isnull=False).latest("cause_tick")
    victim = next(worker for worker in workers if worker.process.pid == latest.runner.pid)
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait(timeout=10)
    killed_at = len(ticks_of(schedule))
    wait_for(lambda: len(ticks_of(schedule)) >= killed_at + 4, timeout=60, what="four ticks after the kill")
    for worker in workers:
        if worker is not victim:
            worker.signal(signal.SIGTERM)
            worker.wait(timeout=30)
    ticks = ticks_of(schedule)
    assert_every_tick_ran_once(ticks)
    # Each tick's run happened: one line a run (the killed worker's last run may have been cut short).
    assert len(log.read_text().splitlines()) >= len(ticks) - 1


def test_ticks_missed_while_every_worker_was_stopped_make_one_run(worker_process, tmp_path):
    log = tmp_path / "ticks.log"
    schedule = every_second(str(log))
    worker = worker_process("--threads", "1")
    wait_for(lambda: len(ticks_of(schedule)) >= 2, timeout=60, what="two ticks")
    worker.signal(signal.SIGTERM)
    worker.wait(timeout=30)
    before = ticks_of(schedule)
    time.sleep(4.5)  # at least four ticks missed
    worker = worker_process("--threads", "1")
    wait_for(lambda: len(ticks_of(schedule)) >= len(before) + 3, timeout=60, what="ticks after the restart")
    worker.signal(signal.SIGTERM)
    worker.wait(timeout=30)
    after = ticks_of(schedule)[len(before):]
    # One run for all the missed ticks: the first after the restart is the latest of them.
    assert after[0] - before[-1] >= 4 * SECOND, "the missed ticks were run one by one"
    # From the catch-up on, every tick again.
    assert_every_tick_ran_once(after)
