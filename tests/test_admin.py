"""The admin of invocations and runners: lists, detail pages, and the only ways to change a status."""

import json
import re
from datetime import UTC, datetime, timedelta

import pytest
from django.contrib.auth.models import Permission
from django.contrib.contenttypes.models import ContentType
from django.contrib.messages import get_messages
from django.db import connection
from django.test import Client, override_settings
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from keyjobs.admin import CappedPaginator, InvocationAdmin
from keyjobs.models import Event, Invocation, Runner
from keyjobs.status import Status
from tests import jobs
from tests.factories import EventFactory, InvocationFactory, RunnerFactory, give_run, staff

pytestmark = pytest.mark.django_db

ACME = '{"account_id":"acme"}'
XSS = '<script>alert("x")</script>'
CHANGELIST = "admin:keyjobs_invocation_changelist"
RUNNERS = "admin:keyjobs_runner_changelist"


def change_url(invocation: Invocation) -> str:
    return reverse("admin:keyjobs_invocation_change", args=[invocation.pk])


@pytest.fixture
def viewer(django_user_model: type) -> Client:
    """Staff who may look at invocations and runners, and change nothing."""
    return staff(django_user_model, "viewer", "view_invocation", "view_runner")


@pytest.fixture
def operator(django_user_model: type) -> Client:
    """Staff who may also retry and cancel invocations."""
    return staff(django_user_model, "operator", "view_invocation", "change_invocation", "view_runner")


def act(client: Client, action: str, *invocations: Invocation) -> object:
    return client.post(reverse(CHANGELIST), {"action": action, "_selected_action": [inv.pk for inv in invocations]},
                       follow=True)


def messages_of(response: object) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]  # type: ignore[attr-defined]


# -- who may see what -------------------------------------------------------------------


@pytest.mark.parametrize("name", [CHANGELIST, RUNNERS])
def test_anonymous_users_are_sent_to_the_login_page(client: Client, name: str) -> None:
    response = client.get(reverse(name))
    assert response.status_code == 302 and response["Location"].startswith(reverse("admin:login"))


def test_users_who_are_not_staff_are_refused(client: Client, django_user_model: type) -> None:
    user = django_user_model.objects.create_user("outsider", password="x")
    user.user_permissions.add(*Permission.objects.filter(codename__in=["view_invocation", "change_invocation"]))
    client.force_login(user)
    invocation = InvocationFactory(status=Status.FAILED)
    for url in [reverse(CHANGELIST), change_url(invocation), reverse(RUNNERS)]:
        assert client.get(url).status_code == 302
    client.post(reverse("admin:keyjobs_invocation_retry", args=[invocation.pk]))
    assert Invocation.objects.get().status == Status.FAILED


def test_staff_without_the_view_permission_are_refused(django_user_model: type) -> None:
    client = staff(django_user_model, "staff")
    assert client.get(reverse(CHANGELIST)).status_code == 403
    assert client.get(change_url(InvocationFactory())).status_code == 403


# -- the list -------------------------------------------------------------------------------


def test_the_list_shows_id_task_key_status_runner_times_and_duration(viewer: Client) -> None:
    runner, now = RunnerFactory(host="box", pid=42), timezone.now()
    invocation = give_run(InvocationFactory(task_name="tests.jobs.keyed", running_key=ACME), runner=runner,
                          thread=3, start=now - timedelta(seconds=2.5), end=now)

    page = viewer.get(reverse(CHANGELIST)).content.decode()

    for text in [f">{invocation.pk}<", 'title="tests.jobs.keyed">keyed<', ">acme</a>", ">Success</span>",
                 "box:42 · thread 3", "2.500 s"]:
        assert text in page, text


def test_the_list_shows_times_to_the_millisecond_and_the_queued_ran_and_total_durations(viewer: Client) -> None:
    created = datetime(2030, 1, 1, 5, 8, 3, 412_000, tzinfo=UTC)
    InvocationFactory(status=Status.SUCCESS, created_at=created, started_at=created + timedelta(milliseconds=250),
                      finished_at=created + timedelta(seconds=1.5))

    response = viewer.get(reverse(CHANGELIST))
    page = response.content.decode()

    headers = [re.sub(r"<[^>]+>", "", header).strip().casefold() for header in re.findall(r"<th[^>]*>(.*?)</th>",
                                                                                 page.split("<thead>")[1].split("</thead>")[0], re.S)]
    assert ["queued", "ran", "total", "error"] == [header for header in headers if header in
                                                   ("queued", "ran", "total", "error")]
    for text in ["2030-01-01 05:08:03.412", "<td class=\"field-queued\">250 ms</td>",
                 "<td class=\"field-ran\">1.250 s</td>", "<td class=\"field-total\">1.500 s</td>"]:
        assert text in page, text


