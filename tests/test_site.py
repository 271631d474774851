"""The demo site's accounts: its views call ``delay()`` in the request's transaction, its signal asks for refreshes.

Which test covers which button of the accounts page:

- "fetch profile", "list invoices", "sync all four", "sync all four, no key", "refresh": what each enqueues,
  ``test_each_button_enqueues_its_calls_in_the_request``; "refresh" pressed twice merges,
  ``test_refresh_pressed_while_one_waits_merges_into_it``; "sync all four" serialised on a real worker, in a
  browser, ``test_site_browser.test_sync_all_four_pressed_twice_runs_eight_calls_one_at_a_time``;
- "save" (the plan form): ``test_saving_the_plan_asks_for_a_refresh``; saves in the admin,
  ``test_saving_an_account_in_the_admin_asks_for_a_refresh`` and, on a real worker,
  ``test_site_browser.test_three_saves_in_the_admin_make_one_refresh``.
"""

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.messages import get_messages
from django.contrib.messages.api import MessageFailure
from django.db import transaction
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from demo_project import tasks
from demo_project.accounts.actions import ACTIONS
from demo_project.accounts.models import Account
from demo_project.provider import Provider
from demo_project.scenarios import OPS
from keyjobs import Status
from keyjobs.models import Event, Invocation
from keyjobs.signals import invocation_finished

pytestmark = pytest.mark.django_db

LIST = "accounts:list"


def act_url(name: str = "acme") -> str:
    return reverse("accounts:act", args=[name])


def enqueued() -> list[tuple[str, dict[str, Any]]]:
    """Every invocation, as (task, keyword arguments), in the order they were created."""
    return [(task_name, kwargs) for task_name, kwargs in Invocation.objects.order_by("pk").values_list("task_name", "kwargs")]


def messages_of(response: Any) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


@pytest.fixture(autouse=True)
def provider(settings: Any) -> Iterator[Provider]:
    """A provider of the test's own, so that the page never reads another one's counters."""
    with Provider(hold=0.05, quiet=True) as running:
        settings.PROVIDER_URL = running.url
        yield running


@pytest.fixture
def acme() -> Account:
    """The seeded acme (created again if a transactional test flushed the seeds), asking for no refresh."""
    Account.objects.bulk_create([Account(name="acme", plan=Account.Plan.TEAM)], ignore_conflicts=True)
    return Account.objects.get(name="acme")


@pytest.fixture
def user_client(django_user_model: type) -> Client:
    """A logged-in user who is not staff: the site's pages need a login, not the admin."""
    client = Client()
    client.force_login(django_user_model.objects.create_user("demo", password="x"))
    return client


# -- who may see and press what ---------------------------------------------------


def test_the_migrations_seed_acme_globex_and_initech() -> None:
    assert list(Account.objects.values_list("name", "plan")) == [
        ("acme", "team"), ("globex", "enterprise"), ("initech", "free"),
    ]


@pytest.mark.parametrize("method, name, args", [
    ("get", LIST, []),
    ("get", "accounts:activity", []),
    ("post", "accounts:act", ["acme"]),
    ("post", "accounts:save", ["acme"]),
])
def test_anonymous_users_are_sent_to_the_login_page(client: Client, acme: Account, method: str, name: str,
                                                    args: list[str]) -> None:
    url = reverse(name, args=args)

    response = client.post(url, {"action": "sync-all", "plan": "free"}) if method == "post" else client.get(url)

    assert response.status_code == 302
    assert response["Location"] == f"{reverse('login')}?next={url}"
    assert not Invocation.objects.exists()


def test_the_login_page_logs_in_and_goes_to_the_accounts(client: Client, django_user_model: type) -> None:
    django_user_model.objects.create_user("demo", password="secret")

    response = client.post(reverse("login"), {"username": "demo", "password": "secret"})

    assert response.status_code == 302 and response["Location"] == reverse(LIST)


def test_a_post_without_the_csrf_token_is_refused(acme: Account, django_user_model: type) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(django_user_model.objects.create_user("demo", password="x"))

    response = client.post(act_url(), {"action": "sync-all"})

    assert response.status_code == 403
    assert not Invocation.objects.exists()


