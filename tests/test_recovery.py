from typing import Any

import pytest
from django.db.models.functions import Now

from keyjobs import Status
from keyjobs.claim import claim
from keyjobs.control import retry
from keyjobs.execute import Outcome, finish, start
from keyjobs.models import Event, Invocation, Runner
from keyjobs.recovery import recover_dead_runner, recover_lost_runners
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


def died_running(runner: Runner, alive: Runner, task: Any = None, *args: Any) -> Invocation:
    """Delay a call of ``task`` (default jobs.keyed), have ``runner`` start it, and declare ``runner`` lost."""
    invocation = (task or jobs.keyed).delay(*(args or ("acme", "a")))
    [claimed] = claim(runner, using="default", start=True)
    assert claimed.pk == invocation.pk
    silence(runner)
    recover_lost_runners(using="default", lease=30, by=alive)
    invocation.refresh_from_db()
    return invocation


def test_each_death_of_its_runner_while_it_ran_is_counted_and_it_runs_again():
    alive = RunnerFactory()
    invocation = died_running(RunnerFactory(host="box", pid=7), alive)
    assert (invocation.status, invocation.recoveries) == (Status.REGISTERED, 1)
    recovered = Event.objects.filter(invocation=invocation).last()
    assert "while running it (death 1); it runs again" in recovered.note


def test_a_run_whose_runner_dies_past_its_max_recoveries_ends_failed_naming_the_deaths_and_frees_its_key():
    alive = RunnerFactory()
    dead = [RunnerFactory(host=f"box{n}", pid=100 + n) for n in range(4)]
    invocation = died_running(dead[0], alive)
    next_of_key = jobs.keyed.delay("acme", "next")
    for runner in dead[1:]:
        invocation = _die_again(invocation, runner, alive)
    assert invocation.status == Status.FAILED
    assert invocation.recoveries == 3 and invocation.attempts == 4
    assert invocation.error_type == "keyjobs.exceptions.RunnerDied"
    assert invocation.error.startswith("Its runner died 4 times while running it, past its max_recoveries of 3: ")
    for runner in dead:
        assert f"runner {runner.pk} ({runner.host}:{runner.pid}) stopped heartbeating" in invocation.error
    assert invocation.error.endswith("it is not run again")
    # Its key is free: the next call of the key goes on.
    assert [inv.pk for inv in claim(alive, using="default")] == [next_of_key.pk]


def _die_again(invocation: Invocation, runner: Runner, alive: Runner) -> Invocation:
    [claimed] = claim(runner, using="default", start=True)
    assert claimed.pk == invocation.pk
    silence(runner)
    recover_lost_runners(using="default", lease=30, by=alive)
    invocation.refresh_from_db()
    return invocation


def test_max_recoveries_is_the_tasks_own_and_settings_may_change_it(settings):
    alive = RunnerFactory()
    settings.KEYJOBS_TASK_OPTIONS = {jobs.keyed.name: {"max_recoveries": 0}}
    invocation = died_running(RunnerFactory(), alive)
    assert invocation.status == Status.FAILED
    assert invocation.error.startswith("Its runner died 1 times while running it, past its max_recoveries of 0")


def test_a_death_before_the_start_or_while_paused_is_not_counted():
    dead, alive = RunnerFactory(), RunnerFactory()
    pending = jobs.add.delay(1)
    paused = jobs.keyed.delay("acme", "a")
    claim(dead, using="default", limit=2)
    Invocation.objects.filter(pk=paused.pk).update(status=Status.PAUSED)
    silence(dead)
    recover_lost_runners(using="default", lease=30, by=alive)
    for invocation in (pending, paused):
        invocation.refresh_from_db()
        assert (invocation.status, invocation.recoveries) == (Status.REGISTERED, 0)


def test_a_death_its_supervisor_caused_knowing_why_is_not_counted():
    dead, supervisor = RunnerFactory(), RunnerFactory()
    invocation = jobs.keyed.delay("acme", "a")
    claim(dead, using="default", start=True)
    recover_dead_runner(dead.pk, using="default", by=supervisor, why="was killed as its supervisor stopped",
                        counted=False)
    invocation.refresh_from_db()
    assert (invocation.status, invocation.recoveries) == (Status.REGISTERED, 0)