def test_the_list_shows_a_keyless_calls_arguments_and_its_error(viewer: Client) -> None:
    InvocationFactory(task_name="tests.jobs.boom", args=["acme", 3], kwargs={"op": "x"}, status=Status.FAILED,
                      error="ValueError: no such account")
    page = viewer.get(reverse(CHANGELIST)).content.decode()
    assert '">&quot;acme&quot;, 3, op=&quot;x&quot;</code>' in page
    assert "ValueError: no such account</span>" in page


@pytest.mark.parametrize("status", Status.values)
def test_every_status_is_shown_as_a_coloured_badge(viewer: Client, status: str) -> None:
    InvocationFactory(status=status)
    page = viewer.get(reverse(CHANGELIST)).content.decode()
    assert 'class="kj-badge" style="background:#' in page
    assert f">{Status(status).label}</span>" in page


def test_the_list_links_the_dashboard_and_the_timeline(viewer: Client) -> None:
    page = viewer.get(reverse(CHANGELIST)).content.decode()
    assert reverse("admin:keyjobs_invocation_timeline") in page
    assert reverse("admin:keyjobs_invocation_dashboard") in page


@pytest.mark.parametrize("query, expected", [
    ({"status": "FAILED"}, "failed"),
    ({"task": "tests.jobs.boom"}, "boom"),
    ({"queue": "slow"}, "slow queue"),
    # As the date filter writes its links: aware times.
    ({"created_at__gte": "2001-01-01 00:00:00+00:00", "created_at__lt": "2001-01-02 00:00:00+00:00"}, "old"),
])
def test_the_list_filters_by_status_task_queue_and_date(viewer: Client, query: dict[str, str],
                                                        expected: str) -> None:
    made = {
        "failed": InvocationFactory(status=Status.FAILED),
        "boom": InvocationFactory(task_name="tests.jobs.boom"),
        "slow queue": InvocationFactory(queue="slow"),
        "old": InvocationFactory(),
    }
    Invocation.objects.filter(pk=made["old"].pk).update(created_at=datetime(2001, 1, 1, 12, tzinfo=UTC))

    shown = viewer.get(reverse(CHANGELIST), query).context["cl"].result_list

    assert list(shown) == [made[expected]]


def test_the_list_filters_by_runner(viewer: Client) -> None:
    mine, other = RunnerFactory(), RunnerFactory()
    ran_here = InvocationFactory(runner=mine)
    InvocationFactory(runner=other)
    assert list(viewer.get(reverse(CHANGELIST), {"runner": mine.pk}).context["cl"].result_list) == [ran_here]


def test_the_task_filter_offers_registered_tasks_and_those_of_recent_invocations(viewer: Client) -> None:
    InvocationFactory(task_name="somewhere.else.task")
    response = viewer.get(reverse(CHANGELIST))
    [task_filter] = [spec for spec in response.context["cl"].filter_specs if spec.title == "task"]
    offered = {value for value, _ in task_filter.lookup_choices}
    assert {"somewhere.else.task", jobs.keyed.name} <= offered


@pytest.mark.parametrize("term", ["acme", "#ID", "ID", "needle"])
def test_the_list_searches_keys_ids_and_argument_text(viewer: Client, term: str) -> None:
    found = InvocationFactory(running_key=ACME, args=["a needle in args"])
    InvocationFactory(running_key='{"account_id":"globex"}', args=["hay"])
    term = term.replace("ID", str(found.pk))
    assert list(viewer.get(reverse(CHANGELIST), {"q": term}).context["cl"].result_list) == [found]


def test_keyword_arguments_are_searched_too(viewer: Client) -> None:
    found = InvocationFactory(kwargs={"op": "list_invoices"})
    InvocationFactory(kwargs={"op": "refresh"})
    assert list(viewer.get(reverse(CHANGELIST), {"q": "invoices"}).context["cl"].result_list) == [found]


def test_arguments_with_html_are_shown_as_text_in_the_list(viewer: Client) -> None:
    InvocationFactory(running_key=json.dumps({"account_id": XSS}), args=[XSS])
    page = viewer.get(reverse(CHANGELIST)).content.decode()
    assert XSS not in page and "&lt;script&gt;alert(" in page


@pytest.mark.parametrize("rows", [5, 60])
def test_the_list_takes_the_same_queries_however_many_invocations(viewer: Client, django_assert_num_queries,
                                                                  rows: int) -> None:
    runners = [RunnerFactory() for _ in range(5)]
    for number in range(rows):
        InvocationFactory(runner=runners[number % 5], runner_thread=number % 3, running_key=ACME,
                          status=Status.SUCCESS)
    # Session, user, its permissions and its groups'; recent tasks and queues; recent runners; count; the page.
    with django_assert_num_queries(8):
        assert viewer.get(reverse(CHANGELIST)).status_code == 200


