"""The monitor's HTTP side: who may see the pages, what each answers, and how many queries a request takes.

What the pages read is tested in ``test_monitor_queries``; how values read, in ``test_monitor_display``.
"""

import json
from datetime import datetime, timedelta
from urllib.parse import urlencode

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from keyjobs.status import Status
from tests.factories import InvocationFactory, RunnerFactory, give_dashboard_load, give_run, give_runs

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


# -- the timeline's data endpoint -----------------------------------------------------------


def test_the_timeline_data_takes_a_bounded_number_of_queries(viewer: Client, django_assert_num_queries) -> None:
    now = timezone.now()
    give_runs(now)  # 30 finished, one still running
    # Session, user, its permissions and its groups'; events; the schedules' ticks; runs still going; runners;
    # whether any work is left.
    with django_assert_num_queries(9):
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


def test_the_dashboard_page_refreshes_itself_while_work_waits(viewer: Client) -> None:
    InvocationFactory(status=Status.REGISTERED)
    page = viewer.get(reverse(DASHBOARD)).content.decode()
    assert 'data-active="true"' in page and "keyjobs/refresh.js" in page


def test_the_dashboard_page_stays_still_when_nothing_waits(viewer: Client) -> None:
    InvocationFactory(status=Status.SUCCESS)
    assert 'data-active="false"' in viewer.get(reverse(DASHBOARD)).content.decode()


def test_the_dashboard_takes_a_bounded_number_of_queries(viewer: Client, django_assert_num_queries) -> None:
    give_dashboard_load()  # 20 finished over 4 tasks, 7 keys and 3 runners; one waiting
    # Session, user, its permissions and its groups'; per task and status; throughput; live runners; what
    # they run; busiest keys; oldest waiting; keys at their limit.
    with django_assert_num_queries(11):
        assert viewer.get(reverse(DASHBOARD)).status_code == 200


# -- the key view -------------------------------------------------------------------------


def test_the_key_view_shows_arguments_and_errors_as_text(viewer: Client) -> None:
    InvocationFactory(task_name="tests.jobs.keyed", running_key=ACME, status=Status.FAILED, args=[XSS],
                      error=f"ValueError: {XSS}")

    page = viewer.get(key_url("tests.jobs.keyed", ACME)).content.decode()

    assert "<script>alert" not in page
    assert "&lt;/script&gt;&lt;script&gt;alert(" in page


def test_the_key_view_shows_its_rate_window_and_the_work_deferred(viewer: Client) -> None:
    deferred = InvocationFactory(task_name="tests.jobs.rated", running_key=ACME, status=Status.REGISTERED,
                                 run_after=timezone.now() + timedelta(minutes=5))

    page = viewer.get(key_url("tests.jobs.rated", ACME)).content.decode()

    assert "Rate limit <code>3/s</code>: <strong>0</strong> of 3 starts in the current window of 1 s." in page
    assert f"#{deferred.pk}</a>" in page.split("Rate window and deferred work")[1]


def test_the_key_view_shows_the_slots_in_use_out_of_the_limit(viewer: Client) -> None:
    InvocationFactory(task_name="tests.jobs.keyed_two_slots", running_key=ACME, running_limit=2,
                      status=Status.RUNNING, runner=RunnerFactory())

    page = viewer.get(key_url("tests.jobs.keyed_two_slots", ACME)).content.decode()

    assert "Running now: 1 of 2 slots in use" in page


def test_the_dashboard_lists_a_key_at_its_limit(viewer: Client) -> None:
    InvocationFactory(task_name="tests.jobs.keyed", running_key=ACME, status=Status.RUNNING, runner=RunnerFactory())

    page = viewer.get(reverse(DASHBOARD)).content.decode()

    assert "Keys at their limit now" in page and "1 of 1 slot in use" in page


def test_the_key_view_needs_a_task_and_a_key(viewer: Client) -> None:
    assert viewer.get(reverse(KEY), {"task": "tests.jobs.keyed"}).status_code == 400


def test_the_key_view_takes_a_bounded_number_of_queries(viewer: Client, django_assert_num_queries) -> None:
    runner = RunnerFactory()
    for status in [Status.SUCCESS] * 5 + [Status.REGISTERED, Status.CONCURRENCY_CONTROLLED_FINAL]:
        InvocationFactory(task_name="tests.jobs.keyed", running_key=ACME, status=status, runner=runner)
    # Session, user, its permissions and its groups'; running, waiting, ran, dropped, deferred
    # (and, for a rate-limited task, its window).
    with django_assert_num_queries(9):
        assert viewer.get(key_url("tests.jobs.keyed", ACME)).status_code == 200