def test_recovery_goes_on_when_the_task_module_cannot_be_imported():
    # Importing a task's module runs its code, which may raise anything: the default max_recoveries applies.
    alive = RunnerFactory()
    invocation = died_running(RunnerFactory(), alive)
    Invocation.objects.filter(pk=invocation.pk).update(task_name="tests.broken_tasks.anything", recoveries=3)
    dead = RunnerFactory()
    Invocation.objects.filter(pk=invocation.pk).update(status=Status.RUNNING, runner=dead)
    silence(dead)
    assert recover_lost_runners(using="default", lease=30, by=alive) == [invocation.pk]
    invocation.refresh_from_db()
    assert invocation.status == Status.FAILED and "past its max_recoveries of 3" in invocation.error


def test_a_retry_by_hand_gives_as_many_recoveries_again():
    alive = RunnerFactory()
    invocation = died_running(RunnerFactory(), alive)
    Invocation.objects.filter(pk=invocation.pk).update(status=Status.FAILED, recoveries=3)
    assert retry([invocation]) == [invocation.pk]
    invocation.refresh_from_db()
    assert (invocation.status, invocation.recoveries) == (Status.REGISTERED, 0)


@pytest.mark.parametrize("call", [lambda: jobs.add.delay(1), lambda: jobs.keyed.delay("acme", "a"),
                                  lambda: jobs.rated.delay("acme", 1)], ids=["plain", "keyed", "rate-limited"])
def test_a_runner_declared_lost_claims_nothing(call):
    # It may not know yet (its heartbeat tells it): whatever it took now, no recovery would find again.
    lost, alive = RunnerFactory(), RunnerFactory()
    waiting = call()
    silence(lost)
    assert recover_lost_runners(using="default", lease=30, by=alive) == []
    assert claim(lost, using="default", start=True) == []
    waiting.refresh_from_db()
    assert waiting.status == Status.REGISTERED and waiting.runner_id is None
    [taken] = claim(alive, using="default", start=True)
    assert taken.pk == waiting.pk


@pytest.mark.parametrize("task", [jobs.keyed, jobs.rated], ids=["one statement on PostgreSQL", "general path"])
def test_a_runner_declared_lost_is_handed_nothing_when_it_frees_a_key(task):
    from keyjobs.claim import Claimer, wake_next

    lost = RunnerFactory()
    task.delay("acme", "a")
    second = task.delay("acme", "b")
    [first] = claim(lost, using="default", start=True, thread=0)
    assert claim(lost, using="default") == []  # b is parked
    Invocation.objects.filter(pk=first.pk).update(status=Status.SUCCESS)  # as its outcome leaves it
    Runner.objects.filter(pk=lost.pk).update(stopped_at=Now(), lost=True)
    woken = wake_next(first.task_name, first.running_key, using="default", runner=lost,
                      claimer=Claimer(lost, 0, None))
    assert woken.handed is None and woken.woken == [second.pk]  # woken for the live runners instead
    second.refresh_from_db()
    assert second.status == Status.REGISTERED


@pytest.mark.django_db(transaction=True)
@pytest.mark.postgres
def test_a_claim_racing_the_recovery_of_its_runner_is_found_by_it_or_takes_nothing():
    # Recovery locks the runner's row to declare it lost; a claim for it locks that row too, until it commits.
    import threading

    from django.db import connection, connections, transaction

    lost, alive = RunnerFactory(), RunnerFactory()
    waiting = jobs.add.delay(1)
    silence(lost)
    declared, claimed = threading.Event(), []

    def claimer() -> None:
        declared.wait(10)
        try:
            claimed.extend(claim(lost, using="default", start=True))  # waits for the recovery's commit
        finally:
            connections.close_all()

    thread = threading.Thread(target=claimer)
    thread.start()
    with transaction.atomic():
        recovered = recover_lost_runners(using="default", lease=30, by=alive)
        declared.set()
        # The claim is in flight now, waiting for the runner's row; the recovery commits after a moment.
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_sleep(0.5)")
    thread.join(10)
    assert recovered == [] and claimed == []
    waiting.refresh_from_db()
    assert waiting.status == Status.REGISTERED


def test_a_runner_declared_lost_resumes_no_workflow():
    from datetime import timedelta

    from django.utils import timezone

    from keyjobs import workflows
    from tests import flows

    lost, alive = RunnerFactory(), RunnerFactory()
    flow = flows.steps_and_values.delay("log")
    # Suspended, and due: PAUSED with no runner, its sleep over.
    Invocation.objects.filter(pk=flow.pk).update(status=Status.PAUSED, runner=None,
                                                 resume_at=timezone.now() - timedelta(seconds=1))
    Runner.objects.filter(pk=lost.pk).update(stopped_at=Now(), lost=True)
    assert workflows.resume(lost, using="default", queues=[], thread=0) is None
    assert workflows.resume(alive, using="default", queues=[], thread=0).pk == flow.pk
