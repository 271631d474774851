import pytest

from keyjobs import Status
from keyjobs.claim import claim, wake_next, wake_orphans
from keyjobs.execute import execute
from keyjobs.models import Event, Invocation
from tests import jobs
from tests.factories import InvocationFactory, RunnerFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def runner():
    return RunnerFactory()


def claim_one(runner, **kwargs):
    claimed = claim(runner, using="default", **kwargs)
    return claimed[0] if claimed else None


def statuses(*invocations):
    return [Invocation.objects.get(pk=inv.pk).status for inv in invocations]


def test_claim_takes_the_oldest_of_the_highest_priority(runner):
    low = jobs.add.delay(1)
    high = jobs.add.using(priority=5).delay(2)
    later_high = jobs.add.using(priority=5).delay(3)
    assert [claim_one(runner).pk for _ in range(3)] == [high.pk, later_high.pk, low.pk]


def test_claim_records_the_owner(runner):
    jobs.add.delay(1)
    claimed = claim_one(runner, thread=2)
    assert (claimed.status, claimed.runner_id, claimed.runner_thread) == (Status.PENDING, runner.pk, 2)


def test_claim_only_serves_its_queues(runner):
    jobs.add.using(queue="other").delay(1)
    assert claim_one(runner, queues=["default"]) is None
    assert claim_one(runner, queues=["other"]) is not None


def test_claim_leaves_work_scheduled_for_later(runner):
    from datetime import timedelta

    jobs.add.using(run_after=timedelta(hours=1)).delay(1)
    assert claim_one(runner) is None


@pytest.mark.parametrize(
    ("task", "first", "blocked", "free"),
    [
        (jobs.serial_per_task, ("acme",), ("globex",), None),
        (jobs.serial_per_arguments, ("acme",), ("acme", "sync"), ("acme", "other")),
        (jobs.keyed, ("acme", "a"), ("acme", "b"), ("globex", "a")),
    ],
    ids=["TASK", "ARGUMENTS", "KEYS"],
)
def test_running_concurrency_parks_what_its_busy_key_blocks(runner, task, first, blocked, free):
    running = task.delay(*first)
    waiting = task.delay(*blocked)
    other = task.delay(*free) if free else None
    assert claim_one(runner).pk == running.pk
    next_claimed = claim_one(runner)
    assert statuses(waiting) == [Status.REROUTED]
    if other is not None:
        assert next_claimed.pk == other.pk
    else:
        assert next_claimed is None


def test_running_concurrency_disabled_runs_everything_at_once(runner):
    for _ in range(3):
        jobs.add.delay(1)
    assert len(claim(runner, using="default", limit=3)) == 3


def test_a_parked_invocation_is_not_looked_at_again_while_its_key_is_busy(runner):
    jobs.keyed.delay("acme", "a")
    jobs.keyed.delay("acme", "b")
    claim_one(runner)
    claim_one(runner)
    parked_events = Event.objects.filter(to_status=Status.REROUTED).count()
    for _ in range(3):
        assert claim_one(runner) is None
    assert Event.objects.filter(to_status=Status.REROUTED).count() == parked_events == 1


def test_finishing_wakes_the_next_parked_invocation_of_the_key_in_order(runner):
    calls = [jobs.keyed.delay("acme", op) for op in "abcd"]
    order = []
    while (claimed := claim_one(runner)) is not None:
        order.append(claimed.kwargs.get("op") or claimed.args[1])
        execute(claimed, runner, using="default")
    assert order == list("abcd")
    assert statuses(*calls) == [Status.SUCCESS] * 4


def test_drop_policy_ends_blocked_work_without_running_it(runner):
    running = jobs.keyed_drop.delay("acme", "a")
    dropped = jobs.keyed_drop.delay("acme", "b")
    other = jobs.keyed_drop.delay("globex", "a")
    assert claim_one(runner).pk == running.pk
    assert claim_one(runner).pk == other.pk
    assert statuses(dropped) == [Status.CONCURRENCY_CONTROLLED_FINAL]
    assert Invocation.objects.get(pk=dropped.pk).started_at is None


def test_drop_policy_runs_work_whose_key_is_free(runner):
    first = jobs.keyed_drop.delay("acme", "a")
    execute(claim_one(runner), runner, using="default")
    second = jobs.keyed_drop.delay("acme", "b")
    execute(claim_one(runner), runner, using="default")
    assert statuses(first, second) == [Status.SUCCESS, Status.SUCCESS]


def test_registration_guard_frees_once_claimed_so_a_new_delay_waits_behind_the_running_one(runner):
    first = jobs.refresh_once.delay("acme")
    assert claim_one(runner).pk == first.pk
    second = jobs.refresh_once.delay("acme")
    third = jobs.refresh_once.delay("acme")
    assert second.pk != first.pk and third.pk == second.pk and third.reused
    assert claim_one(runner) is None
    assert statuses(second) == [Status.REROUTED]


def test_an_unknown_task_fails_and_the_claim_goes_on(runner):
    lost = InvocationFactory(task_name="tests.jobs.renamed_long_ago")
    kept = jobs.add.delay(1)
    assert claim_one(runner).pk == kept.pk
    lost.refresh_from_db()
    assert lost.status == Status.FAILED
    assert "no task named 'tests.jobs.renamed_long_ago'" in lost.error


def test_an_orphaned_parked_invocation_is_woken(runner):
    orphan = InvocationFactory(task_name="tests.jobs.keyed", running_key='{"account_id":"acme"}',
                               status=Status.REROUTED, args=["acme", "a"])
    assert wake_orphans(using="default") == [orphan.pk]
    assert claim_one(runner).pk == orphan.pk


