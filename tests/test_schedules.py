"""Schedules: declared or edited in the admin, each due tick enqueued once, missed ticks caught up or skipped."""

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from django.db import DataError, IntegrityError, connection, transaction
from django.db.models.functions import Now
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from keyjobs import Status, TaskDeclarationError, registry, task
from keyjobs.duties import ScheduleTicks, duties_of
from keyjobs.models import Invocation, Schedule
from keyjobs.monitor import queries
from keyjobs.schedules import sync_declared, tick
from keyjobs.timers import Timer
from keyjobs.worker import Worker
from tests import jobs
from tests.factories import InvocationFactory, staff
from tests.fault_injection import failing_once
from tests.waiting import at_once, wait_for

pytestmark = pytest.mark.django_db


@pytest.fixture
def isolated_registry() -> Iterator[None]:
    """Tasks a test declares are forgotten after it: a declared schedule would tick in other tests' workers."""
    saved = dict(registry._tasks)
    yield
    registry._tasks.clear()
    registry._tasks.update(saved)
    registry._generation += 1


def make_schedule(name: str = "every minute", *, late: timedelta = timedelta(seconds=1),
                  interval: timedelta | None = timedelta(minutes=1), cron: str = "", task_name: str = "tests.jobs.add",
                  kwargs: object = None, **fields: object) -> Schedule:
    """A schedule of the admin whose next tick was due ``late`` ago."""
    return Schedule.objects.create(
        name=name, task_name=task_name, kwargs={"a": 1} if kwargs is None else kwargs, cron=cron,
        interval=None if cron else interval, next_run=timezone.now() - late, **fields,
    )


# -- declaring ------------------------------------------------------------------------------


def test_a_declared_cron_schedule_is_described_in_words(isolated_registry):
    @task(name="tests.every_quarter", schedule="*/15 * * * *")
    def every_quarter(): ...

    assert every_quarter.schedule == Timer(cron="*/15 * * * *")
    assert every_quarter.schedule.describe() == "Every 15 minutes"


def test_a_declared_interval_with_its_arguments(isolated_registry):
    @task(name="tests.morning", schedule=timedelta(seconds=30), schedule_kwargs={"region": "eu"})
    def morning(region): ...

    assert morning.spec.schedule_kwargs == {"region": "eu"}
    assert morning.schedule.describe() == "Every 30 seconds"


@pytest.mark.parametrize("schedule, message", [
    ("*/15 * * *", "must have five fields"),
    ("61 * * * *", "is not valid"),
    ("every day", "must have five fields"),
    (timedelta(0), "shorter than"),
    (30, "neither a cron string nor a timedelta"),
])
def test_an_unusable_schedule_is_refused_at_declaration(schedule, message):
    with pytest.raises(TaskDeclarationError, match=message):

        @task(name="tests.f", schedule=schedule)
        def f(): ...


def test_a_scheduled_task_with_required_arguments_needs_schedule_kwargs():
    with pytest.raises(TaskDeclarationError, match=r"needs schedule_kwargs"):

        @task(name="tests.morning_report", schedule="0 6 * * 1-5")
        def morning_report(region): ...


def test_schedule_kwargs_the_function_does_not_take_are_refused():
    with pytest.raises(TaskDeclarationError, match=r"cannot call it with schedule_kwargs=\{'zone': 'eu'\}"):

        @task(name="tests.morning_report", schedule="0 6 * * 1-5", schedule_kwargs={"zone": "eu"})
        def morning_report(region): ...


def test_schedule_kwargs_without_a_schedule_are_refused():
    with pytest.raises(TaskDeclarationError, match="has no effect without schedule="):

        @task(name="tests.f", schedule_kwargs={"region": "eu"})
        def f(region): ...


# -- time: cron in the site's time zone --------------------------------------------------------