def test_a_filtered_list_counts_only_what_matches_not_the_whole_table(viewer: Client) -> None:
    InvocationFactory.create_batch(3, status=Status.SUCCESS)
    InvocationFactory(status=Status.FAILED)

    with CaptureQueriesContext(connection) as queries:
        response = viewer.get(reverse(CHANGELIST), {"status": "FAILED"})

    counts = [query["sql"] for query in queries.captured_queries if "COUNT(" in query["sql"].upper()]
    assert len(counts) == 1, counts
    assert response.context["cl"].result_count == 1


def test_a_list_longer_than_the_cap_counts_no_further_and_says_more_than(operator: Client, monkeypatch) -> None:
    monkeypatch.setattr(CappedPaginator, "cap", 4)
    monkeypatch.setattr(InvocationAdmin, "list_per_page", 2)
    InvocationFactory.create_batch(7, status=Status.FAILED)

    with CaptureQueriesContext(connection) as queries:
        response = operator.get(reverse(CHANGELIST), {"status": "FAILED", "p": "2"})

    [count] = [query["sql"] for query in queries.captured_queries if "COUNT(" in query["sql"].upper()]
    assert "LIMIT 5" in count and "ORDER BY" not in count, count
    assert response.context["cl"].paginator.num_pages == 2  # of the first 4
    assert len(response.context["cl"].result_list) == 2
    page = response.content.decode()
    assert "more than 4 invocations" in page
    assert "Select all invocations that match (more than 4)" in page
    assert "7 invocations" not in page and "5 invocations" not in page


def test_a_list_within_the_cap_says_its_count_as_the_admin_does(viewer: Client, monkeypatch) -> None:
    monkeypatch.setattr(CappedPaginator, "cap", 4)
    InvocationFactory.create_batch(3, status=Status.FAILED)
    page = viewer.get(reverse(CHANGELIST)).content.decode()
    assert "3 invocations" in page and "more than" not in page


@pytest.mark.sqlite
def test_the_list_is_read_in_primary_key_order_through_its_index() -> None:
    queryset = Invocation.objects.select_related("runner").order_by("-pk")[:50]
    assert "SCAN keyjobs_invocation" in queryset.explain() and "USE TEMP B-TREE" not in queryset.explain()


@pytest.mark.postgres
def test_the_list_is_read_in_primary_key_order_through_its_index_on_postgresql() -> None:
    # Enough rows, and fresh statistics, for the planner to choose as it would on a real table.
    runner = RunnerFactory()
    Invocation.objects.bulk_create(Invocation(task_name="tests.jobs.add", queue="default", runner=runner)
                                   for _ in range(5000))
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE keyjobs_invocation, keyjobs_runner")
    explained = Invocation.objects.select_related("runner").order_by("-pk")[:50].explain()
    assert "Index Scan Backward using keyjobs_invocation_pkey" in explained, explained
    assert "Sort" not in explained, explained


# -- the detail page --------------------------------------------------------------------------


def test_the_detail_page_shows_arguments_result_and_history(viewer: Client) -> None:
    runner, now = RunnerFactory(), timezone.now()
    invocation = give_run(InvocationFactory(args=["acme"], kwargs={"op": "fetch"}, return_value={"rows": 3}),
                          runner=runner, thread=1, start=now - timedelta(seconds=1), end=now)

    page = viewer.get(change_url(invocation)).content.decode()

    for text in ["&quot;acme&quot;", "&quot;op&quot;: &quot;fetch&quot;", "&quot;rows&quot;: 3", "History",
                 "Registered", "Pending", "Running", "Success"]:
        assert text in page, text


def test_the_detail_page_shows_times_to_the_millisecond_and_history_in_words(viewer: Client) -> None:
    runner, start = RunnerFactory(), datetime(2030, 1, 1, 5, 8, 3, 412_000, tzinfo=UTC)
    invocation = give_run(InvocationFactory(task_name="tests.jobs.keyed", args=["acme", 3]), runner=runner, thread=1,
                          start=start, end=start + timedelta(milliseconds=420))
    EventFactory(invocation=invocation, kind=Event.Kind.DEBOUNCED, from_status=Status.SUCCESS,
                 to_status=Status.SUCCESS, note="merged")

    page = viewer.get(change_url(invocation)).content.decode()
    history = page.split('id="events-group"')[1]

    assert f"#{invocation.pk} keyed(&quot;acme&quot;, 3)" in page
    assert "2030-01-01 05:08:03.412" in page and "2030-01-01 05:08:03.832" in page
    for text in ["Registered → Pending", "Pending → Running", "Running → Success", "Merged by debounce"]:
        assert text in history, text
    assert "REGISTERED" not in history and "-&gt;" not in history