def test_a_new_invocation_behind_an_orphan_wakes_it_and_waits_its_turn(runner):
    orphan = InvocationFactory(task_name="tests.jobs.keyed", running_key='{"account_id":"acme"}',
                               status=Status.REROUTED, args=["acme", "a"])
    newer = jobs.keyed.delay("acme", "b")
    assert claim_one(runner).pk == orphan.pk
    assert statuses(orphan, newer) == [Status.PENDING, Status.REROUTED]


def test_a_claim_respects_a_key_limit_above_one(runner):
    calls = [jobs.keyed_two_slots.delay("acme", op) for op in "abc"]
    first, second = claim_one(runner), claim_one(runner)
    assert [first.pk, second.pk] == [calls[0].pk, calls[1].pk]
    assert {first.slot, second.slot} == {0, 1}
    assert claim_one(runner) is None
    assert statuses(*calls) == [Status.PENDING, Status.PENDING, Status.REROUTED]
    execute(first, runner, using="default")
    # One slot freed: the parked third takes it, in key order.
    assert statuses(calls[2]) == [Status.REGISTERED]
    third = claim_one(runner)
    assert third.pk == calls[2].pk and third.slot == first.slot


def test_wake_next_respects_the_key_limit(runner):
    jobs.keyed.delay("acme", "a")
    jobs.keyed.delay("acme", "b")
    claim_one(runner)
    claim_one(runner)
    assert wake_next("tests.jobs.keyed", '{"account_id":"acme"}', using="default").woken == []


@pytest.mark.parametrize(("args", "kwargs", "message"), [
    ("[1, 2]", {}, "its stored args are a JSON str, not a list"),
    ([1], ["b"], "its stored kwargs are a JSON list, not an object"),
])
def test_stored_arguments_of_the_wrong_shape_fail_that_invocation(runner, args, kwargs, message):
    invocation = jobs.add.delay(1)
    Invocation.objects.filter(pk=invocation.pk).update(args=args, kwargs=kwargs)
    execute(claim_one(runner), runner, using="default")
    invocation.refresh_from_db()
    assert (invocation.status, invocation.error) == (Status.FAILED, message)


def test_stored_arguments_that_no_longer_fit_the_function_fail_at_run_time(runner):
    invocation = jobs.add.delay(1)
    Invocation.objects.filter(pk=invocation.pk).update(kwargs={"c": 3})
    execute(claim_one(runner), runner, using="default")
    invocation.refresh_from_db()
    assert invocation.status == Status.FAILED and "unexpected keyword argument 'c'" in invocation.error


def test_a_batch_claim_takes_the_plain_invocations_at_the_head_together(runner):
    plain = [jobs.add.delay(n) for n in range(3)]
    keyed = jobs.keyed.delay("acme", "a")
    later = jobs.add.delay(9)
    claimed = claim(runner, using="default", limit=10)
    assert [inv.pk for inv in claimed] == [*(inv.pk for inv in plain), keyed.pk, later.pk]
    assert {inv.status for inv in claimed} == {Status.PENDING}


def test_a_batch_claim_respects_its_limit(runner):
    for n in range(5):
        jobs.add.delay(n)
    assert len(claim(runner, using="default", limit=2)) == 2
    assert Invocation.objects.filter(status=Status.REGISTERED).count() == 3


def test_a_claim_that_starts_records_both_steps(runner):
    invocation = jobs.add.delay(1)
    [claimed] = claim(runner, using="default", start=True)
    assert (claimed.status, claimed.attempts) == (Status.RUNNING, 1)
    assert list(Event.objects.filter(invocation=invocation).values_list("from_status", "to_status")) == [
        ("REGISTERED", "PENDING"), ("PENDING", "RUNNING")
    ]


def test_a_busy_keys_registered_backlog_is_parked_in_one_claim(runner):
    calls = [jobs.keyed.delay("acme", str(n)) for n in range(50)]
    other = jobs.keyed.delay("globex", "a")
    claim_one(runner)  # acme 0 runs
    parking = Event.objects.filter(to_status=Status.REROUTED)
    assert claim_one(runner).pk == other.pk  # acme 1..49 parked on the way, in one transaction
    assert parking.count() == 49
    assert set(statuses(*calls[1:])) == {Status.REROUTED}


def test_parking_a_backlog_keeps_the_keys_order(runner):
    calls = [jobs.keyed.delay("acme", str(n)) for n in range(6)]
    order = []
    while (claimed := claim_one(runner)) is not None:
        order.append(claimed.pk)
        execute(claimed, runner, using="default")
    assert order == [inv.pk for inv in calls]


@pytest.mark.parametrize(("queues", "index"), [(None, "keyjobs_claim"), (["default"], "keyjobs_claim_by_queue")])
def test_the_claim_query_reads_its_index_in_order(queues, index):
    from django.db import connection, transaction

    InvocationFactory.create_batch(500, status=Status.SUCCESS)
    jobs.add.delay_many([((n,), {}) for n in range(300)])  # a backlog: reading in order beats sorting it
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    from keyjobs.store import store

    query, params = store("default").claimable_sql('"id"', queues, 1)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(connection.ops.explain_query_prefix() + " " + query, params)
        plan = "\n".join(str(row[-1]) for row in cursor.fetchall())
    assert f"{index} " in plan or f"{index}\n" in plan or plan.endswith(index) or f'"{index}"' in plan, plan
    assert "TEMP B-TREE" not in plan and "Sort" not in plan, f"the claim sorts instead of reading in order:\n{plan}"
