"""Durable workflows: steps run once, replays read them back, waits suspend the run and hold no thread."""

import threading
import uuid
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from keyjobs import Status, WorkflowDiverged, WorkflowError
from keyjobs import workflows as wf
from keyjobs.models import Event, Invocation, Step
from tests import flows
from tests.flows import lines
from tests.waiting import thread_worker as worker
from tests.waiting import wait_for


def final(invocation: Invocation, timeout: float = 30) -> Invocation:
    wait_for(lambda: Invocation.objects.get(pk=invocation.pk).is_final, timeout=timeout,
             what=f"#{invocation.pk} to end")
    invocation.refresh_from_db()
    return invocation


def status_of(invocation: Invocation) -> str:
    return Invocation.objects.get(pk=invocation.pk).status


def suspensions(invocation: Invocation) -> int:
    return Event.objects.filter(invocation=invocation, to_status=Status.PAUSED).count()


def asend(*args: Any, **kwargs: Any) -> Any:
    """``wf.asend()`` from a coroutine, as an async view calls it; the connection of the thread that ran it closed,
    as a server closes it at a request's end (left open, the test database could not be dropped on PostgreSQL)."""
    import asyncio

    from asgiref.sync import sync_to_async
    from django.db import connections

    async def go() -> Any:
        try:
            return await wf.asend(*args, **kwargs)
        finally:
            await sync_to_async(connections.close_all)()

    return asyncio.run(go())


def kinds(invocation: Invocation) -> list[tuple[str, str]]:
    return list(Step.objects.filter(workflow=invocation).order_by("position").values_list("kind", "state"))