def test_cron_ticks_follow_the_sites_time_zone_across_daylight_saving(settings):
    settings.TIME_ZONE = "Europe/Paris"
    nightly = Timer(cron="30 2 * * *")
    # Spring: 02:30 does not exist on 29 March 2026; the tick runs at the first minute after the jump.
    spring = nightly.next_after(datetime(2026, 3, 28, 12, tzinfo=UTC))
    assert spring == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)  # 03:00 in Paris, summer time
    # Autumn: 02:30 happens twice on 25 October 2026; a fixed-hour expression ticks once.
    autumn = nightly.next_after(datetime(2026, 10, 24, 12, tzinfo=UTC))
    assert autumn == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)
    assert nightly.next_after(autumn) == datetime(2026, 10, 26, 1, 30, tzinfo=UTC)


def test_an_interval_counts_real_time_from_its_last_tick():
    every = Timer(interval=timedelta(minutes=5))
    anchor = datetime(2026, 1, 1, 10, 0, tzinfo=UTC)
    assert every.next_after(anchor + timedelta(minutes=12), anchor=anchor) == anchor + timedelta(minutes=15)
    assert every.last_at_or_before(anchor + timedelta(minutes=12), since=anchor) == anchor + timedelta(minutes=10)


# -- the tick ---------------------------------------------------------------------------------------------


def test_a_due_tick_enqueues_one_invocation_that_records_its_cause():
    schedule = make_schedule()
    due = schedule.next_run
    assert tick(using="default").enqueued == 1
    invocation = Invocation.objects.get()
    assert (invocation.task_name, invocation.kwargs) == ("tests.jobs.add", {"a": 1})
    assert (invocation.cause_schedule_id, invocation.cause_tick) == (schedule.pk, due)
    schedule.refresh_from_db()
    assert schedule.next_run == due + timedelta(minutes=1)
    assert (schedule.last_run, schedule.last_invocation) == (due, invocation)
    assert list(schedule.invocations.all()) == [invocation]


def test_a_tick_runs_once_however_often_the_duty_runs():
    make_schedule()
    ticked = [tick(using="default") for _ in range(5)]
    assert [t.enqueued for t in ticked] == [1, 0, 0, 0, 0]
    assert 55 < ticked[-1].wait <= 60
    assert Invocation.objects.count() == 1


def test_the_database_refuses_a_second_invocation_of_a_tick():
    schedule = make_schedule()
    tick(using="default")
    first = Invocation.objects.get()
    with pytest.raises(IntegrityError), transaction.atomic():
        InvocationFactory(cause_schedule=schedule, cause_tick=first.cause_tick)


def test_a_tick_that_has_its_invocation_already_only_moves_on_and_the_others_still_run():
    ran = make_schedule("ran already", late=timedelta(seconds=2))
    InvocationFactory(cause_schedule=ran, cause_tick=ran.next_run)  # its tick ran, though the row does not say so
    other = make_schedule("other")
    assert tick(using="default").enqueued == 1
    assert Invocation.objects.filter(cause_schedule=other).count() == 1
    assert Invocation.objects.filter(cause_schedule=ran).count() == 1
    ran.refresh_from_db()
    assert ran.next_run > timezone.now() and not ran.problem


def test_due_ticks_are_enqueued_in_one_statement():
    for number in range(20):
        make_schedule(f"schedule {number}")
    with CaptureQueriesContext(connection) as queries:
        assert tick(using="default").enqueued == 20
    inserts = [query for query in queries if 'INSERT INTO "keyjobs_invocation"' in query["sql"]]
    assert len(inserts) == 1


def test_a_tick_with_nothing_due_is_one_query():
    make_schedule(late=timedelta(seconds=-30))
    with CaptureQueriesContext(connection) as queries:
        assert tick(using="default").enqueued == 0
    assert len(queries) == 1


def test_a_ticks_queries_do_not_grow_with_finished_invocations():
    def queries_of_one_due_tick(name: str) -> int:
        make_schedule(name)
        with CaptureQueriesContext(connection) as captured:
            assert tick(using="default").enqueued == 1
        return len(captured)

    before = queries_of_one_due_tick("first")
    InvocationFactory.create_batch(300, status=Status.SUCCESS, task_name="tests.jobs.add")
    assert queries_of_one_due_tick("second") == before


