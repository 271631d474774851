import pytest
from django.db import IntegrityError, transaction

from keyjobs import InvocationDropped, InvocationFailed, InvocationNotFinished, Status
from keyjobs.models import Invocation
from tests.factories import InvocationFactory

pytestmark = pytest.mark.django_db

KEY = '{"account_id":"acme"}'


@pytest.mark.parametrize("second", [Status.PENDING, Status.RUNNING])
def test_the_database_refuses_a_second_owner_of_a_running_key(second):
    InvocationFactory(running_key=KEY, status=Status.RUNNING)
    with pytest.raises(IntegrityError), transaction.atomic():
        InvocationFactory(running_key=KEY, status=second)


def test_the_running_guard_ignores_waiting_and_finished_invocations_and_other_keys():
    InvocationFactory(running_key=KEY, status=Status.RUNNING)
    InvocationFactory(running_key=KEY, status=Status.REGISTERED)
    InvocationFactory(running_key=KEY, status=Status.SUCCESS)
    InvocationFactory(running_key='{"account_id":"globex"}', status=Status.RUNNING)
    InvocationFactory(running_key=KEY, status=Status.RUNNING, task_name="tests.jobs.other")
    InvocationFactory(running_key=None, status=Status.RUNNING)
    InvocationFactory(running_key=None, status=Status.RUNNING)


@pytest.mark.parametrize("second", [Status.REGISTERED, Status.REROUTED, Status.RETRY])
def test_the_database_refuses_a_second_waiting_invocation_of_a_registration_key(second):
    InvocationFactory(registration_key=KEY, status=Status.REGISTERED)
    with pytest.raises(IntegrityError), transaction.atomic():
        InvocationFactory(registration_key=KEY, status=second)


def test_the_registration_guard_ignores_owned_invocations():
    InvocationFactory(registration_key=KEY, status=Status.REGISTERED)
    InvocationFactory(registration_key=KEY, status=Status.RUNNING)


def test_result_of_a_success_is_the_return_value():
    assert InvocationFactory(status=Status.SUCCESS, return_value={"a": [1]}).result == {"a": [1]}


def test_result_of_a_failure_raises_with_the_error_and_traceback():
    invocation = InvocationFactory(status=Status.FAILED, error="ValueError: no", traceback="Traceback ...")
    with pytest.raises(InvocationFailed, match="failed: ValueError: no") as raised:
        invocation.result  # noqa: B018
    assert raised.value.traceback == "Traceback ..."


def test_result_of_a_dropped_invocation_raises():
    with pytest.raises(InvocationDropped, match="dropped by concurrency control"):
        InvocationFactory(status=Status.CONCURRENCY_CONTROLLED_FINAL).result  # noqa: B018


def test_result_of_unfinished_work_raises():
    with pytest.raises(InvocationNotFinished, match="is REGISTERED, not finished"):
        InvocationFactory().result  # noqa: B018


def test_wait_returns_the_final_status():
    assert InvocationFactory(status=Status.SUCCESS).wait(timeout=1) == Status.SUCCESS


def test_wait_gives_up_with_timeout_error():
    with pytest.raises(TimeoutError, match=r"still REGISTERED after 0\.05s"):
        InvocationFactory().wait(timeout=0.05)


def test_key_is_the_readable_running_or_registration_key():
    assert InvocationFactory(running_key=KEY).key == "acme"
    assert InvocationFactory(registration_key='{"a":1}').key == "1"
    assert Invocation(task_name="t").key == ""
