"""Run logs: what a task logs as it runs is kept with its invocation, capped, redacted, and shown to those who may."""

import logging
from collections.abc import Iterator
from datetime import timedelta
from urllib.parse import urlencode

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from keyjobs.models import Invocation, RunLog
from keyjobs.worker import Worker
from tests import jobs
from tests.factories import InvocationFactory, staff

pytestmark = pytest.mark.django_db(transaction=True)

LOGS = "admin:keyjobs_invocation_logs"


@pytest.fixture(autouse=True)
def info_logged() -> Iterator[None]:
    """Let the test tasks' INFO records through their logger, as a project's LOGGING would."""
    chatty = logging.getLogger("tests.jobs")
    level = chatty.level
    chatty.setLevel(logging.INFO)
    yield
    chatty.setLevel(level)


def run_all() -> None:
    Worker(threads=2, burst=True, poll_interval=0.01).run()


def redact(record: logging.LogRecord, message: str) -> str | None:
    """The test's redaction hook: hide tokens, keep nothing of a record about the second line."""
    if "line 2 of" in message:
        return None
    return message.replace("s3cret", "[redacted]")


def test_what_a_run_logs_is_kept_with_its_invocation_in_order() -> None:
    logging.getLogger("tests.jobs.chatty").warning("outside any run: not kept")
    invocation = jobs.chatty.delay("acme", 3)
    other = jobs.chatty.delay("globex", 1)
    run_all()

    kept = list(RunLog.objects.filter(invocation=invocation).values_list("level", "logger", "message"))
    assert kept == [(logging.INFO, "tests.jobs.chatty", f"line {n} of 3 for acme") for n in (1, 2, 3)]
    assert list(RunLog.objects.filter(invocation=other).values_list("message", flat=True)) == ["line 1 of 1 for globex"]
    record = RunLog.objects.filter(invocation=invocation).first()
    assert record is not None and abs(record.at - timezone.now()) < timedelta(minutes=1)
    assert RunLog.objects.count() == 4


def test_a_run_keeps_at_most_its_limit_and_says_how_many_more(settings) -> None:
    settings.KEYJOBS_RUN_LOG_LIMIT = 3
    invocation = jobs.chatty.delay("acme", 5)
    run_all()
    messages = list(RunLog.objects.filter(invocation=invocation).values_list("message", flat=True))
    assert messages[:3] == [f"line {n} of 5 for acme" for n in (1, 2, 3)]
    assert messages[3].startswith("2 more record(s) not kept") and len(messages) == 4


redacted: list[str] = []


def count_redacted(record: logging.LogRecord, message: str) -> str:
    redacted.append(message)
    return message


def test_a_limit_of_zero_keeps_nothing_and_a_full_run_redacts_nothing_more(settings) -> None:
    settings.KEYJOBS_RUN_LOG_REDACT = "tests.test_runlogs.count_redacted"
    settings.KEYJOBS_RUN_LOG_LIMIT = 0
    none_kept = jobs.chatty.delay("acme", 5)
    run_all()
    assert not RunLog.objects.filter(invocation=none_kept).exists() and redacted == []
    settings.KEYJOBS_RUN_LOG_LIMIT = 2
    two_kept = jobs.chatty.delay("acme", 5)
    run_all()
    assert RunLog.objects.filter(invocation=two_kept).count() == 3  # two, and how many more were not kept
    assert redacted == ["line 1 of 5 for acme", "line 2 of 5 for acme"]  # past the limit, not even formatted


def test_the_redaction_hook_sees_each_record_before_it_is_stored(settings) -> None:
    settings.KEYJOBS_RUN_LOG_REDACT = "tests.test_runlogs.redact"
    invocation = jobs.chatty.delay("acme", 3, secret="s3cret")
    run_all()
    messages = list(RunLog.objects.filter(invocation=invocation).values_list("message", flat=True))
    assert messages == ["line 1 of 3 for acme", "line 3 of 3 for acme", "calling the provider with token=[redacted]"]
    assert not RunLog.objects.filter(message__contains="s3cret").exists()


