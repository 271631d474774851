"""The monitor's HTTP side: who may see the pages, what each answers, and how many queries a request takes.

What the pages read is tested in ``test_monitor_queries``; how values read, in ``test_monitor_display``.
"""

import json
import re
from datetime import datetime, timedelta
from urllib.parse import urlencode

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from keyjobs.monitor.display import monitor_links
from keyjobs.status import Status
from tests.factories import EventFactory, InvocationFactory, RunnerFactory, give_dashboard_load, give_run, give_runs

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


#: The monitor's pages, and every URL of it.
PAGES = [
    pytest.param(lambda: reverse("admin:keyjobs_invocation_logs"), id="logs"),
    pytest.param(lambda: reverse("admin:keyjobs_invocation_tasks"), id="tasks"),
    pytest.param(lambda: reverse("admin:keyjobs_invocation_keys"), id="keys"),
    pytest.param(lambda: reverse(TIMELINE), id="timeline"),
    pytest.param(lambda: reverse(DASHBOARD), id="dashboard"),
    pytest.param(lambda: key_url("tests.jobs.keyed", ACME), id="key"),
    pytest.param(lambda: reverse("admin:keyjobs_invocation_schedules"), id="schedules"),
]
MONITOR_URLS = [*PAGES, pytest.param(lambda: reverse(TIMELINE_DATA), id="timeline-data")]



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




def breadcrumb_bar(page: str) -> str:
    """The opening tag of the page's breadcrumb bar: ``<ol class="breadcrumbs">`` or ``<div class="breadcrumbs">``."""
    found = re.search(r'<(ol|div) class="breadcrumbs">', page)
    assert found, "no breadcrumb bar"
    return found.group(0)


@pytest.mark.parametrize("url", PAGES)
def test_the_pages_breadcrumbs_use_the_admins_own_markup(viewer: Client, url) -> None:
    # Django 6.1 styles <ol class="breadcrumbs">, 5.2 <div class="breadcrumbs">: whichever the admin's own list
    # page writes on this Django, so must the monitor, or its bar loses the admin's style.
    admins = breadcrumb_bar(viewer.get(reverse("admin:keyjobs_invocation_changelist")).content.decode())
    page = viewer.get(url()).content.decode()
    assert breadcrumb_bar(page) == admins
    bar = page.split(admins)[1].split("</ol>" if admins.startswith("<ol") else "</div>")[0]
    assert reverse("admin:index") in bar and reverse("admin:app_list", args=["keyjobs"]) in bar


def test_the_admin_index_of_keyjobs_links_every_monitor_page(admin_client: Client) -> None:
    page = admin_client.get(reverse("admin:app_list", args=["keyjobs"])).content.decode()
    box = page.split("<caption>Monitor</caption>")[1].split("</table>")[0]
    for title, url in monitor_links():
        # The lists of invocations and runners are the app's models, listed above the box.
        assert f'href="{url}"' in (page if title in ("Invocations", "Runners") else box), title


# -- the timeline's data endpoint -----------------------------------------------------------


def test_the_timeline_data_takes_a_bounded_number_of_queries(viewer: Client, django_assert_num_queries) -> None:
    now = timezone.now()
    give_runs(now)  # 30 finished, one still running
    # Session, user, its permissions and its groups'; events; their invocations; the schedules' ticks; runs still
    # going; runners; whether any work is left.
    with django_assert_num_queries(10):
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


def test_the_timeline_legend_names_each_thing_once(viewer: Client) -> None:
    page = viewer.get(reverse(TIMELINE)).content.decode()
    legend = page.split('<ul class="kj-legend">')[1].split("</ul>")[0]
    # What follows each swatch or symbol.
    labels = [item.rsplit("</span>", 1)[1].split("</li>")[0].strip().casefold() for item in legend.split("<li>")[1:]]
    assert len(labels) == len(set(labels)) and "cancelled" in labels, labels


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
    # Session, user, its permissions and its groups'; waiting and owned per task and status; finished per task
    # (the rollup); throughput; live runners; what they run; busiest keys; when the oldest waiting was created,
    # and it; keys at their limit.
    with django_assert_num_queries(13):
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
    # (and, for a rate-limited task, its window); the key's control and its operators' actions.
    with django_assert_num_queries(11):
        assert viewer.get(key_url("tests.jobs.keyed", ACME)).status_code == 200


# -- an operator's hold on a key ---------------------------------------------------------------------------

KEY_ACT = "admin:keyjobs_invocation_key_act"


@pytest.fixture
def operator(django_user_model: type) -> Client:
    """A client logged in as staff who may view and change invocations."""
    user = django_user_model.objects.create_user("operator", password="x", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=["view_invocation", "change_invocation"]))
    client = Client()
    client.force_login(user)
    return client


def test_staff_who_may_only_view_see_a_keys_state_but_no_buttons_and_cannot_act(viewer: Client) -> None:
    from keyjobs.models import KeyControl

    page = viewer.get(key_url("tests.jobs.keyed", ACME)).content.decode()
    assert "Not paused." in page and 'value="pause"' not in page
    for action in ("pause", "cancel"):
        response = viewer.post(reverse(KEY_ACT), {"task": "tests.jobs.keyed", "key": ACME, "action": action})
        assert response.status_code == 403
    assert not KeyControl.objects.exists()


