from datetime import timedelta

import pytest
from django.db import DatabaseError, IntegrityError, connections
from django.utils import timezone

from keyjobs import Mode, Status, task
from keyjobs.claim import claim
from keyjobs.execute import execute
from keyjobs.models import Event, Invocation
from tests import jobs
from tests.factories import RunnerFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def runner():
    return RunnerFactory()


def run_one(task, *args, runner, **kwargs):
    invocation = task.delay(*args, **kwargs)
    [claimed] = claim(runner, using="default")
    status = execute(claimed, runner, using="default", thread=0)
    invocation.refresh_from_db()
    return status, invocation


def test_a_success_stores_the_return_value_and_the_whole_history(runner):
    status, invocation = run_one(jobs.add, 2, runner=runner, b=3)
    assert status == Status.SUCCESS and invocation.result == 5 and invocation.attempts == 1
    assert list(Event.objects.filter(invocation=invocation).values_list("from_status", "to_status")) == [
        ("REGISTERED", "PENDING"), ("PENDING", "RUNNING"), ("RUNNING", "SUCCESS")
    ]
    assert invocation.started_at <= invocation.finished_at


def test_an_exception_is_recorded_with_its_traceback(runner):
    status, invocation = run_one(jobs.boom, "<b>kaput</b>", runner=runner)
    assert status == Status.FAILED
    assert invocation.error == "ValueError: <b>kaput</b>"
    assert 'raise ValueError(message)' in invocation.traceback


BASE_EXCEPTIONS = {"SystemExit": "builtins.SystemExit", "KeyboardInterrupt": "builtins.KeyboardInterrupt",
                   "GeneratorExit": "builtins.GeneratorExit", "Halt": "tests.jobs.Halt"}


@pytest.mark.parametrize("function", [jobs.raise_base, jobs.raise_base_async], ids=["sync", "async"])
@pytest.mark.parametrize("kind", list(BASE_EXCEPTIONS))
def test_a_base_exception_from_the_task_fails_the_run_with_its_class_path_and_traceback(runner, kind, function):
    status, invocation = run_one(function, "acme", kind, runner=runner)
    assert (status, invocation.error_type) == (Status.FAILED, BASE_EXCEPTIONS[kind])
    assert "_raise_base" in invocation.traceback
    assert invocation.running_key is not None and not Invocation.objects.owned().exists(), "its key is free"


def test_an_async_function_is_awaited(runner):
    status, invocation = run_one(jobs.add_async, 2, 2, runner=runner)
    assert (status, invocation.result) == (Status.SUCCESS, 4)


def test_a_result_that_is_not_json_fails_the_invocation(runner):
    status, invocation = run_one(jobs.not_json, runner=runner)
    assert status == Status.FAILED
    assert "result 'return value' is a builtins.set" in invocation.error


def test_a_claimed_invocation_is_not_started_by_a_runner_that_lost_it(runner):
    jobs.add.delay(1)
    [claimed] = claim(runner, using="default")
    thief = RunnerFactory()
    Invocation.objects.filter(pk=claimed.pk).update(runner=thief)
    assert execute(claimed, runner, using="default") is None
    claimed.refresh_from_db()
    assert claimed.status == Status.PENDING


def test_an_outcome_is_not_recorded_by_a_runner_that_lost_the_invocation_while_it_ran(runner):
    jobs.add.delay(1)
    [started] = claim(runner, using="default", start=True)
    assert started.status == Status.RUNNING
    thief = RunnerFactory()
    # Recovered and claimed by another runner while this one was cut off: its outcome must not land.
    Invocation.objects.filter(pk=started.pk).update(runner=thief)
    assert execute(started, runner, using="default") is None
    started.refresh_from_db()
    assert (started.status, started.runner_id, started.return_value) == (Status.RUNNING, thief.pk, None)
    assert not Event.objects.filter(invocation=started, to_status=Status.SUCCESS).exists()


def test_an_outcome_and_the_release_of_its_key_are_one_transaction(runner, monkeypatch):
    import keyjobs.execute

    first = jobs.keyed.delay("acme", "a")
    second = jobs.keyed.delay("acme", "b")
    [claimed] = claim(runner, using="default", start=True)
    assert claim(runner, using="default") == []  # b is parked behind a

    def waking_fails(*args, **kwargs):
        raise RuntimeError("the database went away while waking b")

    monkeypatch.setattr(keyjobs.execute, "wake_next", waking_fails)
    with pytest.raises(RuntimeError):
        execute(claimed, runner, using="default")
    assert statuses(first, second) == [Status.RUNNING, Status.REROUTED]  # neither the outcome nor the wake
    assert not Event.objects.filter(invocation=first, to_status=Status.SUCCESS).exists()


def statuses(*invocations):
    return [Invocation.objects.get(pk=inv.pk).status for inv in invocations]