def test_ticks_missed_while_no_runner_ran_are_caught_up_as_one_run():
    schedule = make_schedule(late=timedelta(minutes=10, seconds=30))
    assert tick(using="default").enqueued == 1
    schedule.refresh_from_db()
    invocation = Invocation.objects.get()
    # The run is for the latest missed tick; the next tick is the first one after now.
    assert timezone.now() - timedelta(minutes=1) < invocation.cause_tick <= timezone.now()
    assert timezone.now() < schedule.next_run <= timezone.now() + timedelta(minutes=1)


def test_a_schedule_may_skip_the_ticks_it_missed(settings):
    settings.KEYJOBS_SCHEDULE_GRACE = 5
    schedule = make_schedule(late=timedelta(minutes=10, seconds=30), catch_up=False)
    assert tick(using="default").enqueued == 0
    schedule.refresh_from_db()
    assert not Invocation.objects.exists()
    assert schedule.next_run > timezone.now()
    # Its next tick, found on time, runs.
    Schedule.objects.filter(pk=schedule.pk).update(next_run=Now())
    assert tick(using="default").enqueued == 1


def test_a_paused_schedule_does_not_tick():
    make_schedule(enabled=False)
    assert tick(using="default") .enqueued == 0
    assert not Invocation.objects.exists()


@pytest.mark.parametrize("fields, reason", [
    ({"cron": "0 25 * * *", "interval": None}, "is not valid"),
    ({"task_name": "tests.jobs.no_such_task"}, "no task named"),
    ({"kwargs": {"a": 1, "c": 1}}, "unexpected keyword argument 'c'"),
    ({"kwargs": ["a"]}, "not an object"),
])
def test_a_row_that_cannot_run_is_set_aside_without_stopping_the_others(fields, reason, caplog):
    broken = make_schedule("broken", late=timedelta(seconds=2))
    Schedule.objects.filter(pk=broken.pk).update(**fields)  # bad data written around the admin's checks
    fine = make_schedule("fine")
    assert tick(using="default").enqueued == 1
    broken.refresh_from_db()
    assert broken.next_run is None and reason in broken.problem
    (record,) = [r for r in caplog.records if reason in r.getMessage()]
    assert (record.name, record.schedule, record.task) == ("keyjobs.schedules", "broken", broken.task_name)
    assert Invocation.objects.get().cause_schedule_id == fine.pk
    assert tick(using="default").enqueued == 0  # set aside: not looked at again


def test_registration_concurrency_collapses_the_ticks_of_a_slow_task():
    schedule = make_schedule(task_name="tests.jobs.slow_report", kwargs={"seconds": 1})
    tick(using="default")
    Schedule.objects.filter(pk=schedule.pk).update(next_run=Now())  # the next tick, while the first still waits
    tick(using="default")
    only = Invocation.objects.get()
    schedule.refresh_from_db()
    assert schedule.last_invocation == only
    assert only.events.filter(kind="REUSED").exists()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_racing_runners_enqueue_each_due_tick_once():
    for number in range(120):
        make_schedule(f"schedule {number}")

    def runner() -> None:
        for _ in range(3):
            tick(using="default")

    assert at_once(runner, 6) == []
    assert Invocation.objects.count() == 120
    assert Invocation.objects.values("cause_schedule").distinct().count() == 120


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_runner_that_dies_mid_tick_holds_nothing():
    """A runner's tick holds its schedules' rows only in its transaction: its death frees them."""
    import psycopg

    schedule = make_schedule()
    params = connection.get_connection_params()
    dying = psycopg.connect(**params)
    dying.execute("SELECT id FROM keyjobs_schedule WHERE id = %s FOR UPDATE", [schedule.pk])  # mid-tick
    ticked = tick(using="default")
    assert ticked.enqueued == 0 and ticked.wait <= 0  # due, but another runner's for now: skipped, not waited on
    dying.close()  # the runner dies: its transaction with it, once the server sees the connection gone
    wait_for(lambda: tick(using="default").enqueued == 1, timeout=30, what="the dead runner's lock gone")
    assert Invocation.objects.get().cause_schedule_id == schedule.pk


# -- schedules declared in code ---------------------------------------------------------------------------