def test_a_post_with_the_pages_csrf_token_is_accepted(acme: Account, django_user_model: type) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(django_user_model.objects.create_user("demo", password="x"))
    page = client.get(reverse(LIST))

    response = client.post(act_url(), {"action": "list-invoices", "csrfmiddlewaretoken": page.context["csrf_token"]})

    assert response.status_code == 302
    assert Invocation.objects.count() == 1


def test_a_get_of_a_button_is_refused(user_client: Client, acme: Account) -> None:
    assert user_client.get(act_url(), {"action": "sync-all"}).status_code == 405
    assert not Invocation.objects.exists()


def test_an_unknown_action_is_refused(user_client: Client, acme: Account) -> None:
    response = user_client.post(act_url(), {"action": "delete-everything"})

    assert response.status_code == 400
    assert not Invocation.objects.exists()


def test_an_unknown_account_is_not_found(user_client: Client) -> None:
    assert user_client.post(act_url("nobody"), {"action": "sync-all"}).status_code == 404


# -- what each button enqueues ---------------------------------------------------------


@pytest.mark.parametrize("action, expected", [
    ("fetch-profile", [(tasks.call_keyed_drop.name, {"account_id": "acme", "op": "fetch_profile"})]),
    ("list-invoices", [(tasks.call_keyed.name, {"account_id": "acme", "op": "list_invoices"})]),
    ("sync-all", [(tasks.call_keyed.name, {"account_id": "acme", "op": op}) for op in OPS]),
    ("sync-unsafe", [(tasks.call_unsafe.name, {"account_id": "acme", "op": op}) for op in OPS]),
    ("refresh", [(tasks.refresh_once.name, {"account_id": "acme"})]),
    ("sync-retrying", [(tasks.call_retrying.name, {"account_id": "acme", "op": op}) for op in OPS]),
    ("sync-report", [(tasks.sync_report.name, {"account_id": "acme"})]),
    ("onboard", [(tasks.onboard.name, {"account_id": "acme"})]),
])
def test_each_button_enqueues_its_calls_in_the_request(user_client: Client, acme: Account, action: str,
                                                       expected: list[tuple[str, dict[str, str]]]) -> None:
    response = user_client.post(act_url(), {"action": action})

    assert response.status_code == 302 and response["Location"] == reverse(LIST)
    assert enqueued() == expected
    [told] = messages_of(response)
    assert told.startswith(f"acme · {ACTIONS[action].label}: registered #")


def test_every_button_is_tested() -> None:
    tested = {"fetch-profile", "list-invoices", "sync-all", "sync-unsafe", "refresh", "sync-retrying", "sync-report",
              "onboard"}
    assert set(ACTIONS) == tested, "a new button needs its line in test_each_button_enqueues_its_calls_in_the_request"


def test_refresh_pressed_while_one_waits_merges_into_it(user_client: Client, acme: Account) -> None:
    user_client.post(act_url(), {"action": "refresh"})

    response = user_client.post(act_url(), {"action": "refresh"})

    waiting = Invocation.objects.get()
    assert (waiting.task_name, waiting.status) == (tasks.refresh_once.name, Status.REGISTERED)
    assert Event.objects.filter(invocation=waiting, kind=Event.Kind.REUSED).count() == 1
    assert messages_of(response)[-1:] == [
        f"acme · refresh: merged into the waiting #{waiting.pk} (refresh_once: merged into the refresh already waiting)."
    ]


def test_a_refresh_waits_the_settings_delay_so_that_requests_close_together_merge(
        user_client: Client, acme: Account, settings: Any) -> None:
    settings.ACCOUNT_REFRESH_AFTER = 30.0
    before = timezone.now()

    user_client.post(act_url(), {"action": "refresh"})

    run_after = Invocation.objects.get().run_after
    assert run_after is not None and run_after >= before + timedelta(seconds=29)