@pytest.mark.django_db(transaction=True)
def test_each_step_runs_once_and_a_replay_reads_the_recorded_values(tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    flow = flows.steps_and_values.delay(log)
    with worker():
        flow = final(flow)
    assert flow.status == Status.SUCCESS, flow.error
    result = flow.return_value
    assert (result["a"], result["b"], result["token"]) == ("A", "B", "tok-acme")
    effects = lines(log)
    assert [line.split()[:2] for line in effects if line.startswith("begin")] == [["begin", "a"], ["begin", "b"]]
    assert effects.count("token acme") == 1
    noted = {line for line in effects if line.startswith("values")}
    assert noted == {f"values {result['ref']} {result['at']} {result['jitter']}"}
    assert len([line for line in effects if line.startswith("values")]) >= 3  # replayed, the same each time
    assert suspensions(flow) == 2  # on each unfinished child
    assert kinds(flow) == [("CHILD", "DONE"), ("UUID", "DONE"), ("NOW", "DONE"), ("RANDOM", "DONE"),
                           ("STEP", "DONE"), ("CHILD", "DONE")]
    assert uuid.UUID(result["ref"]) and datetime.fromisoformat(result["at"]).tzinfo is not None
    children = Invocation.objects.filter(parent=flow)
    assert children.count() == 2 and not children.exclude(status=Status.SUCCESS).exists()


@pytest.mark.django_db(transaction=True)
def test_a_childs_large_result_read_in_the_run_that_saw_it_end_is_the_value_it_returned(admin_client) -> None:
    from django.urls import reverse

    flow = flows.reads_a_large_child_result.delay(20_000)
    with worker(threads=2):
        flow = final(flow)
    assert (flow.status, flow.return_value) == (Status.SUCCESS, 20_000), flow.error
    # Its step on the workflow's page: the stored result's size and first characters, not the row's empty one.
    page = admin_client.get(reverse("admin:keyjobs_invocation_change", args=[flow.pk])).content.decode()
    assert "first characters <code>&quot;rrrr" in page


@pytest.mark.django_db(transaction=True)
def test_a_step_that_cannot_be_recorded_gives_its_thread_back_after_a_lease(settings, monkeypatch, tmp_path) -> None:
    """While the database refuses a workflow's step records (an outage for it), its thread waits a lease at most,
    not for ever: the pool's one thread then runs other work."""
    from django.db import OperationalError

    from keyjobs import workflows

    settings.KEYJOBS_HEARTBEAT_INTERVAL, settings.KEYJOBS_LEASE = 0.25, 1.0

    def away(self) -> None:
        raise OperationalError("injected: the connection to the database was lost")

    monkeypatch.setattr(workflows.Replay, "_lock_owned", away)
    flows.steps_and_values.delay(str(tmp_path / "log"))
    with worker(threads=1):
        wait_for(lambda: Invocation.objects.filter(task_name=flows.steps_and_values.name, status=Status.RUNNING)
                 .exists(), what="the workflow to start")
        plain = flows.effect.delay(str(tmp_path / "other"), "plain")
        final(plain, timeout=30)
    assert Invocation.objects.get(pk=plain.pk).status == Status.SUCCESS


@pytest.mark.django_db(transaction=True)
def test_a_sleeping_workflow_holds_no_runner_and_resumes_after_its_sleep(tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    flow = flows.nap.delay(log, 0.5)
    with worker(threads=1) as running:
        wait_for(lambda: status_of(flow) == Status.PAUSED, what="the workflow to suspend")
        sleeping = Invocation.objects.get(pk=flow.pk)
        assert sleeping.runner_id is None and sleeping.resume_at is not None
        assert not running.running  # no thread holds it
        flow = final(flow)
    assert (flow.status, flow.return_value) == (Status.SUCCESS, "tok-after-nap")
    assert lines(log) == ["token after-nap"]
    sleep = Step.objects.get(workflow=flow, kind=Step.Kind.SLEEP)
    assert sleep.state == Step.State.DONE and sleep.due_at is not None


@pytest.mark.django_db(transaction=True)
def test_an_event_sent_before_the_workflow_waits_is_waiting_for_it(tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    flow = flows.approval.delay(log)
    wf.send(flow, "approved", {"by": "ops"})
    with worker():
        flow = final(flow)
    assert flow.return_value == {"answer": {"by": "ops"}}
    assert suspensions(flow) == 0


@pytest.mark.django_db(transaction=True)
def test_an_event_sent_while_the_workflow_waits_resumes_it(tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    flow = flows.approval.delay(log)
    with worker():
        wait_for(lambda: status_of(flow) == Status.PAUSED, what="the workflow to wait")
        wf.send(flow, "approved", {"by": "ops"})
        flow = final(flow)
    assert flow.return_value == {"answer": {"by": "ops"}}
    assert lines(log).count("token before") == 1


@pytest.mark.django_db(transaction=True)
def test_an_event_not_sent_before_its_timeout_is_none(tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    flow = flows.approval.delay(log, 0.3)
    with worker():
        flow = final(flow)
    assert flow.return_value == {"answer": None}


@pytest.mark.django_db(transaction=True)
def test_a_replay_that_asks_for_another_step_fails_with_workflow_diverged(tmp_path: Path) -> None:
    flag, log = tmp_path / "flag", str(tmp_path / "log")
    flag.write_text("a")
    flow = flows.versioned.delay(str(flag), log)
    with worker():
        wait_for(lambda: status_of(flow) == Status.PAUSED, what="the workflow to wait")
        flag.write_text("b")  # the code changes under the workflow in flight
        wf.send(flow, "go")
        flow = final(flow)
    assert flow.status == Status.FAILED
    assert flow.error_type == "keyjobs.exceptions.WorkflowDiverged"
    assert "diverged at step 0: recorded inline step tests.flows.make_token, asked for inline step tests.flows.note" \
        in flow.error
    assert lines(log) == ["token a"]


@pytest.mark.django_db(transaction=True)
def test_a_patch_behind_patched_leaves_workflows_in_flight_on_the_old_code(tmp_path: Path) -> None:
    flag, log = tmp_path / "flag", str(tmp_path / "log")
    flag.write_text("old")
    old = flows.patched_flow.delay(str(flag), log)
    with worker():
        wait_for(lambda: status_of(old) == Status.PAUSED, what="the old workflow to wait")
        flag.write_text("new")
        new = flows.patched_flow.delay(str(flag), log)
        wait_for(lambda: status_of(new) == Status.PAUSED, what="the new workflow to wait")
        wf.send(old, "go")
        wf.send(new, "go")
        old, new = final(old), final(new)
    assert (old.status, new.status) == (Status.SUCCESS, Status.SUCCESS), (old.error, new.error)
    assert [kind for kind, _ in kinds(old)] == ["STEP", "EVENT", "STEP"]
    assert [kind for kind, _ in kinds(new)] == ["STEP", "VERSION", "STEP", "EVENT", "STEP"]
    assert lines(log).count("extra") == 1


@pytest.mark.django_db(transaction=True)
def test_a_retried_workflow_does_not_run_its_finished_steps_again(tmp_path: Path) -> None:
    log, counter = str(tmp_path / "log"), str(tmp_path / "counter")
    flow = flows.retried.delay(log, counter)
    with worker():
        flow = final(flow)
    assert (flow.status, flow.return_value) == (Status.SUCCESS, "tok-first second time lucky"), flow.error
    assert flow.attempts == 2
    assert lines(log) == ["token first", "flaky", "flaky"]


@pytest.mark.django_db(transaction=True)
def test_a_workflow_failed_by_its_child_retried_by_hand_creates_that_child_again(tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    flow = flows.fails_by_child.delay(log)
    with worker():
        flow = final(flow)
        assert flow.status == Status.FAILED
        assert flow.error_type == "keyjobs.exceptions.InvocationFailed"
        first_failed = Step.objects.get(workflow=flow, position=1)
        assert first_failed.state == Step.State.ENDED_RUN
        from keyjobs.control import retry

        retry([flow])
        flow = final(flow)
    assert flow.status == Status.FAILED
    assert [line.split()[1] for line in lines(log) if line.startswith("begin")] == ["ok"]
    assert Invocation.objects.filter(parent=flow, task_name="tests.flows.failing_child").count() == 2


@pytest.mark.django_db(transaction=True)
def test_a_steps_exception_is_raised_again_at_its_position_on_every_replay(tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    flow = flows.catches.delay(log)
    with worker():
        flow = final(flow)
    # KeyError raised again as itself; an exception that cannot be rebuilt is StepFailed, the first time too.
    assert (flow.status, flow.return_value) == (Status.SUCCESS, "KeyError missing; StepFailed"), flow.error
    assert lines(log).count("raises KeyError") == 1 and lines(log).count("raises Unbuildable") == 1
    assert {line for line in lines(log) if line.startswith("caught")} == {"caught KeyError missing; StepFailed"}
    assert lines(log).count("caught KeyError missing; StepFailed") == 2  # the run, and its replay after the sleep
    raised = Step.objects.filter(workflow=flow, kind=Step.Kind.STEP).order_by("position")
    assert [(step.state, step.error_type) for step in raised] == [
        ("RAISED", "builtins.KeyError"), ("RAISED", "tests.flows.Unbuildable")]


@pytest.mark.django_db(transaction=True)
def test_a_step_that_exits_fails_the_workflow_and_the_thread_goes_on(tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    flow = flows.exits_in_a_step.delay(log)
    with worker(threads=1):
        flow = final(flow)
        after = final(flows.loops.delay(3))
    assert (flow.status, flow.error_type) == (Status.FAILED, "builtins.SystemExit")
    assert (after.status, after.return_value) == (Status.SUCCESS, 3)


@pytest.mark.django_db(transaction=True)
def test_cancelling_a_sleeping_workflow_ends_it_at_once() -> None:
    flow = flows.nap.delay("/dev/null", 60)
    with worker():
        wait_for(lambda: status_of(flow) == Status.PAUSED, what="the workflow to sleep")
        assert flow.cancel(by="test")
    assert flow.status == Status.CANCELLED
    assert Invocation.objects.get(pk=flow.pk).runner_id is None


@pytest.mark.django_db(transaction=True)
def test_cancelling_a_workflow_cancels_its_children_that_have_not_started(tmp_path: Path) -> None:
    flow = flows.waits_elsewhere.delay(str(tmp_path / "log"))
    with worker(queues=["default"]):
        wait_for(lambda: status_of(flow) == Status.PAUSED, what="the workflow to wait on its child")
        child = Invocation.objects.get(parent=flow)
        assert Invocation.objects.get(pk=flow.pk).waiting_on_id == child.pk
        assert flow.cancel(by="test")
    child.refresh_from_db()
    assert (flow.status, child.status) == (Status.CANCELLED, Status.CANCELLED)
    assert "its workflow was cancelled" in Event.objects.filter(invocation=child).last().note


@pytest.mark.django_db(transaction=True)
def test_a_workflow_waiting_on_a_child_of_its_own_key_is_refused() -> None:
    flow = flows.same_key.delay("acme")
    with worker():
        flow = final(flow)
    assert (flow.status, flow.error_type) == (Status.FAILED, "keyjobs.exceptions.WaitRefused")
    assert "wait cycle" in flow.error


@pytest.mark.django_db(transaction=True)
def test_a_workflow_holds_its_key_while_it_sleeps(tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    first, second = flows.keyed_nap.delay("acme", log), flows.keyed_nap.delay("acme", log)
    with worker():
        first, second = final(first), final(second)
    assert lines(log) == ["start acme", "end acme", "start acme", "end acme"]


@pytest.mark.django_db(transaction=True)
def test_delay_many_inside_a_workflow_makes_a_step_of_each_call(tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    flow = flows.fan_out.delay(log, 3)
    with worker():
        flow = final(flow)
    assert flow.return_value == ["CHILD-0", "CHILD-1", "CHILD-2"]
    assert [kind for kind, _ in kinds(flow)] == ["CHILD"] * 3


@pytest.mark.django_db(transaction=True)
def test_a_workflow_past_its_cap_of_steps_fails_clearly(settings) -> None:
    settings.KEYJOBS_WORKFLOW_MAX_STEPS = 5
    with worker():
        flow = final(flows.loops.delay(6))
    assert flow.status == Status.FAILED
    assert "passed its cap of 5 steps (KEYJOBS_WORKFLOW_MAX_STEPS)" in flow.error


@pytest.mark.django_db(transaction=True)
def test_workflow_calls_where_they_cannot_be_recorded_are_refused_clearly() -> None:
    with worker():
        nested = final(flows.steps_in_a_step.delay("/dev/null"))
        plain = final(flows.plain_task_using_wf.delay())
    assert "inside an inline step's function" in nested.error
    assert "inside tests.flows.plain_task_using_wf, a task: only a @workflow records steps" in plain.error


def test_outside_a_run_steps_are_plain_calls_and_waits_refused() -> None:
    assert wf.step(int, "3") == 3
    assert isinstance(wf.uuid4(), uuid.UUID) and 0 <= wf.random() < 1
    with pytest.raises(WorkflowError, match="outside a workflow's run"):
        wf.sleep(1)
    with pytest.raises(WorkflowError, match="outside a workflow's run"):
        wf.wait_for_event("x")


def test_a_workflow_must_not_be_async() -> None:
    from keyjobs import TaskDeclarationError, workflow

    async def flow() -> None: ...

    with pytest.raises(TaskDeclarationError, match="a workflow must be a plain function"):
        workflow(name="tests.async_flow")(flow)


def test_diverged_is_a_workflow_error() -> None:
    assert issubclass(WorkflowDiverged, WorkflowError)


@pytest.mark.django_db(transaction=True)
def test_the_admin_shows_a_workflows_steps_in_order_with_their_values_and_errors(tmp_path: Path, admin_client) -> None:
    from django.urls import reverse

    log = str(tmp_path / "log")
    flow = flows.steps_and_values.delay(log)
    caught = flows.catches.delay(log)
    with worker():
        flow, caught = final(flow), final(caught)
    page = admin_client.get(reverse("admin:keyjobs_invocation_change", args=[flow.pk])).content.decode()
    assert "Workflow steps" in page
    child = Invocation.objects.filter(parent=flow).order_by("pk").first()
    assert f'#{child.pk}</a> tests.flows.effect' in page
    assert page.index("Random number") < page.index("tests.flows.make_token")
    assert "tok-acme" in page and result_uuid(flow) in page
    page = admin_client.get(reverse("admin:keyjobs_invocation_change", args=[caught.pk])).content.decode()
    assert "<code>builtins.KeyError</code>" in page and "Raised" in page


def result_uuid(flow: Invocation) -> str:
    return str(flow.return_value["ref"])


# -- crashes: real worker processes, SIGKILLed ------------------------------------------------------------

FAST_LEASE = {"KEYJOBS_HEARTBEAT_INTERVAL": "0.25", "KEYJOBS_LEASE": "1.5"}


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_workflows_resume_across_kills_and_each_completed_step_ran_once(worker_process, tmp_path: Path) -> None:
    import signal
    import time

    from keyjobs.status import OWNED

    log = str(tmp_path / "log")
    flows_ = [flows.chain.delay(log, f"w{number}", 5, 0.3) for number in range(20)]
    runners = [worker_process("--threads", "3", env=FAST_LEASE) for _ in range(2)]
    killed: set[int] = set()
    for kill in range(8):
        slot = kill % 2
        doomed = runners[slot]
        # Killed once it holds work (a workflow's run or a child's), about a second after the last kill.
        time.sleep(1.0)
        deadline = time.monotonic() + 10
        while (time.monotonic() < deadline and not Invocation.objects.filter(
                runner__pid=doomed.process.pid, status__in=sorted(OWNED)).exists()):
            time.sleep(0.05)
        killed.add(doomed.process.pid)
        doomed.process.send_signal(signal.SIGKILL)
        doomed.kill()
        runners[slot] = worker_process("--threads", "3", env=FAST_LEASE)
    ended = [final(flow, timeout=180) for flow in flows_]
    assert [flow.status for flow in ended] == [Status.SUCCESS] * 20, [(f.pk, f.status, f.error) for f in ended]
    effects = lines(log)
    for flow in ended:
        name = flow.args[1]
        assert flow.return_value == [f"{name}-{number}".upper() for number in range(5)]
        # Each child created once, whatever happened to the runs of the workflow.
        assert Invocation.objects.filter(parent=flow).count() == 5
        # The recorded values are the same on every replay.
        noted = {line for line in effects if line.startswith(f"values {name} ")}
        assert len(noted) == 1, noted
        for number in range(5):
            begins = [int(line.split()[2]) for line in effects if line.startswith(f"begin {name}-{number} ")]
            # A step runs again only when the run before it was in a process that was killed.
            assert begins and all(pid in killed for pid in begins[:-1]), (name, number, begins, killed)
    assert Invocation.objects.filter(status=Status.PAUSED).count() == 0
    assert Event.objects.filter(note__startswith="recovered").exists()  # the kills did interrupt runs


# -- faults: an error at any statement of a workflow's steps ----------------------------------------------

FAULT_STEPS = {
    "record a step": (wf.Replay._locked, 2),
    "suspend": (wf.Replay.suspend, 1),
    "resume": (wf._take, 1),
}


def run_two_steps(tmp_path: Path, name: str, injector=None) -> tuple[Invocation, list[str]]:
    from tests.fault_injection import installed

    log = str(tmp_path / f"{name}.log")
    flow = flows.two_steps_and_a_sleep.delay(log)
    # Installed before the runner starts: an injector reaches a thread's connection when it is made (Django's
    # connections are each thread's own), and a runner thread may connect, and claim the flow, at once.
    with installed(injector) if injector is not None else nullcontext(), worker(threads=1):
        flow = final(flow)
    return flow, lines(log)


def fault_cases() -> list[tuple[str, str, str]]:
    return [(step, when, error) for step in FAULT_STEPS for when in ("before", "after")
            for error in ("transient", "refused")]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("step", "when", "error"), fault_cases())
def test_a_fault_at_any_statement_of_a_workflow_step_runs_no_step_twice_and_strands_nothing(
        step: str, when: str, error: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tests.fault_injection import Fault, Injector, clean_recording
    from tests.fault_injection import Step as FaultStep

    function, occurrences = FAULT_STEPS[step]
    fault_step = FaultStep(step, (function,), occurrences)
    clean, (flow, effects) = clean_recording(fault_step, lambda clean: run_two_steps(tmp_path, "clean", clean))
    assert flow.status == Status.SUCCESS and effects == ["one", "two"]
    assert clean.recorded, f"the clean run took no statement of {step}"
    for statement in clean.recorded:
        injector = Injector(fault_step, Fault(statement.number, after=when == "after", transient=error == "transient"))
        caplog.clear()
        flow, effects = run_two_steps(tmp_path, f"{statement.number}", injector)
        case = (f"{injector.fired or 'not fired'}: {flow.status} {flow.error[:300]}; the clean run's statements: "
                f"{[(s.number, s.sql[:60]) for s in clean.recorded]}; this run's: "
                f"{[(s.number, s.sql[:60]) for s in injector.recorded]}, failed of themselves: {injector.failed}")
        assert injector.fired, case
        # Each side effect at most once, whatever the fault; a fault a retry fixes changes nothing at all.
        assert effects.count("one") <= 1 and effects.count("two") <= 1, (case, effects)
        if error == "transient":
            assert (flow.status, effects) == (Status.SUCCESS, ["one", "two"]), case
            # A step whose reply was lost after its commit finds it done, and takes it as its own.
            assert not [record.message for record in caplog.records if "was taken from" in record.message], case
        else:
            assert flow.status in (Status.SUCCESS, Status.FAILED), case
        assert not Invocation.objects.filter(status__in=[Status.RUNNING, Status.PAUSED, Status.PENDING]).exists()


# -- many sleepers: rows, not threads ----------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_a_thousand_sleeping_workflows_hold_no_thread_and_end_soon_after_their_sleep() -> None:
    import time


    count, threads = 1000, 2
    flows.sleeps_and_stamps.delay_many([{"seconds": 2.0} for _ in range(count)])
    most = 0
    with worker(threads=threads) as running:
        deadline = time.monotonic() + 600
        while Invocation.objects.filter(status=Status.SUCCESS).count() < count:
            most = max(most, len(running._pool), len(running.running))
            assert time.monotonic() < deadline, "the workflows did not all end"
            time.sleep(0.05)
    assert most <= threads
    assert not Invocation.objects.exclude(status=Status.SUCCESS).exists()
    # Each ran its step after its sleep's end, and soon after it: how soon depends on the machine's load.
    sleeps = dict(Step.objects.filter(kind=Step.Kind.SLEEP).values_list("workflow_id", "due_at"))
    lags = [invocation.return_value - sleeps[invocation.pk].timestamp()
            for invocation in Invocation.objects.all().only("pk", "return_value")]
    # None before its sleep's end (how soon after is the machine's load's: a bench's figure, not a test's).
    assert min(lags) >= -0.05  # the runner's clock against the database's


@pytest.mark.django_db(transaction=True)
def test_the_admin_restarts_a_failed_workflow_from_a_chosen_step_forgetting_the_records_after_it(
        tmp_path: Path, admin_client) -> None:
    from django.urls import reverse

    log, counter = str(tmp_path / "log"), str(tmp_path / "counter")
    flow = flows.restartable.delay(log, counter)
    with worker():
        flow = final(flow)
        assert flow.status == Status.FAILED
        page = admin_client.get(reverse("admin:keyjobs_invocation_change", args=[flow.pk])).content.decode()
        restart_url = reverse("admin:keyjobs_invocation_restart", args=[flow.pk, 1])
        assert restart_url in page and "restart here" in page
        assert admin_client.get(restart_url).status_code == 405  # POST only
        admin_client.post(restart_url)
        flow = final(flow)
    assert (flow.status, flow.return_value) == (Status.SUCCESS, "tok-first tok-second second time lucky"), flow.error
    # Step 0 was kept; step 1 (and the failed step 2) ran again.
    assert lines(log) == ["token first", "token second", "flaky", "token second", "flaky"]
    assert "restarted from step 1 by admin" in Event.objects.filter(invocation=flow).values_list("note", flat=True)


@pytest.mark.django_db(transaction=True)
def test_a_workflow_restarts_only_from_a_status_a_retry_accepts(tmp_path: Path) -> None:
    from keyjobs.control import restart

    flow = flows.loops.delay(2)
    with worker():
        flow = final(flow)
    assert flow.status == Status.SUCCESS
    assert restart(flow, 0) == []
    assert Step.objects.filter(workflow=flow).count() == 2


# -- what a step costs -------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_replay_at_step_100_reads_the_recorded_steps_in_one_query_and_a_step_is_one_row() -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from keyjobs.execute import execute
    from tests.factories import RunnerFactory

    flow = flows.many_steps_then_an_event.delay(100)
    with worker():
        wait_for(lambda: status_of(flow) == Status.PAUSED, what="the workflow to wait for its event")
    assert Step.objects.filter(workflow=flow).count() == 101  # one row a step: 100 inline steps and the wait
    wf.send(flow, "go")
    runner = RunnerFactory()
    resumed = wf.resume(runner, using="default", queues=[], thread=0)
    assert resumed is not None and resumed.pk == flow.pk
    with CaptureQueriesContext(connection) as queries:
        assert execute(resumed, runner, using="default", thread=0) == Status.SUCCESS
    steps_read = [query["sql"] for query in queries.captured_queries if '"keyjobs_step"' in query["sql"]
                  and query["sql"].lstrip().upper().startswith("SELECT")]
    # The recorded steps in one read; then the wait's own look for its message, under the workflow's lock.
    assert len(steps_read) == 2, steps_read
    assert len(queries.captured_queries) < 20, [query["sql"][:80] for query in queries.captured_queries]
    flow.refresh_from_db()
    assert flow.return_value == sum(range(100))


@pytest.mark.django_db(transaction=True)
def test_an_event_is_sent_from_async_code_and_refused_for_a_task_or_a_bad_name(tmp_path: Path) -> None:
    from keyjobs import ArgumentError
    from tests import jobs

    flow = flows.approval.delay(str(tmp_path / "log"))
    message = asend(flow, "approved", {"by": "an async view"})
    assert (message.workflow_id, message.payload) == (flow.pk, {"by": "an async view"})
    with pytest.raises(WorkflowError, match="which is a task, not a workflow"):
        wf.send(jobs.add.delay(1, 2), "approved")
    with pytest.raises(WorkflowError, match="there is no invocation #0"):
        wf.send(0, "approved")
    with pytest.raises(WorkflowError, match="non-empty string"):
        wf.send(flow, "")
    with pytest.raises(ArgumentError, match="payload"):
        wf.send(flow, "approved", {"not": object()})


# -- a send asked again ---------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_send_asked_again_with_its_idempotency_key_returns_the_first_message_and_the_workflow_takes_one() -> None:
    from keyjobs.models import Message

    flow = flows.approved_twice.delay(0.3)
    first = wf.send(flow, "approved", {"by": "ops"}, idempotency_key="approval-42")
    again = wf.send(flow, "approved", {"by": "ops"}, idempotency_key="approval-42")
    from_async = asend(flow, "approved", {"by": "ops"}, idempotency_key="approval-42")
    assert first.pk == again.pk == from_async.pk
    assert Message.objects.filter(workflow=flow).count() == 1
    with worker():
        flow = final(flow)
    assert (flow.status, flow.return_value) == (Status.SUCCESS, [{"by": "ops"}, None]), flow.error


@pytest.mark.django_db(transaction=True)
def test_a_send_to_a_waiting_workflow_reads_its_row_once_and_makes_it_due() -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    flow = flows.approved_twice.delay(0.3)
    with worker():
        wait_for(lambda: status_of(flow) == Status.PAUSED, what="the workflow to wait for its event")
    with CaptureQueriesContext(connection) as queries:
        wf.send(flow, "approved", {"by": "ops"}, idempotency_key="once")
    reads = [query["sql"] for query in queries.captured_queries
             if query["sql"].lstrip().upper().startswith("SELECT") and 'FROM "keyjobs_invocation"' in query["sql"]]
    assert len(reads) == 1, reads  # its task and its queue, under its row lock
    assert Invocation.objects.get(pk=flow.pk).resume_at is not None


@pytest.mark.django_db(transaction=True)
def test_a_key_names_a_send_to_one_workflow_and_sends_without_one_are_each_a_message() -> None:
    from keyjobs.models import Message

    one, other = flows.approved_twice.delay(0.3), flows.approved_twice.delay(0.3)
    assert wf.send(one, "approved", idempotency_key="k").pk != wf.send(other, "approved", idempotency_key="k").pk
    wf.send(one, "approved")
    wf.send(one, "approved")
    assert Message.objects.filter(workflow=one).count() == 3


@pytest.mark.django_db(transaction=True)
def test_senders_racing_with_one_idempotency_key_make_one_message() -> None:
    from django.db import connection

    from keyjobs.models import Message

    flow = flows.approved_twice.delay(0.3)
    start, sent, failed = threading.Barrier(4), [], []

    def sender() -> None:
        try:
            start.wait(5)
            sent.append(wf.send(flow, "approved", {"by": "ops"}, idempotency_key="approval-42").pk)
        except Exception as exc:
            failed.append(exc)
        finally:
            connection.close()

    senders = [threading.Thread(target=sender) for _ in range(4)]
    for thread in senders:
        thread.start()
    for thread in senders:
        thread.join(30)
    assert not failed and len(set(sent)) == 1 and len(sent) == 4, (failed, sent)
    assert Message.objects.filter(workflow=flow).count() == 1


@pytest.mark.django_db(transaction=True)
def test_the_database_refuses_a_second_message_of_an_idempotency_key() -> None:
    from django.db import IntegrityError

    from keyjobs.models import Message

    flow = flows.approved_twice.delay(0.3)
    Message.objects.create(workflow=flow, name="approved", idempotency_key="k")
    with pytest.raises(IntegrityError):
        Message.objects.create(workflow=flow, name="approved", idempotency_key="k")


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("key", ["", "k" * 201, 42, b"bytes"])
def test_a_bad_idempotency_key_is_refused_when_send_is_called(key) -> None:
    from keyjobs.models import Message

    flow = flows.approved_twice.delay(0.3)
    with pytest.raises(WorkflowError, match="idempotency_key must be a non-empty string of at most 200"):
        wf.send(flow, "approved", idempotency_key=key)
    assert not Message.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_send_that_meets_an_error_at_any_statement_asked_again_with_its_key_strands_nothing_and_makes_one_message(
) -> None:
    """Before each of its statements, and after its commit with the reply lost; transient and refused: the
    caller asks again with the same key, and its suspended workflow gets one message and takes it."""
    from django.db import close_old_connections

    from keyjobs.models import Message
    from tests.fault_injection import Fault, Injector, commits, installed
    from tests.fault_injection import Step as Statements

    waiting = [flows.approved_twice.delay(0.3) for _ in range(14)]
    with worker():
        wait_for(lambda: Invocation.objects.filter(pk__in=[f.pk for f in waiting], status=Status.PAUSED).count()
                 == len(waiting), what="the workflows to wait for their event")
    probe, *flows_left = waiting
    sending = Statements("send", (wf.send,))
    with installed(Injector(sending)) as recording:
        wf.send(probe, "approved", {"n": "probe"}, idempotency_key="probe")
    faults = [Fault(statement.number, after=after, transient=transient)
              for after, statements in ((False, recording.recorded), (True, commits(recording.recorded)))
              for statement in statements for transient in (True, False)]
    assert any(fault.after for fault in faults) and len(faults) <= len(flows_left), faults
    for flow, fault in zip(flows_left, faults, strict=False):
        with installed(Injector(sending, fault)) as injector, pytest.raises(Exception, match="injected"):
            wf.send(flow, "approved", {"n": flow.pk}, idempotency_key=f"approval-{flow.pk}")
        assert injector.fired, fault
        close_old_connections()  # as the next request does: a lost connection is given up
        wf.send(flow, "approved", {"n": flow.pk}, idempotency_key=f"approval-{flow.pk}")  # the caller asks again
        assert Message.objects.filter(workflow=flow).count() == 1, fault
    for flow in flows_left[len(faults):]:
        wf.send(flow, "approved", {"n": flow.pk}, idempotency_key=f"approval-{flow.pk}")
    with worker():
        ended = [final(flow) for flow in waiting]
    for flow, fault in zip(ended[1:], faults, strict=False):
        assert (flow.status, flow.return_value) == (Status.SUCCESS, [{"n": flow.pk}, None]), (fault, flow.error)
    assert ended[0].return_value == [{"n": "probe"}, None]


@pytest.mark.django_db(transaction=True)
def test_a_recorded_step_clears_the_deaths_counted_against_the_workflows_run(tmp_path: Path) -> None:
    flow = flows.nap.delay(str(tmp_path / "log"), 0.2)
    Invocation.objects.filter(pk=flow.pk).update(recoveries=3)  # three deaths, each at an earlier step
    with worker():
        flow = final(flow)
    assert (flow.status, flow.recoveries) == (Status.SUCCESS, 0)