def test_declared_schedules_are_kept_in_step_with_the_code(isolated_registry):
    @task(name="tests.poll", schedule=timedelta(seconds=30))
    def poll(): ...

    sync_declared(using="default")
    row = Schedule.objects.get(name="tests.poll")
    assert (row.origin, row.interval, row.enabled) == (Schedule.Origin.CODE, timedelta(seconds=30), True)
    assert row.next_run is not None
    Schedule.objects.filter(pk=row.pk).update(enabled=False)  # paused in the admin

    @task(name="tests.poll", schedule="*/5 * * * *")
    def poll(): ...  # noqa: F811 - the same task, redeclared with another rule

    sync_declared(using="default")
    row.refresh_from_db()
    assert (row.cron, row.interval, row.enabled) == ("*/5 * * * *", None, False)

    @task(name="tests.poll")
    def poll(): ...  # noqa: F811 - its schedule removed

    sync_declared(using="default")
    assert not Schedule.objects.filter(name="tests.poll").exists()


@pytest.mark.django_db(transaction=True)
def test_a_runner_syncs_the_declared_schedules_and_runs_their_ticks(isolated_registry):
    @task(name="tests.jobs.add_each_second", schedule=timedelta(seconds=1), schedule_kwargs={"a": 2})
    def add_each_second(a):
        return a

    ticks = ScheduleTicks()
    worker = Worker(threads=1)
    ticks.run(worker)
    schedule = Schedule.objects.get(name="tests.jobs.add_each_second")
    assert schedule.origin == Schedule.Origin.CODE
    assert ticks.next_at <= time.monotonic() + 1.0  # its next look: before its next tick
    assert "enqueue due schedule ticks" in [duty.name for duty in duties_of(worker)]


# -- the admin and the monitor ----------------------------------------------------------------------------


def test_the_admin_refuses_a_bad_cron_string_in_the_form(admin_client):
    response = admin_client.post(reverse("admin:keyjobs_schedule_add"), {
        "name": "nightly", "task_name": "tests.jobs.add", "kwargs": '{"a": 1}', "cron": "61 * * * *",
        "interval": "", "catch_up": "on", "enabled": "on",
    })
    assert response.status_code == 200
    assert "is not valid" in response.content.decode()
    assert not Schedule.objects.exists()


@pytest.mark.parametrize("fields, message", [
    ({"task_name": "tests.jobs.nothing_here"}, "no task named"),
    ({"kwargs": '{"c": 1}'}, "cannot be called with these arguments"),
    ({"cron": "", "interval": ""}, "exactly one of them"),
    ({"interval": "00:01:00"}, "exactly one of them"),
])
def test_the_admin_form_names_what_cannot_run(admin_client, fields, message):
    data = {"name": "nightly", "task_name": "tests.jobs.add", "kwargs": '{"a": 1}', "cron": "0 2 * * *",
            "interval": "", "catch_up": "on", "enabled": "on", **fields}
    response = admin_client.post(reverse("admin:keyjobs_schedule_add"), data)
    assert response.status_code == 200 and message in response.content.decode()


def test_the_admin_form_offers_the_registered_tasks_to_choose_from(admin_client):
    page = admin_client.get(reverse("admin:keyjobs_schedule_add")).content.decode()
    field = page.split('<select name="task_name"')[1].split("</select>")[0]
    assert '<option value="tests.jobs.add">tests.jobs.add</option>' in field
    assert '<option value="tests.jobs.keyed">tests.jobs.keyed</option>' in field


def test_the_admin_form_keeps_offering_a_schedules_task_that_is_gone(admin_client):
    schedule = make_schedule(task_name="tests.jobs.long_gone")
    page = admin_client.get(reverse("admin:keyjobs_schedule_change", args=[schedule.pk])).content.decode()
    assert '<option value="tests.jobs.long_gone" selected>' in page