def test_freeing_a_key_hands_its_parked_successor_to_the_same_thread(runner):
    from keyjobs.claim import Claimer

    jobs.keyed.delay("acme", "a")
    second = jobs.keyed.delay("acme", "b")
    [first] = claim(runner, using="default", start=True, thread=4)
    assert claim(runner, using="default") == []  # b is parked
    handed: list[Invocation] = []
    execute(first, runner, using="default", thread=4, claimer=Claimer(runner, 4, None), handed=handed)
    assert [inv.pk for inv in handed] == [second.pk]
    second.refresh_from_db()
    assert (second.status, second.runner_id, second.runner_thread, second.attempts) == ("RUNNING", runner.pk, 4, 1)
    assert list(Event.objects.filter(invocation=second).values_list("from_status", "to_status"))[-3:] == [
        ("REROUTED", "REGISTERED"), ("REGISTERED", "PENDING"), ("PENDING", "RUNNING")
    ]


def test_a_freed_keys_successor_goes_behind_the_work_already_waiting(runner):
    from keyjobs.claim import Claimer

    jobs.keyed.delay("hot", "a")
    second = jobs.keyed.delay("hot", "b")
    [first] = claim(runner, using="default", start=True)
    assert claim(runner, using="default") == []  # b is parked
    other = jobs.add.delay(1)
    # Waiting for a while (SQLite's clock counts milliseconds: the same tick would fall back on ids).
    Invocation.objects.filter(pk=other.pk).update(registered_at=timezone.now() - timedelta(seconds=1))
    handed: list[Invocation] = []
    execute(first, runner, using="default", claimer=Claimer(runner, 0, None), handed=handed)
    assert Invocation.objects.get(pk=second.pk).status == Status.REGISTERED
    # The thread goes on with the queue's head: on PostgreSQL claimed in the statement that woke b.
    next_runs = handed + claim(runner, using="default", limit=2 - len(handed))
    assert [inv.pk for inv in next_runs] == [other.pk, second.pk]


def test_a_freed_keys_successor_ahead_of_the_waiting_work_is_handed_over_all_the_same(runner):
    from keyjobs.claim import Claimer

    jobs.keyed.delay("hot", "a")
    second = jobs.keyed.delay("hot", "b")
    [first] = claim(runner, using="default", start=True)
    assert claim(runner, using="default") == []  # b is parked
    later = jobs.add.delay(1)  # waiting, but behind b's place: b keeps its place, so it is next anyway
    handed: list[Invocation] = []
    execute(first, runner, using="default", claimer=Claimer(runner, 0, None), handed=handed)
    assert [inv.pk for inv in handed] == [second.pk]
    assert statuses(second, later) == [Status.RUNNING, Status.REGISTERED]


def test_a_freed_slot_hands_over_its_keys_successor_ahead_of_the_waiting_work(runner):
    from keyjobs.claim import Claimer

    calls = [jobs.keyed_two_slots.delay("hot", op) for op in "abc"]
    first, _ = claim(runner, using="default", start=True, limit=3)  # two slots: c is parked
    later = jobs.add.delay(1)
    handed: list[Invocation] = []
    execute(first, runner, using="default", claimer=Claimer(runner, 0, None), handed=handed)
    assert [inv.pk for inv in handed] == [calls[2].pk]
    assert statuses(calls[2], later) == [Status.RUNNING, Status.REGISTERED]


def test_a_round_robin_keys_successor_is_not_handed_over_while_other_work_waits(runner):
    from keyjobs.claim import Claimer

    calls = [jobs.keyed_two_slots_round_robin.delay("hot", op) for op in "abc"]
    first, _ = claim(runner, using="default", start=True, limit=3)
    jobs.add.delay(1)  # enqueued after c, but c goes to the back of the queue when woken
    handed: list[Invocation] = []
    execute(first, runner, using="default", claimer=Claimer(runner, 0, None), handed=handed)
    assert calls[2].pk not in [inv.pk for inv in handed]
    assert Invocation.objects.get(pk=calls[2].pk).status == Status.REGISTERED


def test_a_successor_in_a_queue_the_thread_does_not_serve_is_woken_not_handed(runner):
    from keyjobs.claim import Claimer

    jobs.keyed.delay("acme", "a")
    second = jobs.keyed.using(queue="elsewhere").delay("acme", "b")
    [first] = claim(runner, using="default", start=True, queues=["default", "elsewhere"])
    claim(runner, using="default", queues=["elsewhere"])
    handed: list[Invocation] = []
    execute(first, runner, using="default", claimer=Claimer(runner, 0, ["default"]), handed=handed)
    assert handed == [] and Invocation.objects.get(pk=second.pk).status == Status.REGISTERED


# -- bad data: a value the database would refuse ends the invocation, never the thread ----------

@task(running_concurrency=Mode.KEYS, key_arguments=("key",))
def returns(key: str, what: str) -> object:
    """Return a value no argument may carry: ``what`` names it."""
    return {"nul": "before\x00after", "surrogate": "\ud800", "huge": 10**5000}[what]


