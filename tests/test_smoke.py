import pytest

from tests.jobs import add


@pytest.mark.django_db(transaction=True)
def test_a_burst_worker_runs_a_delayed_call(worker_process):
    invocation = add.delay(2, b=3)
    worker_process("--burst", "--threads", "2").wait()
    assert invocation.wait(timeout=5) == "SUCCESS"
    assert invocation.result == 5
