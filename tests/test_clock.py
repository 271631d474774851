"""One clock: every time the database compares (run_after, debounce, a retry's delay, a schedule's next tick) is
computed on the database's clock, whatever the application's clock says.

The application's clock is set an hour off in this process only (``django.utils.timezone.now``); the database's
(``Store.clock()``) is the server's, or SQLite's own reading of the system clock.
"""

from datetime import timedelta

import pytest
from django.db.models import F
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from keyjobs import control
from keyjobs.claim import claim
from keyjobs.execute import execute
from keyjobs.models import Invocation, Schedule
from keyjobs.status import Status
from keyjobs.store import store
from tests import jobs
from tests.factories import RunnerFactory

pytestmark = pytest.mark.django_db

#: Margin for the time a test's own statements take on a loaded machine.
MARGIN = timedelta(seconds=5)


@pytest.fixture(params=[timedelta(hours=1), -timedelta(hours=1)], ids=["application ahead", "application behind"])
def skewed(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> timedelta:
    real = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: real() + request.param)
    return request.param


def database_now():
    return store("default").clock()


def test_a_delay_counts_from_the_database_clock(skewed: timedelta) -> None:
    before = database_now()
    invocation = jobs.add.using(run_after=timedelta(seconds=30)).delay(1)
    single = Invocation.objects.get(pk=invocation.pk).run_after
    [many] = jobs.add.using(run_after=timedelta(seconds=30)).delay_many([((2,), {})])
    for run_after in (single, Invocation.objects.get(pk=many.pk).run_after):
        assert before + timedelta(seconds=30) <= run_after <= before + timedelta(seconds=30) + MARGIN


def test_debounce_and_debounce_max_hold_by_the_database_clock(skewed: timedelta) -> None:
    before = database_now()
    first = jobs.debounced.delay("acme", "created")
    # debounce: 0.3 s after the call, by the clock that stamps created_at.
    run_after = Invocation.objects.get(pk=first.pk).run_after
    assert before + timedelta(seconds=0.3) <= run_after <= before + timedelta(seconds=0.3) + MARGIN
    # debounce_max: never past 1 s after the first call, however late the next one comes.
    Invocation.objects.filter(pk=first.pk).update(created_at=F("created_at") - timedelta(seconds=0.9))
    created = Invocation.objects.get(pk=first.pk).created_at
    jobs.debounced.delay("acme", "renamed")
    assert Invocation.objects.get(pk=first.pk).run_after == created + timedelta(seconds=1.0)


def test_a_retry_waits_its_delay_by_the_database_clock(skewed: timedelta) -> None:
    runner = RunnerFactory()
    jobs.flaky_serial_per_key.delay("acme", "a")  # retry_backoff=60: the first retry waits 30 to 60 s
    [claimed] = claim(runner, using="default")
    before = database_now()
    assert execute(claimed, runner, using="default") == Status.RETRY
    run_after = Invocation.objects.get(pk=claimed.pk).run_after
    assert before + timedelta(seconds=30) <= run_after <= before + timedelta(seconds=60) + MARGIN


def test_a_resumed_schedule_plans_its_next_tick_by_the_database_clock(skewed: timedelta, admin_client: Client) -> None:
    paused = [Schedule.objects.create(name=f"every minute {n}", task_name="tests.jobs.add", kwargs={"a": 1},
                                      interval=timedelta(minutes=1), enabled=False) for n in range(2)]
    before = database_now()
    control.resume_schedules(Schedule.objects.filter(pk=paused[0].pk))
    admin_client.post(reverse("admin:keyjobs_schedule_toggle", args=[paused[1].pk]))
    for schedule in paused:
        schedule.refresh_from_db()
        assert schedule.enabled
        assert before + timedelta(minutes=1) <= schedule.next_run <= before + timedelta(minutes=1) + MARGIN


def test_a_schedule_saved_in_the_admin_plans_its_next_tick_by_the_database_clock(
    skewed: timedelta, admin_client: Client,
) -> None:
    before = database_now()
    response = admin_client.post(reverse("admin:keyjobs_schedule_add"), {
        "name": "every minute", "task_name": "tests.jobs.add", "kwargs": '{"a": 1}', "cron": "",
        "interval": "00:01:00", "catch_up": "latest", "enabled": "on"})
    assert response.status_code == 302, response.content.decode()[:2000]
    next_run = Schedule.objects.get(name="every minute").next_run
    assert before + timedelta(minutes=1) <= next_run <= before + timedelta(minutes=1) + MARGIN