def test_the_detail_page_shows_every_attempts_error_in_order(viewer: Client) -> None:
    runner, now = RunnerFactory(), timezone.now()
    invocation = InvocationFactory(task_name="tests.jobs.boom")
    for number in range(2):
        give_run(invocation, runner=runner, thread=0, start=now - timedelta(seconds=10 - 3 * number),
                 end=now - timedelta(seconds=9 - 3 * number), status=Status.RETRY)
        EventFactory(invocation=invocation, kind=Event.Kind.ERROR, from_status=Status.RETRY, to_status=Status.RETRY,
                     note=f"builtins.ValueError\nTraceback (most recent call last):\nValueError: attempt {number + 1}")
        EventFactory(invocation=invocation, from_status=Status.RETRY, to_status=Status.REGISTERED)
        invocation.status = Status.REGISTERED
    give_run(invocation, runner=runner, thread=0, start=now - timedelta(seconds=2), end=now, status=Status.FAILED)
    Invocation.objects.filter(pk=invocation.pk).update(error="KeyError: 'last'", error_type="builtins.KeyError",
                                                       traceback="Traceback\nKeyError: 'last'")

    attempts = viewer.get(change_url(invocation)).content.decode().split("kj-attempts")[1].split("</table>")[0]

    messages = re.findall(r'<span class="kj-error">(.*?)</span>', attempts)
    assert messages == ["ValueError: attempt 1", "ValueError: attempt 2", "KeyError: &#x27;last&#x27;"]


def test_the_detail_page_shows_errors_and_tracebacks_as_readable_text(viewer: Client) -> None:
    invocation = InvocationFactory(status=Status.FAILED, args=[XSS], error=f"ValueError: {XSS}",
                                   traceback=f'Traceback (most recent call last):\n  File "x.py"\nValueError: {XSS}')

    page = viewer.get(change_url(invocation)).content.decode()

    assert XSS not in page
    assert '<pre class="kj-pre kj-error">ValueError: &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;</pre>' in page
    assert 'Traceback (most recent call last):\n  File &quot;x.py&quot;' in page


def test_the_detail_page_links_the_view_of_its_key(viewer: Client) -> None:
    invocation = InvocationFactory(task_name="tests.jobs.once_per_key", registration_key=ACME)
    page = viewer.get(change_url(invocation)).content.decode()
    assert (reverse("admin:keyjobs_invocation_key") + "?task=tests.jobs.once_per_key&amp;key=%7B%22account_id%22"
            "%3A%22acme%22%7D") in page


def test_the_detail_page_takes_the_same_queries_however_long_the_history(viewer: Client,
                                                                        django_assert_num_queries) -> None:
    runner, now = RunnerFactory(), timezone.now()
    invocation = InvocationFactory()
    for number in range(4):
        give_run(invocation, runner=runner, thread=number, start=now - timedelta(seconds=10 - number),
                 end=now - timedelta(seconds=9 - number), status=Status.RETRY)
        EventFactory(invocation=invocation, from_status=Status.RETRY, to_status=Status.REGISTERED, runner=runner)
        invocation.status = Status.REGISTERED
    # Session, user, its permissions and its groups'; the invocation with its runner; its history with runners;
    # its history once more, for its attempts and waits; what it logged; what it triggered; what its run delayed
    # and who waits for it.
    with django_assert_num_queries(10):
        assert viewer.get(change_url(invocation)).status_code == 200


def test_the_status_cannot_be_edited_by_hand(operator: Client) -> None:
    invocation = InvocationFactory(status=Status.FAILED)

    page = operator.get(change_url(invocation)).content.decode()
    response = operator.post(change_url(invocation), {"status": Status.SUCCESS})

    assert 'name="status"' not in page and 'name="_save"' not in page
    assert response.status_code == 403
    assert Invocation.objects.get().status == Status.FAILED


def test_invocations_cannot_be_added_or_deleted(operator: Client) -> None:
    invocation = InvocationFactory()
    assert operator.get(reverse("admin:keyjobs_invocation_add")).status_code == 403
    assert operator.post(reverse("admin:keyjobs_invocation_delete", args=[invocation.pk])).status_code == 403
    assert Invocation.objects.exists()


# -- retry and cancel ----------------------------------------------------------------------------


def test_retry_registers_failed_and_dropped_invocations_again_and_leaves_the_rest(operator: Client) -> None:
    failed = InvocationFactory(status=Status.FAILED, error="boom")
    dropped = InvocationFactory(status=Status.CONCURRENCY_CONTROLLED_FINAL)
    done = InvocationFactory(status=Status.SUCCESS)

    response = act(operator, "retry", failed, dropped, done)

    assert {inv.pk: inv.status for inv in Invocation.objects.all()} == {
        failed.pk: Status.REGISTERED, dropped.pk: Status.REGISTERED, done.pk: Status.SUCCESS,
    }
    assert Invocation.objects.get(pk=failed.pk).error == ""
    assert set(Event.objects.values_list("invocation_id", "note")) == {
        (failed.pk, "retried by operator"), (dropped.pk, "retried by operator"),
    }
    assert any("1 invocation(s) left alone" in message for message in messages_of(response))


