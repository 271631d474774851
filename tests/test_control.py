"""Changes by hand: a retry or a cancel request whose statement fails, or whose reply is lost, can be asked again."""

import pytest
from django.utils import timezone

from keyjobs import control
from keyjobs.models import Event
from keyjobs.status import Status
from tests.factories import InvocationFactory, RunnerFactory, give_run
from tests.fault_injection import Step, every_fault

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_retry_by_hand_that_failed_or_lost_its_reply_registers_the_invocation_once_when_asked_again() -> None:
    retried = every_fault(Step("retry", (control.retry,)), lambda: InvocationFactory(status=Status.FAILED, error="x"),
                          lambda invocation: control.retry([invocation], by="operator"))
    for invocation in retried:
        invocation.refresh_from_db()
        assert (invocation.status, invocation.error) == (Status.REGISTERED, "")
        assert Event.objects.filter(invocation=invocation, to_status=Status.REGISTERED).count() == 1


def test_a_cancel_request_that_failed_or_lost_its_reply_is_recorded_once_when_asked_again() -> None:
    runner = RunnerFactory()
    requested = every_fault(
        Step("cancel request", (control.cancel,)),
        lambda: give_run(InvocationFactory(), runner=runner, thread=0, start=timezone.now()),
        lambda invocation: control.cancel([invocation], by="operator"))
    for invocation in requested:
        invocation.refresh_from_db()
        assert (invocation.status, invocation.cancel_requested) == (Status.RUNNING, True)
        assert Event.objects.filter(invocation=invocation, kind=Event.Kind.CANCEL_REQUESTED).count() == 1