@task
def raises(what: str) -> None:
    raise ValueError({"nul": "before\x00after", "surrogate": "lone \udc80", "long": "x" * 1_000_000}[what])


@pytest.mark.parametrize(
    ("what", "reason"),
    [("nul", "is a string that contains a NUL character (at index 6), which PostgreSQL cannot store in JSON"),
     ("surrogate", "is a string that contains the surrogate U+D800"),
     ("huge", "is an integer of more than 4300 digits")],
)
def test_a_result_the_database_would_refuse_fails_with_the_reason_and_frees_its_key(runner, what, reason):
    returns.delay("acme", what)
    follower = returns.delay("acme", "nul")
    [claimed] = claim(runner, using="default")
    assert execute(claimed, runner, using="default") == Status.FAILED
    claimed.refresh_from_db()
    assert claimed.error.startswith(f"tests.test_execute.returns: result 'return value' {reason}")
    assert claimed.error_type == "keyjobs.exceptions.ResultNotStorable"
    assert Invocation.objects.get(pk=follower.pk).status == Status.REGISTERED  # the key freed and woke it


@pytest.mark.parametrize(
    ("what", "error"),
    [("nul", "ValueError: before\\x00after"), ("surrogate", "ValueError: lone \ufffd")],
)
def test_an_exception_message_is_made_storable_and_marked(runner, what, error):
    status, invocation = run_one(raises, what, runner=runner)
    assert status == Status.FAILED
    assert (invocation.error, invocation.error_type) == (error, "builtins.ValueError")
    assert error.removeprefix("ValueError: ") in invocation.traceback


def test_a_huge_exception_message_is_cut_in_the_middle(runner):
    status, invocation = run_one(raises, "long", runner=runner)
    assert status == Status.FAILED and "characters cut by keyjobs" in invocation.error
    assert len(invocation.error) <= 64 * 1024 and len(invocation.traceback) <= 64 * 1024


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("what", ["huge", pytest.param("nul", marks=pytest.mark.postgres)])
def test_an_outcome_the_database_refuses_ends_failed_with_the_reason_and_is_not_retried(runner, what, monkeypatch):
    import keyjobs.execute

    # As if the check before writing had a gap: the write itself is refused (by json.dumps, or by PostgreSQL).
    monkeypatch.setattr(keyjobs.execute.values, "check_result", lambda value, where: 0)
    returns.delay("acme", what)
    follower = returns.delay("acme", "nul")
    [claimed] = claim(runner, using="default")
    assert execute(claimed, runner, using="default", keep_trying=lambda: False) == Status.FAILED
    claimed.refresh_from_db()
    assert claimed.error.startswith("its outcome (SUCCESS) contains ")
    assert Event.objects.filter(invocation=claimed, to_status=Status.FAILED,
                                note="the database refused to store its outcome (SUCCESS)").exists()
    assert Invocation.objects.get(pk=follower.pk).status == Status.REGISTERED


def test_a_refused_start_ends_the_invocation_failed(runner, monkeypatch):
    import keyjobs.execute

    def refused(*args, **kwargs):
        raise IntegrityError("the database refused the start")

    invocation = jobs.add.delay(1)
    [claimed] = claim(runner, using="default", start=False)
    monkeypatch.setattr(keyjobs.execute, "start", refused)
    assert execute(claimed, runner, using="default") == Status.FAILED
    invocation.refresh_from_db()
    assert invocation.status == Status.FAILED and invocation.error.startswith("the database refused to store its start")


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("result", ["small", "large"])
def test_a_hand_off_rolled_back_with_its_outcome_is_never_run(runner, result):
    from keyjobs import values
    from keyjobs.claim import Claimer
    from keyjobs.execute import Outcome, finish
    from keyjobs.models import Value

    jobs.keyed.delay("acme", "a")
    second = jobs.keyed.delay("acme", "b")
    [first] = claim(runner, using="default", start=True, thread=4)
    assert claim(runner, using="default") == []  # b is parked
    outcome = Outcome(Status.SUCCESS, {"return_value": "a"})
    if result == "large":
        # Stored in an outer transaction around the outcome's own: the hand-off commits with it, or not at all.
        report = "x" * 20_000
        large = values.outline_result(report, values.check_result(report, where="a test"))
        assert large is not None
        outcome = Outcome(Status.SUCCESS, {"return_value": None, "result_value_id": large.digest},
                          held=Value(digest=large.digest, data=large.data, size=large.size), returned=report)
    database = connections["default"]
    commit = database._commit

    def lost_at_commit():
        # The connection drops as the outcome's transaction commits: the server rolls it back.
        database._commit = commit
        database.connection.close()
        return commit()

    database._commit = lost_at_commit
    with pytest.raises(DatabaseError):
        finish(first, outcome, runner, using="default", thread=4, claimer=Claimer(runner, 4, None))
    database.close()
    assert statuses(first, second) == [Status.RUNNING, Status.REROUTED]  # all rolled back: b was handed nothing
    assert outcome.handed is None  # so the thread runs nothing: b's key is not its own