def test_retry_leaves_alone_an_invocation_whose_registration_key_has_a_call_waiting_and_retries_the_others(
    operator: Client,
) -> None:
    failed = InvocationFactory(task_name="tests.jobs.once_per_key", registration_key=ACME, status=Status.FAILED)
    waiting = InvocationFactory(task_name="tests.jobs.once_per_key", registration_key=ACME, status=Status.REGISTERED)
    other = InvocationFactory(status=Status.FAILED, error="boom")

    response = act(operator, "retry", failed, other)

    assert response.status_code == 200
    assert {inv.pk: inv.status for inv in Invocation.objects.all()} == {
        failed.pk: Status.FAILED, waiting.pk: Status.REGISTERED, other.pk: Status.REGISTERED}
    assert any(f"left alone: a call with the same registration key is already waiting, and runs instead: "
               f"#{failed.pk}" in message for message in messages_of(response)), messages_of(response)
    assert not any("not failed or dropped" in message for message in messages_of(response))


def test_the_retry_button_says_why_when_a_call_of_the_registration_key_is_waiting(operator: Client) -> None:
    failed = InvocationFactory(task_name="tests.jobs.once_per_key", registration_key=ACME, status=Status.FAILED)
    InvocationFactory(task_name="tests.jobs.once_per_key", registration_key=ACME, status=Status.RETRY)

    response = operator.post(reverse("admin:keyjobs_invocation_retry", args=[failed.pk]), follow=True)

    assert response.status_code == 200 and Invocation.objects.get(pk=failed.pk).status == Status.FAILED
    assert any("a call with the same registration key is already waiting" in message
               for message in messages_of(response))


def test_cancel_ends_waiting_invocations_cancelled_and_asks_running_ones_to_stop(operator: Client) -> None:
    waiting = InvocationFactory(status=Status.REGISTERED)
    parked = InvocationFactory(status=Status.REROUTED)
    running = give_run(InvocationFactory(), runner=RunnerFactory(), thread=0, start=timezone.now())
    done = InvocationFactory(status=Status.SUCCESS)

    response = act(operator, "cancel", waiting, parked, running, done)

    assert {inv.pk: (inv.status, inv.cancel_requested) for inv in Invocation.objects.all()} == {
        waiting.pk: (Status.CANCELLED, False), parked.pk: (Status.CANCELLED, False),
        running.pk: (Status.RUNNING, True), done.pk: (Status.SUCCESS, False),
    }
    assert Invocation.objects.get(pk=waiting.pk).error == "Cancelled by operator"
    assert Event.objects.get(invocation=running, kind=Event.Kind.CANCEL_REQUESTED).note == (
        "cancelled by operator: asked to stop")
    assert any("1 invocation(s) left alone" in message for message in messages_of(response))


def test_cancelling_the_head_of_a_key_wakes_the_invocation_parked_behind_it(operator: Client) -> None:
    head = InvocationFactory(task_name="tests.jobs.keyed", running_key=ACME, status=Status.REGISTERED)
    parked = InvocationFactory(task_name="tests.jobs.keyed", running_key=ACME, status=Status.REROUTED)

    act(operator, "cancel", head)

    assert Invocation.objects.get(pk=parked.pk).status == Status.REGISTERED


def test_actions_need_the_change_permission(viewer: Client) -> None:
    failed = InvocationFactory(status=Status.FAILED)

    page = viewer.get(reverse(CHANGELIST)).content.decode()
    act(viewer, "retry", failed)

    assert 'value="retry"' not in page
    assert Invocation.objects.get().status == Status.FAILED


def test_actions_need_a_csrf_token(django_user_model: type) -> None:
    user = django_user_model.objects.create_user("operator", password="x", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=["view_invocation", "change_invocation"]))
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    failed = InvocationFactory(status=Status.FAILED)

    response = client.post(reverse(CHANGELIST), {"action": "retry", "_selected_action": [failed.pk]})
    one = client.post(reverse("admin:keyjobs_invocation_retry", args=[failed.pk]))

    assert (response.status_code, one.status_code) == (403, 403)
    assert Invocation.objects.get().status == Status.FAILED


def test_the_detail_page_offers_retry_for_a_failed_invocation(operator: Client) -> None:
    failed = InvocationFactory(status=Status.FAILED)
    page = operator.get(change_url(failed)).content.decode()
    assert reverse("admin:keyjobs_invocation_retry", args=[failed.pk]) in page
    assert reverse("admin:keyjobs_invocation_cancel", args=[failed.pk]) not in page


