import pytest
from django.db.models.functions import Now

from keyjobs import Status
from keyjobs.claim import claim
from keyjobs.execute import Outcome, finish, start
from keyjobs.models import Event, Invocation, Runner
from keyjobs.recovery import recover_lost_runners
from tests import jobs
from tests.factories import RunnerFactory

pytestmark = pytest.mark.django_db


def silence(runner: Runner, seconds: float = 60) -> None:
    """Make ``runner`` look silent for ``seconds``."""
    from datetime import timedelta

    Runner.objects.filter(pk=runner.pk).update(heartbeat_at=Now() - timedelta(seconds=seconds))


def test_the_work_of_a_silent_runner_is_requeued_with_a_history_row():
    dead, alive = RunnerFactory(), RunnerFactory()
    running = jobs.keyed.delay("acme", "a")
    pending = jobs.add.delay(1)
    [claimed] = claim(dead, using="default")
    start(claimed, dead, using="default")
    claim(dead, using="default")
    silence(dead)
    assert sorted(recover_lost_runners(using="default", lease=30, by=alive)) == [running.pk, pending.pk]
    for invocation in (running, pending):
        invocation.refresh_from_db()
        assert invocation.status == Status.REGISTERED
        event = Event.objects.filter(invocation=invocation).last()
        assert event.to_status == Status.REGISTERED and event.note.startswith("recovered:") and event.runner == alive
    dead.refresh_from_db()
    assert dead.lost and dead.stopped_at is not None


def test_a_recovered_key_is_free_for_the_next_runner():
    dead, alive = RunnerFactory(), RunnerFactory()
    first = jobs.keyed.delay("acme", "a")
    second = jobs.keyed.delay("acme", "b")
    [claimed] = claim(dead, using="default")
    start(claimed, dead, using="default")
    assert claim(alive, using="default") == []  # the key is busy: b is parked
    silence(dead)
    recover_lost_runners(using="default", lease=30, by=alive)
    assert [inv.pk for inv in claim(alive, using="default")] == [first.pk]  # in key order, a goes first
    assert Invocation.objects.get(pk=second.pk).status == Status.REROUTED


def test_a_runner_within_its_lease_keeps_its_work():
    slow = RunnerFactory()
    jobs.add.delay(1)
    claim(slow, using="default")
    silence(slow, seconds=5)
    assert recover_lost_runners(using="default", lease=30) == []
    assert not Runner.objects.get(pk=slow.pk).lost


def test_a_lost_runner_cannot_record_an_outcome_over_the_recovery():
    dead, alive = RunnerFactory(), RunnerFactory()
    invocation = jobs.keyed.delay("acme", "a")
    [claimed] = claim(dead, using="default")
    start(claimed, dead, using="default")
    silence(dead)
    recover_lost_runners(using="default", lease=30, by=alive)
    [again] = claim(alive, using="default")
    start(again, alive, using="default")
    assert finish(claimed, Outcome(Status.SUCCESS, {"return_value": "zombie"}), dead, using="default") is None
    invocation.refresh_from_db()
    assert (invocation.status, invocation.runner_id) == (Status.RUNNING, alive.pk)


def test_recovery_gives_way_to_a_waiting_duplicate():
    dead, alive = RunnerFactory(), RunnerFactory()
    first = jobs.refresh_once.delay("acme")
    [claimed] = claim(dead, using="default")
    start(claimed, dead, using="default")
    duplicate = jobs.refresh_once.delay("acme")
    silence(dead)
    recover_lost_runners(using="default", lease=30, by=alive)
    first.refresh_from_db()
    assert first.status == Status.FAILED and "a waiting duplicate runs instead" in first.error
    assert Invocation.objects.get(pk=duplicate.pk).status in (Status.REGISTERED, Status.REROUTED)


def test_a_run_whose_cancel_was_requested_is_cancelled_not_run_again_and_its_key_goes_on():
    dead, alive = RunnerFactory(), RunnerFactory()
    running = jobs.keyed.delay("acme", "a")
    following = jobs.keyed.delay("acme", "b")
    [claimed] = claim(dead, using="default", start=True)
    assert claim(alive, using="default") == []  # the key is busy: b is parked
    claimed.cancel(by="tests")
    silence(dead)
    assert recover_lost_runners(using="default", lease=30, by=alive) == [running.pk]
    running.refresh_from_db()
    assert running.status == Status.CANCELLED
    assert running.error == f"Cancelled: its runner {dead} died after its cancel was requested"
    assert [inv.pk for inv in claim(alive, using="default")] == [following.pk]