def test_the_levels_kept_follow_the_setting(settings) -> None:
    settings.KEYJOBS_RUN_LOG_LEVEL = logging.WARNING
    invocation = jobs.chatty.delay("acme", 2, secret="x")
    run_all()
    assert list(RunLog.objects.filter(invocation=invocation).values_list("level", flat=True)) == [logging.WARNING]


def test_the_invocations_page_shows_its_logs(django_user_model) -> None:
    invocation = jobs.chatty.delay("acme", 2)
    run_all()
    page = staff(django_user_model, "viewer", "view_invocation").get(
        reverse("admin:keyjobs_invocation_change", args=[invocation.pk])).content.decode()
    logs = page.split('class="kj-table kj-run-logs"')[1].split("</table>")[0]
    assert "line 1 of 2 for acme" in logs and "line 2 of 2 for acme" in logs and "tests.jobs.chatty" in logs


def test_the_log_explorer_filters_by_task_key_level_time_and_text(django_user_model) -> None:
    jobs.chatty.delay("acme", 2, secret="x")
    jobs.chatty.delay("globex", 1)
    jobs.add.delay(1, 2)
    run_all()
    viewer = staff(django_user_model, "viewer", "view_invocation")

    def shown(**query: str) -> list[str]:
        page = viewer.get(f"{reverse(LOGS)}?{urlencode(query)}").content.decode()
        table = page.split('id="kj-logs"')[1].split("</table>")[0]
        return sorted(part.split("</pre>")[0] for part in table.split('<pre class="kj-pre kj-log">')[1:])

    assert len(shown()) == 4
    assert shown(key='{"account_id":"globex"}') == ["line 1 of 1 for globex"]
    assert shown(task="tests.jobs.chatty", level=str(logging.WARNING)) == ["calling the provider with token=x"]
    assert shown(q="2 of 2") == ["line 2 of 2 for acme"]
    later = timezone.localtime(timezone.now() + timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%S")
    assert shown(**{"from": later}) == []


def test_the_log_explorer_takes_one_query_for_its_records(django_user_model, django_assert_num_queries) -> None:
    invocation = InvocationFactory(task_name="tests.jobs.chatty", running_key='{"account_id":"acme"}')
    RunLog.objects.bulk_create([RunLog(invocation=invocation, at=timezone.now(), level=20, logger="x",
                                       message=f"m{n}") for n in range(30)])
    viewer = staff(django_user_model, "viewer", "view_invocation")
    # Session, user, its permissions and its groups'; the records with their invocations' task and key.
    with django_assert_num_queries(5):
        assert viewer.get(reverse(LOGS)).status_code == 200


def test_stored_logs_are_shown_only_to_those_who_may_view_invocations(django_user_model) -> None:
    invocation = InvocationFactory()
    RunLog.objects.create(invocation=invocation, at=timezone.now(), level=20, logger="x", message="token=abc")
    for client in (Client(), staff(django_user_model, "staff")):
        response = client.get(reverse(LOGS))
        assert response.status_code in (302, 403) and b"token=abc" not in response.content
    assert Invocation.objects.count() == 1


def test_the_records_of_runs_never_written_are_forgotten_past_a_bound(monkeypatch) -> None:
    from keyjobs import runlogs
    from keyjobs.current import Run, running
    from keyjobs.models import Runner

    monkeypatch.setattr(runlogs, "RUNS_HELD", 3)
    handler = runlogs.RunLogHandler()
    for pk in range(1, 6):  # runs whose outcome was discarded: nobody takes their records
        with running(Run(Invocation(pk=pk), Runner(pk=1), "default")):
            handler.emit(logging.LogRecord("tests.jobs", logging.INFO, __file__, 1, "run %d", (pk,), None))
    assert handler.take(1) is None and handler.take(2) is None
    kept = handler.take(5)
    assert kept is not None and [message for *_, message in kept.records] == ["run 5"]