def test_the_detail_page_offers_no_action_to_staff_who_may_only_look(viewer: Client) -> None:
    failed = InvocationFactory(status=Status.FAILED)
    page = viewer.get(change_url(failed)).content.decode()
    assert reverse("admin:keyjobs_invocation_retry", args=[failed.pk]) not in page


def test_retrying_one_invocation_from_its_page_needs_post(operator: Client) -> None:
    failed = InvocationFactory(status=Status.FAILED)
    url = reverse("admin:keyjobs_invocation_retry", args=[failed.pk])

    assert operator.get(url).status_code == 405
    response = operator.post(url)

    assert response.status_code == 302 and response["Location"] == change_url(failed)
    assert Invocation.objects.get().status == Status.REGISTERED


def test_cancelling_one_invocation_from_its_page(operator: Client) -> None:
    waiting = InvocationFactory(status=Status.REGISTERED)
    operator.post(reverse("admin:keyjobs_invocation_cancel", args=[waiting.pk]))
    assert Invocation.objects.get().status == Status.CANCELLED


def test_retrying_one_invocation_needs_the_change_permission(viewer: Client) -> None:
    failed = InvocationFactory(status=Status.FAILED)
    assert viewer.post(reverse("admin:keyjobs_invocation_retry", args=[failed.pk])).status_code == 403
    assert Invocation.objects.get().status == Status.FAILED


def test_the_only_actions_offered_even_to_a_superuser_are_retry_and_cancel(admin_client: Client) -> None:
    invocation = InvocationFactory(status=Status.SUCCESS)

    page = admin_client.get(reverse(CHANGELIST)).content.decode()
    offered = re.findall(r'<option value="(\w+)"', page.split('name="action"')[1].split("</select>")[0])
    act(admin_client, "delete_selected", invocation)

    assert offered == ["retry", "cancel"]
    assert Invocation.objects.filter(pk=invocation.pk).exists()


# -- runners ------------------------------------------------------------------------------------


def test_runners_show_whether_they_are_alive_stopped_gone_or_lost(viewer: Client) -> None:
    alive = RunnerFactory(host="alive-host")
    RunnerFactory(host="stopped-host", stopped_at=timezone.now())
    gone = RunnerFactory(host="gone-host")
    Runner.objects.filter(pk=gone.pk).update(heartbeat_at=timezone.now() - timedelta(hours=1))
    RunnerFactory(host="lost-host", stopped_at=timezone.now(), lost=True)

    response = viewer.get(reverse(RUNNERS))
    rows = {runner.host: runner for runner in response.context["cl"].result_list}
    page = response.content.decode()

    assert set(rows) == {"alive-host", "stopped-host", "gone-host", "lost-host"}
    for state in [">alive</span>", ">stopped</span>", ">gone</span> no heartbeat for 1\xa0hour", ">lost</span>"]:
        assert state in page, state
    assert list(viewer.get(reverse(RUNNERS), {"state": "alive"}).context["cl"].result_list) == [alive]


@pytest.mark.parametrize("state", ["alive", "gone", "stopped", "lost"])
def test_the_runner_list_filters_by_each_state_alone(viewer: Client, state: str) -> None:
    RunnerFactory(host="alive")
    RunnerFactory(host="stopped", stopped_at=timezone.now())
    RunnerFactory(host="lost", stopped_at=timezone.now(), lost=True)
    gone = RunnerFactory(host="gone")
    Runner.objects.filter(pk=gone.pk).update(heartbeat_at=timezone.now() - timedelta(hours=1))

    shown = viewer.get(reverse(RUNNERS), {"state": state}).context["cl"].result_list

    assert [runner.host for runner in shown] == [state]


def test_a_runner_is_gone_once_silent_for_longer_than_the_lease(viewer: Client, settings) -> None:
    runner = RunnerFactory()
    Runner.objects.filter(pk=runner.pk).update(heartbeat_at=timezone.now() - timedelta(minutes=10))

    settings.KEYJOBS_LEASE = 15 * 60
    still = viewer.get(reverse(RUNNERS), {"state": "alive"}).context["cl"].result_list
    settings.KEYJOBS_LEASE = 5 * 60
    now_gone = viewer.get(reverse(RUNNERS), {"state": "gone"}).context["cl"].result_list

    assert list(still) == [runner] and list(now_gone) == [runner]


def test_a_runner_that_stopped_by_itself_says_why_in_the_list_and_on_its_page(viewer: Client) -> None:
    runner = RunnerFactory(stopped_at=timezone.now(), stop_reason=f"thread 1 could not go on: {XSS}")

    listed = viewer.get(reverse(RUNNERS)).content.decode()
    page = viewer.get(reverse("admin:keyjobs_runner_change", args=[runner.pk])).content.decode()

    for html in [listed, page]:
        assert "thread 1 could not go on: &lt;script&gt;" in html and XSS not in html
    assert "Stop reason" in page