def test_an_operator_pauses_and_resumes_a_key_from_its_view_and_the_history_names_them(operator: Client) -> None:
    from keyjobs.models import KeyAction

    page = operator.get(key_url("tests.jobs.keyed", ACME)).content.decode()
    assert 'value="pause"' in page
    response = operator.post(reverse(KEY_ACT), {"task": "tests.jobs.keyed", "key": ACME, "action": "pause"})
    assert response.status_code == 302 and response["Location"] == key_url("tests.jobs.keyed", ACME)
    page = operator.get(response["Location"]).content.decode()
    assert "<strong>Paused</strong> by operator" in page and 'value="resume"' in page
    operator.post(reverse(KEY_ACT), {"task": "tests.jobs.keyed", "key": ACME, "action": "resume"})
    assert list(KeyAction.objects.order_by("id").values_list("kind", "by")) == [
        ("paused", "operator"), ("resumed", "operator")]


def test_an_operator_overrides_a_keys_limit_until_a_time(operator: Client) -> None:
    from keyjobs.models import KeyControl

    until = (timezone.localtime() + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M")
    operator.post(reverse(KEY_ACT), {"task": "tests.jobs.keyed", "key": ACME, "action": "override", "limit": "3",
                                     "rate": "10/m", "until": until})
    control = KeyControl.objects.get()
    assert (control.running_limit, control.rate_count, control.rate_window) == (3, 10, 60.0)
    assert "running limit <strong>3</strong>" in operator.get(key_url("tests.jobs.keyed", ACME)).content.decode()


@pytest.mark.parametrize("fields, said", [
    ({"rate": "often", "limit": "2"}, "the rate &#x27;often&#x27; must be"),
    ({"limit": "0"}, "Limit: Ensure this value is greater than or equal to 1"),  # the admin capitalizes a message
    ({"limit": "2", "until": ""}, "An override needs the time it ends"),
])
def test_a_bad_override_is_explained_and_changes_nothing(operator: Client, fields, said) -> None:
    from keyjobs.models import KeyControl

    until = (timezone.localtime() + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M")
    response = operator.post(reverse(KEY_ACT), {"task": "tests.jobs.keyed", "key": ACME, "action": "override",
                                                "until": until, **fields}, follow=True)
    assert said in response.content.decode()
    assert not KeyControl.objects.exists()


# -- the Tasks and Keys pages ---------------------------------------------------------------------------------


def roll_up_some_work() -> None:
    """Write a minute's history of two tasks, one keyed with a drop, and roll it up."""
    from keyjobs import rollup

    runner, now = RunnerFactory(), timezone.now()
    for number in range(6):
        start = now - timedelta(seconds=30 - number)
        give_run(InvocationFactory(task_name="tests.jobs.keyed", running_key=f'{{"account_id":"a{number % 3}"}}'),
                 runner=runner, thread=0, start=start, end=start + timedelta(milliseconds=200),
                 status=Status.FAILED if number == 5 else Status.SUCCESS)
        give_run(InvocationFactory(task_name="tests.jobs.add"), runner=runner, thread=1, start=start,
                 end=start + timedelta(seconds=2))
    dropped = InvocationFactory(task_name="tests.jobs.keyed", running_key=ACME)
    EventFactory(invocation=dropped, from_status=Status.REGISTERED, to_status=Status.CONCURRENCY_CONTROLLED_FINAL)
    rollup.roll_up(using="default")


def test_the_tasks_page_shows_each_tasks_rates_and_quantiles_with_charts(viewer: Client) -> None:
    roll_up_some_work()

    page = viewer.get(reverse("admin:keyjobs_invocation_tasks"), {"minutes": 15}).content.decode()

    keyed = page.split('data-task="tests.jobs.keyed"')[1].split("</tr>")[0]
    cells = [re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<td>(.*?)</td>", keyed, re.S)]
    # ended/min, enqueued, succeeded, failed, failure rate, retried, retry rate, durations, waits, merged, dropped
    assert cells[1:8] == ["0.47", "7", "5", "1", "16.7 %", "0", "0.0 %"], cells
    assert cells[11] == "1", cells  # dropped
    assert cells[8].count(" ms") == 3, cells  # 200 ms runs: each quantile in the 100-250 ms bucket
    # Four charts, each with a y axis of labelled ticks and time labels on its x axis.
    assert page.count('class="kj-chart"') == 4
    assert page.count('class="kj-chart-y"') == 12 and 'class="kj-chart-x"' in page


def test_the_keys_page_lists_the_keys_by_their_wait_with_drops(viewer: Client) -> None:
    roll_up_some_work()
    page = viewer.get(reverse("admin:keyjobs_invocation_keys"), {"minutes": 15}).content.decode()
    table = page.split('id="kj-keys"')[1]
    for text in [">a0</a>", ">a1</a>", ">a2</a>", ">acme</a>", "100.0 %"]:
        assert text in table, text


@pytest.mark.parametrize("name", ["tasks", "keys"])
@pytest.mark.parametrize("minutes", [15, 60, 10080])
def test_the_statistics_pages_take_the_same_queries_whatever_the_window(viewer: Client, django_assert_num_queries,
                                                                         name: str, minutes: int) -> None:
    roll_up_some_work()
    # Session, user, its permissions and its groups'; per task (or key) over the window; per minute (tasks);
    # whether anything waits or runs (the page refreshes meanwhile).
    with django_assert_num_queries(7 if name == "tasks" else 6):
        assert viewer.get(reverse(f"admin:keyjobs_invocation_{name}"), {"minutes": minutes}).status_code == 200


@pytest.mark.parametrize("name", ["tasks", "keys"])
def test_the_statistics_pages_refresh_themselves_while_work_waits_and_stay_still_when_none_does(
        viewer: Client, name: str) -> None:
    url = reverse(f"admin:keyjobs_invocation_{name}")
    assert 'id="kj-live" data-active="false"' in viewer.get(url).content.decode()
    InvocationFactory(task_name="tests.jobs.keyed", running_key=ACME, status=Status.REGISTERED)
    page = viewer.get(url).content.decode()
    assert 'id="kj-live" data-active="true"' in page and "keyjobs/refresh.js" in page
