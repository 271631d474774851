from datetime import timedelta

import pytest

from keyjobs import Status, TaskDeclarationError, task
from keyjobs.claim import claim
from keyjobs.execute import execute
from keyjobs.models import Event, Invocation
from keyjobs.worker import Worker
from tests import jobs
from tests.factories import RunnerFactory


@pytest.mark.django_db(transaction=True)
def test_a_retried_invocation_runs_again_until_it_succeeds(tmp_path):
    invocation = jobs.flaky.delay(str(tmp_path / "count"), 2)
    Worker(threads=1, burst=True, poll_interval=0.01).run()
    invocation.refresh_from_db()
    assert (invocation.status, invocation.result, invocation.attempts) == (Status.SUCCESS, 3, 3)
    path = [(e.from_status, e.to_status) for e in Event.objects.filter(invocation=invocation)]
    assert path.count(("RUNNING", "RETRY")) == 2 and path.count(("RETRY", "REGISTERED")) == 2


@pytest.mark.django_db(transaction=True)
def test_retries_stop_at_max_retries(tmp_path):
    invocation = jobs.flaky.delay(str(tmp_path / "count"), 5)
    Worker(threads=1, burst=True, poll_interval=0.01).run()
    invocation.refresh_from_db()
    assert (invocation.status, invocation.attempts) == (Status.FAILED, 3)
    assert invocation.error == "ConnectionError: attempt 3 failed"


@pytest.mark.django_db
def test_only_the_listed_exceptions_are_retried():
    runner = RunnerFactory()
    jobs.wrong_kind_of_error.delay()
    [claimed] = claim(runner, using="default")
    assert execute(claimed, runner, using="default") == Status.FAILED


@pytest.mark.django_db
def test_a_retry_waits_its_backoff_and_frees_the_key_meanwhile():
    runner = RunnerFactory()
    failing = jobs.flaky_serial_per_key.delay("acme", "a")
    [claimed] = claim(runner, using="default")
    assert execute(claimed, runner, using="default") == Status.RETRY
    failing.refresh_from_db()
    assert failing.run_after is not None and failing.status == Status.RETRY
    assert claim(runner, using="default") == []  # not due for a minute
    # Meanwhile its key is free: the next call of the same key runs at once.
    following = jobs.flaky_serial_per_key.delay("acme", "b")
    assert [inv.pk for inv in claim(runner, using="default")] == [following.pk]


@pytest.mark.django_db
def test_a_retry_gives_way_to_a_duplicate_registered_while_it_ran():
    runner = RunnerFactory()
    failing = jobs.flaky_once_per_key.delay("acme")
    [claimed] = claim(runner, using="default")
    duplicate = jobs.flaky_once_per_key.delay("acme")
    assert duplicate.pk != failing.pk
    assert execute(claimed, runner, using="default") == Status.FAILED
    failing.refresh_from_db()
    assert failing.status == Status.FAILED
    assert Event.objects.filter(invocation=failing).last().note == "not retried: a waiting duplicate takes its place"
    assert Invocation.objects.get(pk=duplicate.pk).status == Status.REGISTERED


def test_backoff_grows_exponentially_within_jitter():
    delays = [jobs.flaky.spec.retry_delay(attempt) for attempt in (1, 2, 3)]
    assert 0.005 <= delays[0] <= 0.01 and 0.01 <= delays[1] <= 0.02 and 0.02 <= delays[2] <= 0.04


@task(max_retries=1, retry_for=(ConnectionError,), retry_backoff=3600, retry_backoff_max=0.2)
def capped_backoff() -> None:
    raise ConnectionError("provider down")


@pytest.mark.django_db
def test_a_retry_waits_no_longer_than_retry_backoff_max():
    runner = RunnerFactory()
    invocation = capped_backoff.delay()
    [claimed] = claim(runner, using="default")
    assert execute(claimed, runner, using="default") == Status.RETRY
    invocation.refresh_from_db()
    failed_at = Event.objects.get(invocation=invocation, to_status=Status.RETRY).at
    # Its cap of 0.2 s, not the half hour or more its backoff alone would give.
    assert invocation.run_after - failed_at < timedelta(seconds=5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_retries": -1}, "max_retries=-1 must be a whole number"),
        ({"retry_for": "ValueError"}, "retry_for='ValueError' must be an exception class"),
        ({"retry_backoff": -1}, "retry_backoff=-1 must be a number of seconds"),
        ({"timeout": 0}, "timeout=0 must be a number of seconds above 0"),
    ],
)
def test_bad_retry_and_timeout_options_are_refused(options, message):
    with pytest.raises(TaskDeclarationError, match=message):

        @task(**options)
        def f(): ...


@pytest.mark.django_db
@pytest.mark.parametrize("task_", [jobs.too_slow, jobs.too_slow_async], ids=["thread", "async"])
def test_a_run_over_its_time_limit_fails(task_):
    runner = RunnerFactory()
    invocation = task_.delay(0.2)
    [claimed] = claim(runner, using="default")
    assert execute(claimed, runner, using="default") == Status.FAILED
    invocation.refresh_from_db()
    assert "time limit of 0.05s" in invocation.error


@pytest.mark.django_db(transaction=True)
def test_the_worker_flags_a_run_past_its_time_limit_while_it_still_holds_the_key(settings):
    settings.KEYJOBS_HEARTBEAT_INTERVAL = 0.05
    invocation = jobs.too_slow.delay(0.4)
    Worker(threads=1, burst=True, poll_interval=0.01).run()
    overdue = Event.objects.get(invocation=invocation, kind=Event.Kind.OVERDUE)
    assert "key stays held until the run returns" in overdue.note
    assert Invocation.objects.get(pk=invocation.pk).status == Status.FAILED