def test_a_runner_with_no_stop_reason_shows_none(viewer: Client) -> None:
    runner = RunnerFactory(stopped_at=timezone.now())
    page = viewer.get(reverse("admin:keyjobs_runner_change", args=[runner.pk])).content.decode()
    assert ">stopped</span>" in page and "Stop reason" not in page


def test_a_supervisor_and_its_worker_processes_link_to_each_other(viewer: Client) -> None:
    supervisor = RunnerFactory(threads=0)
    child = RunnerFactory(supervisor=supervisor)

    on_supervisor = viewer.get(reverse("admin:keyjobs_runner_change", args=[supervisor.pk])).content.decode()
    on_child = viewer.get(reverse("admin:keyjobs_runner_change", args=[child.pk])).content.decode()

    assert reverse("admin:keyjobs_runner_change", args=[child.pk]) in on_supervisor
    assert "Worker processes" in on_supervisor and "Supervisor" not in on_supervisor
    assert reverse("admin:keyjobs_runner_change", args=[supervisor.pk]) in on_child
    assert "Worker processes" not in on_child


def test_runners_show_what_they_are_running_now(viewer: Client) -> None:
    runner = RunnerFactory()
    running = give_run(InvocationFactory(task_name="tests.jobs.keyed", running_key=ACME), runner=runner, thread=2,
                       start=timezone.now())
    finished = give_run(InvocationFactory(), runner=runner, thread=1, start=timezone.now() - timedelta(seconds=5),
                        end=timezone.now())

    page = viewer.get(reverse(RUNNERS)).content.decode()

    assert f"#{running.pk} keyed(1, 2) · acme</a>" in page and "thread 2" in page
    assert change_url(finished) not in page


def test_the_runner_list_takes_the_same_queries_however_many_runners(viewer: Client,
                                                                    django_assert_num_queries) -> None:
    for number in range(6):
        runner = RunnerFactory(host=f"host-{number % 2}")
        give_run(InvocationFactory(), runner=runner, thread=0, start=timezone.now())
    # Session, user, its permissions and its groups'; hosts for the filter; count; the page; what each runs.
    with django_assert_num_queries(8):
        assert viewer.get(reverse(RUNNERS)).status_code == 200


def test_runners_cannot_be_added_changed_or_deleted(django_user_model: type) -> None:
    client = staff(django_user_model, "boss", "view_runner", "add_runner", "change_runner", "delete_runner")
    runner = RunnerFactory()
    assert client.get(reverse("admin:keyjobs_runner_add")).status_code == 403
    assert client.post(reverse("admin:keyjobs_runner_change", args=[runner.pk]), {"pid": 1}).status_code == 403
    assert client.post(reverse("admin:keyjobs_runner_delete", args=[runner.pk])).status_code == 403


def test_the_detail_page_links_parent_and_child_both_ways(viewer: Client) -> None:
    parent = InvocationFactory(status=Status.PAUSED)
    child = InvocationFactory(parent=parent)
    Invocation.objects.filter(pk=parent.pk).update(waiting_on=child)

    parent_page = viewer.get(change_url(parent)).content.decode()
    child_page = viewer.get(change_url(child)).content.decode()

    # The parent names the child it delayed and waits for; the child names its parent and who waits for it.
    assert parent_page.count(f'href="{change_url(child)}"') == 2
    assert child_page.count(f'href="{change_url(parent)}"') == 2


def test_the_detail_page_shows_the_priority_raised_by_those_waiting_on_it(viewer: Client) -> None:
    child = InvocationFactory(priority=2)
    InvocationFactory(status=Status.PAUSED, waiting_on=child)
    InvocationFactory(status=Status.PAUSED, waiting_on=child)
    alone = InvocationFactory(priority=2)

    page = viewer.get(change_url(child)).content.decode()

    assert "4 <small>(its own 2, +2 for the 2 runs waiting on it)</small>" in page
    assert "waiting on it" not in viewer.get(change_url(alone)).content.decode()


# -- waits named ----------------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_parked_invocations_page_names_whom_it_waited_behind_and_who_freed_its_key(django_user_model) -> None:
    from keyjobs.worker import Worker

    viewer = staff(django_user_model, "viewer", "view_invocation")
    first = jobs.keyed.delay("acme", "first", hold=0.4)
    second = jobs.keyed.delay("acme", "second")
    Worker(threads=2, burst=True, poll_interval=0.01).run()
    assert Event.objects.filter(invocation=second, to_status=Status.REROUTED).exists(), "the second one parked"

    page = viewer.get(change_url(second)).content.decode()

    waited = page.split('class="kj-waited"')[1].split("</table>")[0]
    assert "key busy" in waited
    first_link = f'<a href="{change_url(first)}">#{first.pk}</a>'
    row = waited.split("<tr><td>key busy</td>")[1].split("</tr>")[0]
    behind, freed_by = row.removesuffix("</td>").split("</td><td>")[-2:]
    assert behind == first_link and freed_by.startswith(first_link), (behind, freed_by)
    history = page.split('id="events-group"')[1]
    assert f"behind {first_link}" in history
    assert f"freed by {first_link}" in history or f"handed over by {first_link}" in history


