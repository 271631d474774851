"""The monitor's pages: timeline (and its data), dashboard and key view; who may see them, what they show."""

import json
from datetime import datetime, timedelta
from urllib.parse import urlencode

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from keyjobs.models import Event, Invocation, Runner
from keyjobs.status import Status
from keyjobs.views import (
    MARKER_COLOURS,
    STATUS_COLOURS,
    Window,
    dashboard_data,
    key_data,
    timeline_data,
    timeline_events,
)
from tests.factories import EventFactory, InvocationFactory, RunnerFactory, give_run

pytestmark = pytest.mark.django_db

ACME = '{"account_id":"acme"}'
GLOBEX = '{"account_id":"globex"}'
XSS = '</script><script>alert("x")</script><b>'

TIMELINE = "admin:keyjobs_invocation_timeline"
TIMELINE_DATA = "admin:keyjobs_invocation_timeline_data"
DASHBOARD = "admin:keyjobs_invocation_dashboard"
KEY = "admin:keyjobs_invocation_key"


def key_url(task: str, key: str) -> str:
    return f"{reverse(KEY)}?{urlencode({'task': task, 'key': key})}"


MONITOR_URLS = [
    pytest.param(lambda: reverse(TIMELINE), id="timeline"),
    pytest.param(lambda: reverse(TIMELINE_DATA), id="timeline-data"),
    pytest.param(lambda: reverse(DASHBOARD), id="dashboard"),
    pytest.param(lambda: key_url("tests.jobs.keyed", ACME), id="key"),
]