def test_a_schedule_added_in_the_admin_is_planned_and_described(admin_client):
    response = admin_client.post(reverse("admin:keyjobs_schedule_add"), {
        "name": "nightly", "task_name": "tests.jobs.add", "kwargs": '{"a": 1}', "cron": "0 2 * * *",
        "interval": "", "catch_up": "on", "enabled": "on",
    })
    assert response.status_code == 302
    schedule = Schedule.objects.get()
    assert schedule.origin == Schedule.Origin.ADMIN and schedule.next_run > timezone.now()
    page = admin_client.get(reverse("admin:keyjobs_schedule_change", args=[schedule.pk])).content.decode()
    assert "At 02:00" in page


def test_a_declared_schedule_is_read_only_in_the_admin(admin_client):
    schedule = make_schedule(origin=Schedule.Origin.CODE)
    page = admin_client.get(reverse("admin:keyjobs_schedule_change", args=[schedule.pk])).content.decode()
    assert 'name="enabled"' in page
    assert 'name="task_name"' not in page and 'name="interval"' not in page


def test_the_schedules_page_shows_next_and_last_runs_and_links_both_ways(admin_client):
    schedule = make_schedule()
    tick(using="default")
    invocation = Invocation.objects.get()
    page = admin_client.get(reverse("admin:keyjobs_invocation_schedules")).content.decode()
    assert "every minute" in page and "Every minute" in page
    assert reverse("admin:keyjobs_invocation_change", args=[invocation.pk]) in page
    runs = admin_client.get(reverse("admin:keyjobs_invocation_changelist"),
                            {"cause_schedule__id__exact": schedule.pk}).content.decode()
    assert f">{invocation.pk}<" in runs
    detail = admin_client.get(reverse("admin:keyjobs_invocation_change", args=[invocation.pk])).content.decode()
    assert reverse("admin:keyjobs_schedule_change", args=[schedule.pk]) in detail


def test_staff_with_the_change_permission_pause_and_resume_a_schedule(django_user_model):
    schedule = make_schedule()
    client = staff(django_user_model, "operator", "view_invocation", "change_schedule")
    toggle = reverse("admin:keyjobs_schedule_toggle", args=[schedule.pk])
    assert client.post(toggle).status_code == 302
    schedule.refresh_from_db()
    assert not schedule.enabled
    assert tick(using="default").enqueued == 0  # paused from its next tick on
    client.post(toggle)
    schedule.refresh_from_db()
    assert schedule.enabled and schedule.next_run > timezone.now()


def test_staff_without_the_change_permission_cannot_pause(django_user_model):
    schedule = make_schedule()
    client = staff(django_user_model, "viewer", "view_invocation")
    page = client.get(reverse("admin:keyjobs_invocation_schedules")).content.decode()
    assert "Pause" not in page
    assert client.post(reverse("admin:keyjobs_schedule_toggle", args=[schedule.pk])).status_code == 403
    schedule.refresh_from_db()
    assert schedule.enabled


def test_the_timeline_marks_ticks():
    make_schedule()
    tick(using="default")
    invocation = Invocation.objects.get()
    now = timezone.now()
    data = queries.timeline(queries.Window.last(5, now), now=now)
    assert [(m["id"], m["kind"]) for m in data["markers"]] == [(invocation.pk, "tick")]


def test_a_tick_of_a_task_with_a_key_waits_like_any_invocation():
    make_schedule(task_name="tests.jobs.keyed", kwargs={"account_id": "acme", "op": "tick"})
    tick(using="default")
    assert Invocation.objects.get().running_key is not None
    assert jobs.keyed.running_concurrency.name == "KEYS"


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("refused", [r'^\s*UPDATE "keyjobs_schedule"', r'INSERT INTO "keyjobs_invocation"'],
                         ids=["moving next_run", "enqueueing the tick"])
def test_a_tick_and_its_next_run_move_together_or_not_at_all(refused):
    """One transaction: a tick whose schedule cannot move on leaves no invocation, and the reverse; the next tick runs it."""
    schedule = make_schedule()
    due = schedule.next_run
    with failing_once(refused) as faulted, pytest.raises(DataError):
        tick(using="default")
    assert faulted, "the statement was never reached"
    schedule.refresh_from_db()
    assert (Invocation.objects.count(), schedule.next_run) == (0, due)
    assert tick(using="default").enqueued == 1
    assert Invocation.objects.get().cause_tick == due