@pytest.mark.django_db(transaction=True)
def test_a_delay_is_rolled_back_when_the_view_raises_after_it(acme: Account, django_user_model: type,
                                                             settings: Any) -> None:
    # Without its middleware, the message the view adds after delay() raises: the request fails after
    # the invocations were inserted, in the real outermost transaction of a transactional test.
    settings.MIDDLEWARE = [name for name in settings.MIDDLEWARE if "MessageMiddleware" not in name]
    client = Client()
    client.force_login(django_user_model.objects.create_user("demo", password="x"))

    with pytest.raises(MessageFailure):
        client.post(act_url(), {"action": "sync-all"})

    assert not Invocation.objects.exists()


# -- the signal: a saved account asks for a refresh ------------------------------------------


def test_saving_an_account_asks_for_a_refresh_of_it(acme: Account) -> None:
    acme.save()

    assert enqueued() == [(tasks.refresh_once.name, {"account_id": "acme"})]


def test_repeated_saves_merge_into_one_refresh(acme: Account) -> None:
    for plan in (Account.Plan.FREE, Account.Plan.ENTERPRISE, Account.Plan.TEAM):
        acme.plan = plan
        acme.save()

    refresh = Invocation.objects.get()
    assert refresh.status == Status.REGISTERED
    assert Event.objects.filter(invocation=refresh, kind=Event.Kind.REUSED).count() == 2


def test_each_account_gets_a_refresh_of_its_own(acme: Account) -> None:
    Account.objects.bulk_create([Account(name="globex")], ignore_conflicts=True)

    for account in Account.objects.filter(name__in=["acme", "globex"]):
        account.save()

    assert sorted(kwargs["account_id"] for _, kwargs in enqueued()) == ["acme", "globex"]


@pytest.mark.django_db(transaction=True)
def test_a_save_rolled_back_asks_for_no_refresh(acme: Account) -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        acme.save()
        raise RuntimeError("the rest of the request failed")

    assert not Invocation.objects.exists()


def test_saving_the_plan_asks_for_a_refresh(user_client: Client, acme: Account) -> None:
    response = user_client.post(reverse("accounts:save", args=["acme"]), {"plan": "enterprise"})

    assert response.status_code == 302
    assert Account.objects.get(name="acme").plan == "enterprise"
    assert enqueued() == [(tasks.refresh_once.name, {"account_id": "acme"})]


def test_an_unknown_plan_is_refused(user_client: Client, acme: Account) -> None:
    response = user_client.post(reverse("accounts:save", args=["acme"]), {"plan": "platinum"})

    assert response.status_code == 400
    assert not Invocation.objects.exists()


def test_saving_an_account_in_the_admin_asks_for_a_refresh(admin_client: Client, acme: Account) -> None:
    url = reverse("admin:accounts_account_change", args=[acme.pk])

    response = admin_client.post(url, {"name": "acme", "plan": "free"})

    assert response.status_code == 302
    assert enqueued() == [(tasks.refresh_once.name, {"account_id": "acme"})]


def test_a_finished_call_stamps_its_account_without_asking_for_a_refresh(acme: Account) -> None:
    call = tasks.call_keyed.delay(account_id="acme", op="list_invoices")
    refresh = tasks.refresh_once.delay(account_id="acme")

    invocation_finished.send(sender=Invocation, invocation=call, status=Status.SUCCESS)
    invocation_finished.send(sender=Invocation, invocation=refresh, status=Status.SUCCESS)

    acme.refresh_from_db()
    assert acme.last_synced_at is not None and acme.last_refreshed_at is not None
    assert Invocation.objects.count() == 2, "a stamp is an update(), which sends no post_save"


def test_a_failed_call_stamps_nothing(acme: Account) -> None:
    call = tasks.call_keyed.delay(account_id="acme", op="list_invoices")

    invocation_finished.send(sender=Invocation, invocation=call, status=Status.FAILED)

    acme.refresh_from_db()
    assert acme.last_synced_at is None


# -- what the page shows ---------------------------------------------------------------


def test_the_page_shows_each_account_with_its_buttons(user_client: Client) -> None:
    response = user_client.get(reverse(LIST))

    assert response.status_code == 200
    page = response.content.decode()
    for name in ("acme", "globex", "initech"):
        assert f'id="account-{name}"' in page
    for action in ACTIONS.values():
        assert f'value="{action.slug}"' in page
        assert f"<td><code>{action.task.name}</code></td>" in page, "the rules table names each button's task"
    assert page.count('name="csrfmiddlewaretoken"') >= 7, "every form of the page carries the CSRF token"