@pytest.fixture
def viewer(django_user_model: type) -> Client:
    """A client logged in as staff with the view permission of invocations, and nothing more."""
    user = django_user_model.objects.create_user("viewer", password="x", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_invocation"))
    client = Client()
    client.force_login(user)
    return client


def window(minutes: int = 15, now: datetime | None = None) -> Window:
    now = now or timezone.now()
    return Window(now - timedelta(minutes=minutes), now, minutes)


def ms(moment: datetime) -> int:
    return round(moment.timestamp() * 1000)


# -- who may see the pages ---------------------------------------------------------


@pytest.mark.parametrize("url", MONITOR_URLS)
def test_anonymous_users_are_sent_to_the_login_page(client: Client, url) -> None:
    response = client.get(url())
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


@pytest.mark.parametrize("url", MONITOR_URLS)
def test_users_who_are_not_staff_are_refused(client: Client, django_user_model: type, url) -> None:
    user = django_user_model.objects.create_user("outsider", password="x")
    user.user_permissions.add(Permission.objects.get(codename="view_invocation"))
    client.force_login(user)
    response = client.get(url())
    # The admin's answer to a non-staff user: its login page, which says the account may not see this.
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


@pytest.mark.parametrize("url", MONITOR_URLS)
def test_staff_without_the_view_permission_are_refused(client: Client, django_user_model: type, url) -> None:
    client.force_login(django_user_model.objects.create_user("staff", password="x", is_staff=True))
    assert client.get(url()).status_code == 403


@pytest.mark.parametrize("url", MONITOR_URLS)
def test_staff_with_the_view_permission_see_the_pages(viewer: Client, url) -> None:
    assert viewer.get(url()).status_code == 200


def test_the_admin_index_of_keyjobs_links_the_monitor(admin_client: Client) -> None:
    page = admin_client.get(reverse("admin:app_list", args=["keyjobs"])).content.decode()
    assert reverse(TIMELINE) in page and reverse(DASHBOARD) in page


# -- the timeline's data ---------------------------------------------------------------


def test_every_status_has_a_colour() -> None:
    assert set(STATUS_COLOURS) == set(Status.values)
    assert set(MARKER_COLOURS) == {"rerouted", "dropped", "reused"}


def test_a_run_is_a_bar_from_its_running_event_to_its_next_status_change() -> None:
    runner, now = RunnerFactory(), timezone.now()
    start, end = now - timedelta(seconds=30), now - timedelta(seconds=28)
    invocation = give_run(InvocationFactory(running_key=ACME, task_name="tests.jobs.keyed"),
                          runner=runner, thread=2, start=start, end=end, status=Status.FAILED)

    data = timeline_data(window(now=now), now=now)

    [run] = data["runs"]
    assert (run["id"], run["start"], run["end"], run["status"]) == (invocation.pk, ms(start), ms(end), "FAILED")
    assert data["lanes"]["thread"][run["thread_lane"]] == {
        "id": f"{runner.pk}/2", "label": f"test-host:{runner.pid} · thread 2", "runner": runner.pk, "thread": 2,
    }
    assert data["lanes"]["key"][run["key_lane"]]["label"] == "keyed · acme"
    assert data["lanes"]["key"][run["key_lane"]]["raw_key"] == ACME


def test_runs_of_one_thread_share_a_lane_and_keys_have_lanes_of_their_own() -> None:
    runner, now = RunnerFactory(), timezone.now()
    for number, key in enumerate([ACME, GLOBEX, ACME]):
        start = now - timedelta(seconds=60 - 10 * number)
        give_run(InvocationFactory(running_key=key), runner=runner, thread=0, start=start,
                 end=start + timedelta(seconds=1))

    data = timeline_data(window(now=now), now=now)

    assert [lane["label"] for lane in data["lanes"]["thread"]] == [f"test-host:{runner.pid} · thread 0"]
    assert [lane["key"] for lane in data["lanes"]["key"]] == ["acme", "globex"]
    by_key = [data["lanes"]["key"][run["key_lane"]]["key"] for run in data["runs"]]
    assert sorted(by_key) == ["acme", "acme", "globex"]


def test_key_lanes_are_grouped_by_task_the_earliest_task_first() -> None:
    runner, now = RunnerFactory(), timezone.now()
    for seconds, task_name, key in [(50, "tests.jobs.z_first", GLOBEX), (40, "tests.jobs.a_second", ACME),
                                    (30, "tests.jobs.z_first", ACME), (20, "tests.jobs.a_second", None)]:
        start = now - timedelta(seconds=seconds)
        give_run(InvocationFactory(task_name=task_name, running_key=key), runner=runner, thread=0, start=start,
                 end=start + timedelta(seconds=1))

    labels = [lane["label"] for lane in timeline_data(window(now=now), now=now)["lanes"]["key"]]

    assert labels == ["z_first · acme", "z_first · globex", "a_second · acme", "a_second · no key"]


def test_a_run_still_going_has_no_end_and_the_data_says_work_is_active() -> None:
    now = timezone.now()
    give_run(InvocationFactory(running_key=ACME), runner=RunnerFactory(), thread=0,
             start=now - timedelta(seconds=5))

    data = timeline_data(window(now=now), now=now)

    assert [(run["status"], run["end"]) for run in data["runs"]] == [("RUNNING", None)]
    assert data["active"] is True


def test_the_data_says_no_work_is_active_when_everything_is_final() -> None:
    now = timezone.now()
    give_run(InvocationFactory(), runner=RunnerFactory(), thread=0, start=now - timedelta(seconds=5), end=now)
    assert timeline_data(window(now=now), now=now)["active"] is False


def test_a_run_that_began_before_the_window_starts_at_its_started_at() -> None:
    now = timezone.now()
    start, end = now - timedelta(minutes=20), now - timedelta(minutes=10)
    give_run(InvocationFactory(), runner=RunnerFactory(), thread=0, start=start, end=end)

    [run] = timeline_data(window(15, now), now=now)["runs"]

    assert (run["start"], run["end"]) == (ms(start), ms(end))


def test_a_run_still_going_that_began_before_the_window_is_shown() -> None:
    now = timezone.now()
    invocation = give_run(InvocationFactory(), runner=RunnerFactory(), thread=1, start=now - timedelta(hours=1))

    [run] = timeline_data(window(15, now), now=now)["runs"]

    assert (run["id"], run["end"], run["status"]) == (invocation.pk, None, "RUNNING")


def test_a_run_of_a_past_window_that_ended_after_it_gets_its_end() -> None:
    now = timezone.now()
    start, end = now - timedelta(minutes=30), now - timedelta(minutes=5)
    give_run(InvocationFactory(), runner=RunnerFactory(), thread=0, start=start, end=end)
    past = Window(now - timedelta(minutes=40), now - timedelta(minutes=20))

    [run] = timeline_data(past, now=now)["runs"]

    assert (run["start"], run["end"], run["status"]) == (ms(start), ms(end), "SUCCESS")


def test_an_invocation_run_twice_shows_two_bars() -> None:
    runner, now = RunnerFactory(), timezone.now()
    invocation = InvocationFactory()
    give_run(invocation, runner=runner, thread=0, start=now - timedelta(seconds=50),
             end=now - timedelta(seconds=49), status=Status.RETRY)
    EventFactory(invocation=invocation, from_status=Status.RETRY, to_status=Status.REGISTERED,
                 at=now - timedelta(seconds=45))
    invocation.status = Status.REGISTERED
    give_run(invocation, runner=runner, thread=3, start=now - timedelta(seconds=40),
             end=now - timedelta(seconds=39))

    runs = timeline_data(window(now=now), now=now)["runs"]

    assert [(run["id"], run["status"]) for run in runs] == [(invocation.pk, "RETRY"), (invocation.pk, "SUCCESS")]


def test_rerouted_dropped_and_deduplicated_invocations_are_markers() -> None:
    now = timezone.now()
    parked, dropped, merged = (InvocationFactory(running_key=ACME) for _ in range(3))
    EventFactory(invocation=parked, from_status=Status.REGISTERED, to_status=Status.REROUTED,
                 at=now - timedelta(seconds=3))
    EventFactory(invocation=dropped, from_status=Status.REGISTERED, to_status=Status.CONCURRENCY_CONTROLLED_FINAL,
                 at=now - timedelta(seconds=2))
    EventFactory(invocation=merged, kind=Event.Kind.REUSED, from_status=Status.REGISTERED,
                 to_status=Status.REGISTERED, at=now - timedelta(seconds=1))

    data = timeline_data(window(now=now), now=now)

    assert [(marker["id"], marker["kind"]) for marker in data["markers"]] == [
        (parked.pk, "rerouted"), (dropped.pk, "dropped"), (merged.pk, "reused"),
    ]
    assert {data["lanes"]["key"][marker["key_lane"]]["key"] for marker in data["markers"]} == {"acme"}
    assert data["runs"] == []


def test_events_that_change_no_status_are_neither_runs_nor_markers() -> None:
    now = timezone.now()
    invocation = give_run(InvocationFactory(), runner=RunnerFactory(), thread=0, start=now - timedelta(seconds=9),
                          end=now - timedelta(seconds=1))
    EventFactory(invocation=invocation, kind="OVERDUE", from_status=Status.RUNNING, to_status=Status.RUNNING,
                 at=now - timedelta(seconds=5))

    data = timeline_data(window(now=now), now=now)

    assert [(run["start"], run["end"]) for run in data["runs"]] == [
        (ms(now - timedelta(seconds=9)), ms(now - timedelta(seconds=1)))
    ]
    assert data["markers"] == []


def test_nothing_outside_the_window_is_read() -> None:
    now = timezone.now()
    give_run(InvocationFactory(), runner=RunnerFactory(), thread=0, start=now - timedelta(hours=2),
             end=now - timedelta(hours=2) + timedelta(seconds=1))
    assert timeline_data(window(15, now), now=now)["runs"] == []


def test_a_busy_window_is_cut_to_its_most_recent_events_and_says_so() -> None:
    runner, now = RunnerFactory(), timezone.now()
    for number in range(4):
        start = now - timedelta(seconds=50 - 10 * number)
        give_run(InvocationFactory(), runner=runner, thread=0, start=start, end=start + timedelta(seconds=1))

    data = timeline_data(window(now=now), now=now, limit=4)

    assert data["truncated"] is True
    assert [run["start"] for run in data["runs"]] == [ms(now - timedelta(seconds=30)), ms(now - timedelta(seconds=20))]


def test_the_timeline_can_show_one_task_and_key() -> None:
    runner, now = RunnerFactory(), timezone.now()
    mine = give_run(InvocationFactory(task_name="tests.jobs.keyed", running_key=ACME), runner=runner, thread=0,
                    start=now - timedelta(seconds=9), end=now - timedelta(seconds=8))
    for task_name, key in [("tests.jobs.keyed", GLOBEX), ("tests.jobs.other", ACME)]:
        give_run(InvocationFactory(task_name=task_name, running_key=key), runner=runner, thread=1,
                 start=now - timedelta(seconds=7), end=now - timedelta(seconds=6))

    data = timeline_data(window(now=now), now=now, task="tests.jobs.keyed", key=ACME)

    assert [run["id"] for run in data["runs"]] == [mine.pk]


@pytest.mark.sqlite
def test_the_timeline_reads_its_events_through_the_index_on_at() -> None:
    explained = timeline_events(window()).explain()
    assert "keyjobs_event_at" in explained, explained


@pytest.mark.postgres
def test_the_timeline_query_uses_the_index_on_postgresql_even_when_a_scan_looks_cheap() -> None:
    # On a tiny table the planner prefers a scan; forbid it to see that the index can serve the query.
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
    explained = timeline_events(window()).explain()
    assert "keyjobs_event_at" in explained, explained


def test_the_timeline_data_takes_a_bounded_number_of_queries(viewer: Client, django_assert_num_queries) -> None:
    runners, now = [RunnerFactory() for _ in range(3)], timezone.now()
    for number in range(30):
        start = now - timedelta(seconds=100 - number)
        give_run(InvocationFactory(running_key=f'{{"account_id":"a{number}"}}'), runner=runners[number % 3],
                 thread=number % 4, start=start, end=start + timedelta(milliseconds=500))
    give_run(InvocationFactory(), runner=runners[0], thread=0, start=now - timedelta(hours=1))  # still running
    # Session, user, its permissions and its groups'; events; runs still going; runners; whether any work is left.
    with django_assert_num_queries(8):
        response = viewer.get(reverse(TIMELINE_DATA))
    assert len(response.json()["runs"]) == 31


def test_the_data_endpoint_takes_a_window_from_and_to(viewer: Client) -> None:
    now = timezone.now()
    give_run(InvocationFactory(), runner=RunnerFactory(), thread=0, start=now - timedelta(hours=3),
             end=now - timedelta(hours=3) + timedelta(seconds=2))
    since, until = now - timedelta(hours=4), now - timedelta(hours=2)

    data = viewer.get(reverse(TIMELINE_DATA), {"from": since.isoformat(), "to": until.isoformat()}).json()

    assert (data["start"], data["end"], data["follows_now"]) == (ms(since), ms(until), False)
    assert len(data["runs"]) == 1


@pytest.mark.parametrize("query", [
    {"minutes": "abc"}, {"minutes": "0"}, {"from": "yesterday"},
    {"from": "2030-01-02T00:00", "to": "2030-01-01T00:00"},
    {"from": "2020-01-01T00:00", "to": "2030-01-01T00:00"},
])
def test_the_data_endpoint_refuses_a_window_that_is_not_one(viewer: Client, query: dict[str, str]) -> None:
    response = viewer.get(reverse(TIMELINE_DATA), query)
    assert response.status_code == 400


def test_window_reads_a_wall_clock_time_in_the_sites_time_zone() -> None:
    now = timezone.now()
    chosen = Window.from_query({"from": "2030-01-01T10:00", "to": "2030-01-01T11:00"}, now)
    assert chosen.start == datetime(2030, 1, 1, 10, tzinfo=timezone.get_current_timezone())
    assert not chosen.follows_now


# -- the timeline page ---------------------------------------------------------------


def test_the_timeline_page_bootstraps_its_data_and_its_script(viewer: Client) -> None:
    now = timezone.now()
    give_run(InvocationFactory(running_key=ACME), runner=RunnerFactory(), thread=0,
             start=now - timedelta(seconds=3), end=now)

    page = viewer.get(reverse(TIMELINE), {"lanes": "key"}).content.decode()

    assert 'id="kj-timeline-data"' in page and 'id="kj-timeline-config"' in page
    assert "keyjobs/timeline.js" in page
    config = json.loads(page.split('id="kj-timeline-config" type="application/json">')[1].split("</script>")[0])
    assert config["lanes"] == "key"
    assert config["dataUrl"] == reverse(TIMELINE_DATA)


def test_the_timeline_page_loads_nothing_from_the_internet(viewer: Client) -> None:
    page = viewer.get(reverse(TIMELINE)).content.decode()
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page


def test_keys_and_task_names_with_html_stay_inside_the_timelines_json(viewer: Client) -> None:
    now = timezone.now()
    give_run(InvocationFactory(task_name=XSS, running_key=json.dumps({"account_id": XSS})), runner=RunnerFactory(),
             thread=0, start=now - timedelta(seconds=3), end=now)

    page = viewer.get(reverse(TIMELINE), {"task": XSS}).content.decode()

    assert "<script>alert" not in page
    assert "</script><script>" not in page


def test_a_wrong_window_on_the_timeline_page_is_explained_not_an_error(viewer: Client) -> None:
    response = viewer.get(reverse(TIMELINE), {"minutes": "lots"})
    assert response.status_code == 200
    assert "&#x27;minutes&#x27; must be a whole number" in response.content.decode()


# -- the dashboard ------------------------------------------------------------------------


def test_the_dashboard_counts_per_status_and_per_task() -> None:
    InvocationFactory.create_batch(2, status=Status.SUCCESS, task_name="tests.jobs.a")
    InvocationFactory(status=Status.FAILED, task_name="tests.jobs.b")
    InvocationFactory(status=Status.REGISTERED, task_name="tests.jobs.b")

    data = dashboard_data(now=timezone.now())

    counts = {item["status"]: item["count"] for item in data["per_status"]}
    assert counts == {**dict.fromkeys(Status.values, 0), "SUCCESS": 2, "FAILED": 1, "REGISTERED": 1}
    per_task = {row["task"]: dict(zip(Status.values, row["counts"])) for row in data["per_task"]}
    assert per_task["tests.jobs.a"]["SUCCESS"] == 2
    assert (per_task["tests.jobs.b"]["FAILED"], per_task["tests.jobs.b"]["REGISTERED"]) == (1, 1)
    assert data["active"] is True


def test_the_dashboard_counts_what_finished_in_each_of_the_last_minutes() -> None:
    now = timezone.now()
    InvocationFactory.create_batch(3, status=Status.SUCCESS, finished_at=now)
    InvocationFactory(status=Status.FAILED, finished_at=now - timedelta(minutes=2))
    InvocationFactory(status=Status.SUCCESS, finished_at=now - timedelta(hours=1))

    throughput = dashboard_data(now=now)["throughput"]

    assert len(throughput) == 15
    assert throughput[-1]["count"] == 3 and throughput[-3]["count"] == 1
    assert sum(point["count"] for point in throughput) == 4


def test_the_dashboard_lists_live_runners_with_what_they_run() -> None:
    alive = RunnerFactory()
    RunnerFactory(stopped_at=timezone.now())
    silent = RunnerFactory()
    Runner.objects.filter(pk=silent.pk).update(heartbeat_at=timezone.now() - timedelta(hours=1))
    give_run(InvocationFactory(), runner=alive, thread=0, start=timezone.now())

    runners = dashboard_data(now=timezone.now())["runners"]

    assert [(runner.pk, runner.running) for runner in runners] == [(alive.pk, 1)]


def test_the_dashboard_names_the_busiest_keys_and_the_oldest_waiting_invocation() -> None:
    now = timezone.now()
    oldest = InvocationFactory(running_key=ACME, created_at=now - timedelta(minutes=5))
    InvocationFactory.create_batch(2, running_key=ACME, status=Status.SUCCESS)
    InvocationFactory(running_key=GLOBEX, status=Status.CONCURRENCY_CONTROLLED_FINAL)
    InvocationFactory(status=Status.REGISTERED)  # no key

    data = dashboard_data(now=now)

    assert [(item["key"], item["total"], item["waiting"], item["dropped"]) for item in data["busiest"]] == [
        ("acme", 3, 1, 0), ("globex", 1, 0, 1),
    ]
    assert data["oldest_waiting"] == oldest


def test_the_dashboard_page_refreshes_itself_while_work_waits(viewer: Client) -> None:
    InvocationFactory(status=Status.REGISTERED)
    page = viewer.get(reverse(DASHBOARD)).content.decode()
    assert 'data-active="true"' in page and "keyjobs/refresh.js" in page


def test_the_dashboard_page_stays_still_when_nothing_waits(viewer: Client) -> None:
    InvocationFactory(status=Status.SUCCESS)
    assert 'data-active="false"' in viewer.get(reverse(DASHBOARD)).content.decode()


def test_the_dashboard_takes_a_bounded_number_of_queries(viewer: Client, django_assert_num_queries) -> None:
    runners = [RunnerFactory() for _ in range(3)]
    for number in range(20):
        InvocationFactory(task_name=f"tests.jobs.t{number % 4}", running_key=f'{{"account_id":"a{number % 7}"}}',
                          status=Status.SUCCESS, finished_at=timezone.now(), runner=runners[number % 3])
    InvocationFactory(status=Status.REGISTERED)
    # Session, user, its permissions and its groups'; per task and status; throughput; live runners; what
    # they run; busiest keys; oldest waiting.
    with django_assert_num_queries(10):
        assert viewer.get(reverse(DASHBOARD)).status_code == 200


# -- the key view -------------------------------------------------------------------------


def test_the_key_view_tells_what_ran_runs_waits_and_was_dropped() -> None:
    runner, now = RunnerFactory(), timezone.now()
    ran = give_run(InvocationFactory(task_name="tests.jobs.keyed", running_key=ACME), runner=runner, thread=0,
                   start=now - timedelta(seconds=9), end=now - timedelta(seconds=8))
    running = give_run(InvocationFactory(task_name="tests.jobs.keyed", running_key=ACME), runner=runner, thread=1,
                       start=now - timedelta(seconds=1))
    second = InvocationFactory(task_name="tests.jobs.keyed", running_key=ACME, status=Status.REROUTED)
    first = InvocationFactory(task_name="tests.jobs.keyed", running_key=ACME, status=Status.REGISTERED, priority=5)
    dropped = InvocationFactory(task_name="tests.jobs.keyed", running_key=ACME,
                                status=Status.CONCURRENCY_CONTROLLED_FINAL)
    InvocationFactory(task_name="tests.jobs.keyed", running_key=GLOBEX)
    InvocationFactory(task_name="tests.jobs.other", running_key=ACME)

    data = key_data("tests.jobs.keyed", ACME)

    assert data["ran"] == [ran] and data["running"] == [running] and data["dropped"] == [dropped]
    assert data["waiting"] == [first, second]


def test_the_key_view_finds_a_registration_key_too() -> None:
    merged = InvocationFactory(task_name="tests.jobs.once_per_key", registration_key=ACME)
    assert key_data("tests.jobs.once_per_key", ACME)["waiting"] == [merged]


def test_the_key_view_shows_arguments_and_errors_as_text(viewer: Client) -> None:
    InvocationFactory(task_name="tests.jobs.keyed", running_key=ACME, status=Status.FAILED, args=[XSS],
                      error=f"ValueError: {XSS}")

    page = viewer.get(key_url("tests.jobs.keyed", ACME)).content.decode()

    assert "<script>alert" not in page
    assert "&lt;/script&gt;&lt;script&gt;alert(" in page


def test_the_key_view_needs_a_task_and_a_key(viewer: Client) -> None:
    assert viewer.get(reverse(KEY), {"task": "tests.jobs.keyed"}).status_code == 400


def test_the_key_view_takes_a_bounded_number_of_queries(viewer: Client, django_assert_num_queries) -> None:
    runner = RunnerFactory()
    for status in [Status.SUCCESS] * 5 + [Status.REGISTERED, Status.CONCURRENCY_CONTROLLED_FINAL]:
        InvocationFactory(task_name="tests.jobs.keyed", running_key=ACME, status=status, runner=runner)
    # Session, user, its permissions and its groups'; running, waiting, ran, dropped.
    with django_assert_num_queries(8):
        assert viewer.get(key_url("tests.jobs.keyed", ACME)).status_code == 200


def test_invocations_outside_the_key_are_not_in_its_view() -> None:
    InvocationFactory(task_name="tests.jobs.keyed", running_key=GLOBEX, status=Status.SUCCESS)
    assert not any(key_data("tests.jobs.keyed", ACME)[name] for name in ("ran", "running", "waiting", "dropped"))
    assert Invocation.objects.count() == 1
