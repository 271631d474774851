import pytest
from django.utils import timezone

from keyjobs import InvalidTransition, Status
from keyjobs.exceptions import NotOwner
from keyjobs.models import Event
from keyjobs.status import FINAL, TRANSITIONS, change
from keyjobs.status import Status as S
from keyjobs.transitions import apply, move
from tests.factories import InvocationFactory, RunnerFactory

pytestmark = pytest.mark.django_db


def test_every_status_has_its_transitions_listed():
    assert set(TRANSITIONS) == set(Status)


def test_only_finished_work_is_final_and_success_is_terminal():
    assert FINAL == {S.SUCCESS, S.FAILED, S.CONCURRENCY_CONTROLLED_FINAL, S.CANCELLED}
    assert TRANSITIONS[S.SUCCESS] == frozenset()


def test_a_move_writes_the_status_and_its_history_row_together():
    runner = RunnerFactory()
    invocation = InvocationFactory()
    assert move([invocation.pk], S.PENDING, using="default", runner=runner, runner_thread=3) == [invocation.pk]
    invocation.refresh_from_db()
    event = Event.objects.get(invocation=invocation)
    assert invocation.status == S.PENDING
    assert (event.from_status, event.to_status, event.runner, event.runner_thread) == (S.REGISTERED, S.PENDING, runner, 3)
    assert event.at is not None


def test_an_illegal_move_is_refused_and_changes_nothing():
    invocation = InvocationFactory(status=S.SUCCESS)
    with pytest.raises(InvalidTransition, match="cannot go from SUCCESS to RUNNING"):
        move([invocation.pk], S.RUNNING, using="default")
    invocation.refresh_from_db()
    assert invocation.status == S.SUCCESS and not Event.objects.exists()


def test_a_move_from_an_unexpected_status_is_skipped():
    invocation = InvocationFactory(status=S.PENDING)
    assert move([invocation.pk], S.REROUTED, using="default", only_from={S.REGISTERED}) == []
    invocation.refresh_from_db()
    assert invocation.status == S.PENDING


def test_only_the_owner_may_move_an_owned_invocation():
    owner, other = RunnerFactory(), RunnerFactory()
    invocation = InvocationFactory(status=S.RUNNING, runner=owner)
    with pytest.raises(NotOwner):
        move([invocation.pk], S.SUCCESS, using="default", owner=other)
    assert move([invocation.pk], S.SUCCESS, using="default", owner=owner) == [invocation.pk]


def test_entering_running_and_final_statuses_stamps_the_time():
    invocation = InvocationFactory(status=S.PENDING)
    move([invocation.pk], S.RUNNING, using="default")
    move([invocation.pk], S.SUCCESS, using="default")
    invocation.refresh_from_db()
    assert invocation.started_at <= invocation.finished_at


def test_a_final_invocation_goes_back_to_registered_only_as_a_retry_that_clears_its_last_run():
    failed = InvocationFactory(status=S.FAILED, error="boom", error_type="builtins.ValueError", traceback="...",
                               finished_at=timezone.now(), run_after=timezone.now(), cancel_requested=True)
    with pytest.raises(InvalidTransition):
        apply([failed.pk], change(S.REGISTERED), using="default")
    apply([failed.pk], change(S.REGISTERED, again=True), using="default")
    failed.refresh_from_db()
    assert (failed.status, failed.error, failed.error_type, failed.traceback, failed.finished_at, failed.run_after,
            failed.cancel_requested) == (S.REGISTERED, "", "", "", None, None, False)


def test_only_a_final_invocation_is_registered_again():
    parked = InvocationFactory(status=S.REROUTED)
    with pytest.raises(InvalidTransition):
        apply([parked.pk], change(S.REGISTERED, again=True), using="default")