def test_a_row_shows_the_accounts_recent_calls_and_what_merged(user_client: Client, acme: Account) -> None:
    user_client.post(act_url(), {"action": "sync-all"})
    user_client.post(act_url(), {"action": "refresh"})
    user_client.post(act_url(), {"action": "refresh"})

    page = user_client.get(reverse("accounts:activity")).content.decode()

    row = page[page.index('data-live="account-acme"'):page.index('data-live="account-globex"')]
    assert [op for op in OPS if f'data-op="{op}"' in row] == list(OPS)
    assert row.count('data-phase="waiting"') == 5
    assert "5 waiting" in row and "1 merged" in row


def test_the_page_reads_the_providers_counters(user_client: Client, provider: Provider) -> None:
    try:
        tasks.call_keyed("acme", "list_invoices")  # a plain call: runs here, now
    finally:
        tasks.close_provider()

    page = user_client.get(reverse("accounts:activity")).content.decode()

    assert '<strong class="calls">1</strong> calls' in page


def test_the_page_says_when_the_provider_does_not_answer(user_client: Client, settings: Any) -> None:
    with Provider(quiet=True) as gone:
        url = gone.url
    settings.PROVIDER_URL = url

    page = user_client.get(reverse(LIST)).content.decode()

    assert f"The provider at {url} does not answer" in page


def test_the_site_adds_its_schedule_once() -> None:
    from demo_project.management.commands.site import SCHEDULE, demo_schedule
    from keyjobs.models import Schedule

    demo_schedule()
    demo_schedule()
    schedule = Schedule.objects.get(name=SCHEDULE)
    assert schedule.task_name == tasks.sync_report.name and schedule.enabled and schedule.next_run is not None


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_the_retrying_and_waiting_buttons_leave_retries_and_a_paused_parent(provider: Provider,
                                                                            worker_process: Any) -> None:
    report = tasks.sync_report.delay(account_id="acme")
    for op in OPS:
        tasks.call_retrying.delay(account_id="globex", op=op)
    # A real runworker: the demo's tasks keep a provider client per thread, which only a worker's stop closes.
    worker_process("--threads", "4", "--burst", env={"PROVIDER_URL": provider.url}).wait(timeout=60)

    report.refresh_from_db()
    assert report.status == Status.SUCCESS and report.return_value["synced"] == list(OPS)
    # It paused for the children still running when it asked: a child that ended first (a loaded machine) is
    # read at once, without a pause.
    assert 1 <= Event.objects.filter(invocation=report, to_status=Status.PAUSED).count() <= len(OPS)
    assert Invocation.objects.filter(parent=report, status=Status.SUCCESS).count() == len(OPS)
    retried = Invocation.objects.filter(task_name=tasks.call_retrying.name)
    assert set(retried.values_list("status", flat=True)) <= {Status.SUCCESS, Status.FAILED}
    assert Event.objects.filter(invocation__in=retried, to_status=Status.RETRY).exists(), "collisions were retried"


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_the_onboard_button_runs_a_workflow_whose_steps_each_ran_once(provider: Provider, worker_process: Any) -> None:
    from keyjobs.models import Step
    from tests.waiting import wait_for

    flow = tasks.onboard.delay(account_id="acme")
    worker_process("--threads", "2", env={"PROVIDER_URL": provider.url})
    wait_for(lambda: Invocation.objects.get(pk=flow.pk).is_final, timeout=60, what="the workflow to end")

    flow.refresh_from_db()
    assert flow.status == Status.SUCCESS, flow.error
    assert flow.return_value["steps"] == ["fetch_profile", "sync"]
    assert list(Step.objects.filter(workflow=flow).values_list("kind", flat=True)) == ["CHILD", "UUID", "SLEEP", "CHILD"]
    assert Invocation.objects.filter(parent=flow, status=Status.SUCCESS).count() == 2