@pytest.mark.django_db(transaction=True)
def test_a_paused_run_names_the_child_it_waited_for(django_user_model) -> None:
    viewer = staff(django_user_model, "viewer", "view_invocation")
    parent, now = InvocationFactory(status=Status.SUCCESS), timezone.now()
    child = InvocationFactory(status=Status.SUCCESS)
    for came, went, seconds, note in [("PENDING", "RUNNING", 3, ""), ("RUNNING", "PAUSED", 2.5, f"waits for #{child.pk}"),
                                      ("PAUSED", "RUNNING", 1, f"its wait for #{child.pk} ended"),
                                      ("RUNNING", "SUCCESS", 0.5, "")]:
        EventFactory(invocation=parent, from_status=came, to_status=went, at=now - timedelta(seconds=seconds),
                     note=note)

    waited = viewer.get(change_url(parent)).content.decode().split('class="kj-waited"')[1].split("</table>")[0]

    assert "a child 1.500 s" in waited
    assert f'<a href="{change_url(child)}">#{child.pk}</a>' in waited


def test_the_detail_page_of_a_parked_invocation_takes_a_bounded_number_of_queries(
        viewer: Client, django_assert_num_queries) -> None:
    owner, parked = (InvocationFactory(task_name="tests.jobs.keyed", running_key=ACME) for _ in range(2))
    EventFactory(invocation=parked, from_status=Status.REGISTERED, to_status=Status.REROUTED)
    EventFactory(invocation=owner, from_status=Status.RUNNING, to_status=Status.SUCCESS)
    EventFactory(invocation=parked, from_status=Status.REROUTED, to_status=Status.REGISTERED)
    ContentType.objects.get_for_model(Invocation)  # cached by any request before: not this page's cost
    # As test_the_detail_page_takes_the_same_queries_however_long_the_history, and two for its parked stretch:
    # whom it waited behind, who freed its key.
    with django_assert_num_queries(12):
        assert viewer.get(change_url(parked)).status_code == 200


# -- large values, stored out of line ---------------------------------------------------------------------------------


@override_settings(KEYJOBS_INLINE_VALUE_BYTES=1000)
def test_the_list_shows_a_large_arguments_size_and_first_characters_and_never_reads_its_value(viewer: Client) -> None:
    for number in range(3):
        jobs.keyed.delay("acme", f"{number}" + "o" * 5000)
    with CaptureQueriesContext(connection) as queries:
        page = viewer.get(reverse(CHANGELIST)).content.decode()
    assert all(f"&quot;acme&quot;, &lt;5.0 kB &quot;{number}oooooooo" in page for number in range(3))
    assert not [query["sql"] for query in queries.captured_queries if "keyjobs_value" in query["sql"]]


@override_settings(KEYJOBS_INLINE_VALUE_BYTES=1000)
def test_the_detail_page_shows_large_values_size_and_head_and_links_them_whole(viewer: Client) -> None:
    invocation = jobs.keyed.delay("acme", "p" * 5000)
    stored = Invocation.objects.get(pk=invocation.pk)
    result = InvocationFactory(status=Status.SUCCESS)
    Invocation.objects.filter(pk=result.pk).update(result_value=stored.arguments_value_id)
    page = viewer.get(change_url(invocation)).content.decode()
    link = reverse("admin:keyjobs_invocation_value", args=[stored.arguments_value_id])
    assert "<code>args[1]</code>: 5.0 kB, first characters <code>&quot;ppppp" in page and link in page
    whole = viewer.get(link)
    assert whole["Content-Type"].startswith("application/json")
    assert json.loads(whole.content) == {"args": {"1": "p" * 5000}, "kwargs": {}}
    page = viewer.get(change_url(result)).content.decode()
    assert "5.0 kB, first characters <code>{&quot;args&quot;:{&quot;1&quot;:&quot;pppp" in page and link in page


def test_a_large_value_is_shown_only_to_those_who_may_view_invocations(client: Client, django_user_model: type) -> None:
    nobody = staff(django_user_model, "nobody")
    url = reverse("admin:keyjobs_invocation_value", args=["0" * 64])
    assert nobody.get(url).status_code == 403
    assert client.get(url).status_code == 302  # to the login page
