"""debounce: calls of a waiting key merge into one invocation that takes the latest arguments and starts later."""

import threading
from datetime import timedelta

import pytest
from django.db import connections, transaction
from django.utils import timezone

from keyjobs import Mode, TaskDeclarationError, task
from keyjobs.claim import claim
from keyjobs.models import Event, Invocation
from keyjobs.status import Status
from keyjobs.store import store
from keyjobs.worker import Worker
from tests import jobs
from tests.factories import RunnerFactory
from tests.waiting import wait_for

pytestmark = pytest.mark.django_db


def test_a_call_meeting_a_waiting_invocation_merges_into_it_with_the_latest_arguments() -> None:
    first = jobs.debounced.delay("acme", "created")
    before = store("default").clock()  # debounce counts on the database's clock
    second = jobs.debounced.delay("acme", "renamed")

    assert second.pk == first.pk and second.reused
    merged = Invocation.objects.get(pk=first.pk)
    assert merged.args == ["acme", "renamed"]
    assert merged.run_after >= before + timedelta(seconds=0.3)
    assert Event.objects.filter(invocation=first, kind=Event.Kind.DEBOUNCED).count() == 1
    assert Invocation.objects.count() == 1


def test_its_start_never_moves_past_debounce_max_after_the_first_call() -> None:
    first = jobs.debounced.delay("acme", "created")
    long_ago = timezone.now() - timedelta(seconds=0.9)
    Invocation.objects.filter(pk=first.pk).update(created_at=long_ago)

    jobs.debounced.delay("acme", "renamed")

    assert Invocation.objects.get(pk=first.pk).run_after == long_ago + timedelta(seconds=1.0)


def test_a_first_call_waits_its_debounce() -> None:
    before = store("default").clock()  # debounce counts on the database's clock
    invocation = jobs.debounced.delay("acme", "created")
    assert invocation.run_after >= before + timedelta(seconds=0.3)
    assert claim(RunnerFactory(), using="default") == []  # not due yet


def test_other_keys_are_not_merged() -> None:
    acme, globex = jobs.debounced.delay("acme", "a"), jobs.debounced.delay("globex", "b")
    assert acme.pk != globex.pk and not globex.reused


def test_a_call_while_the_debounced_run_runs_registers_the_next_one() -> None:
    first = jobs.debounced.delay("acme", "created")
    Invocation.objects.filter(pk=first.pk).update(run_after=None)
    [running] = claim(RunnerFactory(), using="default", start=True)
    assert running.pk == first.pk

    after = jobs.debounced.delay("acme", "written while it ran")

    assert after.pk != first.pk and not after.reused
    assert Invocation.objects.get(pk=after.pk).args == ["acme", "written while it ran"]


@pytest.mark.django_db(transaction=True)
def test_the_run_takes_the_last_calls_arguments() -> None:
    calls = [jobs.debounced.delay(account, f"edit {n}") for n in range(5) for account in ("acme", "globex")]
    assert len({call.pk for call in calls}) == 2
    wait_for(lambda: not Invocation.objects.filter(run_after__gt=timezone.now()).exists(), timeout=10,
             what="the debounce to pass")
    Worker(threads=2, burst=True).run()
    assert sorted(Invocation.objects.values_list("return_value", flat=True)) == ["edit 4", "edit 4"]


@pytest.mark.parametrize(("options", "message"), [
    ({"debounce": 1.0}, "debounce merges the calls of a registration key: it needs registration_concurrency"),
    ({"registration_concurrency": Mode.TASK, "debounce": 0}, "debounce=0 must be a number of seconds above 0"),
    ({"registration_concurrency": Mode.TASK, "debounce": -1.0}, "debounce=-1.0 must be a number of seconds"),
    ({"registration_concurrency": Mode.TASK, "debounce": "2s"}, "debounce='2s' must be a number of seconds"),
    ({"registration_concurrency": Mode.TASK, "debounce": 2.0, "debounce_max": 1.0},
     "debounce_max=1.0 must be at least debounce=2.0"),
    ({"registration_concurrency": Mode.TASK, "debounce": 2.0, "debounce_max": 0},
     "debounce_max=0 must be a number of seconds above 0"),
    ({"registration_concurrency": Mode.TASK, "debounce_max": 5.0}, "debounce_max=5.0 has no effect without debounce"),
])
def test_bad_debounce_options_are_refused_at_decoration(options: dict[str, object], message: str) -> None:
    with pytest.raises(TaskDeclarationError) as refused:
        task(**options)(jobs.debounced.func)
    assert message in str(refused.value)


# -- the merge race ------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.postgres
def test_a_runner_cannot_start_an_invocation_a_caller_is_merging_into_until_it_commits() -> None:
    """The caller writes data with its delay(): the run must see it, so it must not start before the commit.

    Without the merge's row lock a runner took it here: the reuse writes only
    an Event, whose foreign key locks the invocation FOR KEY SHARE, which a
    claim's FOR NO KEY UPDATE SKIP LOCKED does not skip. (A debounced merge
    also updates the row, which locks it as well, and moves its start.)
    """
    waiting = jobs.once_per_key.delay("acme", "first")
    merged, commit = threading.Event(), threading.Event()

    def caller() -> None:
        try:
            with transaction.atomic():
                assert jobs.once_per_key.delay("acme", "second").reused
                merged.set()
                commit.wait(10)
        finally:
            connections.close_all()

    thread = threading.Thread(target=caller)
    thread.start()
    runner = RunnerFactory()
    try:
        assert merged.wait(10)
        assert claim(runner, using="default", start=True) == [], "a runner started it before the merge committed"
    finally:
        commit.set()
        thread.join(10)
    [claimed] = claim(runner, using="default", start=True)
    assert claimed.pk == waiting.pk


def test_a_merge_that_changes_a_parked_invocations_running_key_registers_it_under_its_new_key() -> None:
    task = jobs.debounced_across_keys
    runner = RunnerFactory()
    first = task.delay("acme", "a")
    Invocation.objects.filter(pk=first.pk).update(run_after=None)
    assert [inv.pk for inv in claim(runner, using="default", start=True)] == [first.pk]  # acme's key is held
    parked = task.delay("acme", "b")
    Invocation.objects.filter(pk=parked.pk).update(run_after=None)
    assert claim(runner, using="default") == []
    assert Invocation.objects.get(pk=parked.pk).status == Status.REROUTED  # behind acme's run

    merged = task.delay("gold-1", "c")

    assert merged.pk == parked.pk
    found = Invocation.objects.get(pk=parked.pk)
    assert (found.status, found.running_key, found.running_limit, found.args) == (
        Status.REGISTERED, '{"account_id":"gold-1"}', 2, ["gold-1", "c"])
    Invocation.objects.filter(pk=parked.pk).update(run_after=None)
    assert [inv.pk for inv in claim(runner, using="default")] == [parked.pk]  # gold-1's key is free
