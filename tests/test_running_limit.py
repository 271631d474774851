"""running_limit: N runs of a key at once, stored per invocation, held by the database; and the order keys take turns."""

import signal
import time
from collections import defaultdict

import pytest
from django.db import IntegrityError, transaction

from keyjobs import ArgumentError, Mode, Status, TaskDeclarationError, task
from keyjobs.admission import KeyState, Policy, Verdict, admit, free_slots
from keyjobs.claim import claim, wake_next
from keyjobs.execute import execute
from keyjobs.models import Event, Invocation, Runner
from tests import jobs
from tests.factories import InvocationFactory, RunnerFactory
from tests.waiting import wait_for

KEYS = {"running_concurrency": Mode.KEYS, "key_arguments": ("account_id",)}


def claim_one(runner):
    claimed = claim(runner, using="default")
    return claimed[0] if claimed else None


def statuses(*invocations):
    return [Invocation.objects.get(pk=inv.pk).status for inv in invocations]


# -- admission ---------------------------------------------------------------------------


def test_admission_starts_in_the_lowest_free_slot():
    assert admit(Policy(), KeyState(held={0, 2}, limit=3)) == admit(Policy(), KeyState(held={2, 0}, limit=3))
    assert admit(Policy(), KeyState(held={0, 2}, limit=3)).slot == 1


def test_admission_leaves_free_slots_to_the_work_ahead_in_the_key():
    assert admit(Policy(), KeyState(held={0}, ahead=1, limit=3)).slot == 2
    assert admit(Policy(), KeyState(held={0}, ahead=2, limit=3)).verdict is Verdict.PARK


def test_admission_drops_what_a_full_key_blocks_for_a_task_that_drops():
    assert admit(Policy(park_blocked=False), KeyState(held={0, 1}, limit=2)).verdict is Verdict.DROP


def test_free_slots_are_those_below_the_limit_nobody_holds():
    assert free_slots(4, {1, 3}) == [0, 2]
    assert free_slots(1, {0}) == []


# -- declaration -------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [0, -1, 1.5, True, "3", 40_000])
def test_a_running_limit_that_is_not_a_positive_whole_number_is_refused(limit):
    with pytest.raises(TaskDeclarationError, match=r"running_limit=.* must be a whole number from 1"):

        @task(**KEYS, running_limit=limit)
        def f(account_id): ...


def test_a_running_limit_without_running_concurrency_is_refused():
    with pytest.raises(TaskDeclarationError, match="running_limit=3 needs running_concurrency"):

        @task(running_limit=3)
        def f(account_id): ...


def test_a_running_limit_function_must_take_the_key_arguments():
    def by_region(region): ...

    with pytest.raises(TaskDeclarationError, match=r"running_limit=.*by_region cannot be called with account_id"):

        @task(**KEYS, running_limit=by_region)
        def f(account_id, region): ...


def test_round_robin_must_be_a_bool_and_needs_running_concurrency():
    with pytest.raises(TaskDeclarationError, match="round_robin='yes' must be True or False"):

        @task(**KEYS, round_robin="yes")
        def f(account_id): ...

    with pytest.raises(TaskDeclarationError, match="round_robin=True needs running_concurrency"):

        @task(round_robin=True)
        def g(account_id): ...


def test_the_declared_limit_reads_back():
    assert jobs.keyed.running_limit == 1
    assert jobs.keyed_two_slots.running_limit == 2
    assert jobs.keyed_tiered.running_limit is jobs.tier_limit
    assert jobs.keyed_two_slots_round_robin.round_robin is True


# -- delay(): the stored limit -----------------------------------------------------------

@pytest.mark.django_db
def test_delay_stores_the_limit_with_the_invocation():
    assert jobs.keyed_two_slots.delay("acme", "a").running_limit == 2
    assert jobs.keyed.delay("acme", "a").running_limit == 1
    assert jobs.add.delay(1).running_limit == 1


@pytest.mark.django_db
def test_a_limit_function_is_called_with_the_key_arguments_at_delay():
    gold, plain = jobs.keyed_tiered.delay("gold-1", "a"), jobs.keyed_tiered.delay("acme", "a")
    assert [gold.running_limit, plain.running_limit] == [2, 1]
    assert list(Invocation.objects.order_by("pk").values_list("running_limit", flat=True)) == [2, 1]


@pytest.mark.django_db
@pytest.mark.parametrize("account", ["zero", "text", "yes"])
def test_a_limit_function_answering_anything_but_a_positive_whole_number_fails_the_delay(account):
    with pytest.raises(ArgumentError, match=r"tests\.jobs\.keyed_bad_tier\.delay\(\): running_limit returned"):
        jobs.keyed_bad_tier.delay(account)
    assert not Invocation.objects.exists()


@pytest.mark.django_db
def test_a_task_scope_limit_is_one_key_of_n_slots():
    calls = jobs.three_at_once.delay_many([((n,), {}) for n in range(5)])
    assert [inv.status for inv in calls] == [Status.REGISTERED] * 3 + [Status.REROUTED] * 2


# -- the database holds the limit --------------------------------------------------------


@pytest.mark.django_db
def test_the_database_refuses_an_owner_in_a_slot_at_or_past_its_limit():
    runner = RunnerFactory()
    with pytest.raises(IntegrityError), transaction.atomic():
        InvocationFactory(task_name=jobs.keyed_two_slots.name, running_key='{"account_id":"acme"}',
                          running_limit=2, slot=2, status=Status.RUNNING, runner=runner)


@pytest.mark.django_db
def test_the_database_refuses_two_owners_of_one_slot():
    runner = RunnerFactory()
    owned = {"task_name": jobs.keyed_two_slots.name, "running_key": '{"account_id":"acme"}', "running_limit": 2,
             "status": Status.RUNNING, "runner": runner}
    InvocationFactory(**owned, slot=0)
    InvocationFactory(**owned, slot=1)
    with pytest.raises(IntegrityError), transaction.atomic():
        InvocationFactory(**owned, slot=1)


# -- enqueue fills every slot; a busy key's new work is parked at once -------------------


@pytest.mark.django_db
def test_delay_many_fills_every_slot_of_a_key_at_once():
    calls = jobs.keyed_two_slots.delay_many([(("acme", op), {}) for op in "abcde"])
    assert [inv.status for inv in calls] == [Status.REGISTERED] * 2 + [Status.REROUTED] * 3
    assert statuses(*calls) == [inv.status for inv in calls]


@pytest.mark.django_db
def test_delay_many_fills_each_tier_to_its_own_limit():
    calls = jobs.keyed_tiered.delay_many([((account, op), {}) for account in ("gold-1", "acme") for op in "abc"])
    assert [inv.status for inv in calls] == [Status.REGISTERED, Status.REGISTERED, Status.REROUTED,
                                             Status.REGISTERED, Status.REROUTED, Status.REROUTED]


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_delay_whose_key_is_busy_is_created_parked():
    first, second = jobs.keyed_two_slots.delay("acme", "a"), jobs.keyed_two_slots.delay("acme", "b")
    third = jobs.keyed_two_slots.delay("acme", "c")
    other = jobs.keyed_two_slots.delay("globex", "a")
    assert statuses(first, second, third, other) == [Status.REGISTERED, Status.REGISTERED, Status.REROUTED,
                                                     Status.REGISTERED]
    assert third.status == Status.REROUTED
    assert list(Event.objects.filter(invocation=third).values_list("from_status", "to_status", "note")) == [
        ("", Status.REROUTED, "parked at enqueue: its key was busy")]


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_delay_of_higher_priority_is_not_parked_behind_waiting_work_of_lower_priority():
    assert jobs.keyed.delay("acme", "a").status == Status.REGISTERED
    assert jobs.keyed.delay("acme", "b").status == Status.REROUTED
    urgent = jobs.keyed.using(priority=5).delay("acme", "c")
    assert urgent.status == Status.REGISTERED


@pytest.mark.sqlite
@pytest.mark.django_db(transaction=True)
def test_on_sqlite_a_delay_of_a_busy_key_is_created_registered_and_the_claim_parks_it():
    """Parking at enqueue is PostgreSQL's (one statement); on SQLite it would double a keyed delay()'s cost."""
    runner = RunnerFactory()
    first, second = jobs.keyed.delay("acme", "a"), jobs.keyed.delay("acme", "b")
    assert statuses(first, second) == [Status.REGISTERED, Status.REGISTERED]
    assert claim_one(runner).pk == first.pk
    assert claim_one(runner) is None
    assert statuses(first, second) == [Status.PENDING, Status.REROUTED]


@pytest.mark.django_db
def test_a_delay_inside_a_transaction_is_created_registered_and_the_claim_parks_it():
    jobs.keyed.delay("acme", "a")
    assert jobs.keyed.delay("acme", "b").status == Status.REGISTERED


@pytest.mark.django_db(transaction=True)
def test_a_parked_delay_is_woken_when_its_key_frees():
    runner = RunnerFactory()
    first = jobs.keyed_two_slots.delay("acme", "a")
    jobs.keyed_two_slots.delay("acme", "b")
    third = jobs.keyed_two_slots.delay("acme", "c")
    taken = claim_one(runner)
    assert taken.pk == first.pk
    execute(taken, runner, using="default")
    assert statuses(third) == [Status.REGISTERED]


# -- claims and wake-ups -----------------------------------------------------------------


@pytest.mark.django_db
def test_a_freed_slot_wakes_as_many_as_are_free():
    runner = RunnerFactory()
    calls = jobs.keyed_two_slots.delay_many([(("acme", op), {}) for op in "abcd"])
    first, second = claim_one(runner), claim_one(runner)
    assert {first.slot, second.slot} == {0, 1}
    # Both owners end without waking (as a runner that died would): the duty's wake-up fills both slots.
    Invocation.objects.filter(pk__in=[first.pk, second.pk]).update(status=Status.SUCCESS)
    with transaction.atomic():
        woken = wake_next(jobs.keyed_two_slots.name, first.running_key, using="default").woken
    assert sorted(woken) == [calls[2].pk, calls[3].pk]


@pytest.mark.django_db
@pytest.mark.parametrize(("now", "woken"), [(1, 2), (3, 1)], ids=["lowered", "raised"])
def test_a_freed_key_wakes_by_the_limit_its_invocations_stored_not_the_tasks_current_one(settings, now, woken):
    # Stored at delay(): 2 slots. A deploy then changes the task's running_limit; the invocations already
    # made keep theirs, and the wake-up gives their key the slots they stored.
    runner = RunnerFactory()
    calls = jobs.keyed_two_slots.delay_many([(("acme", op), {}) for op in "abcde"])
    settings.KEYJOBS_TASK_OPTIONS = {jobs.keyed_two_slots.name: {"running_limit": now}}
    first, second = claim_one(runner), claim_one(runner)
    assert {first.slot, second.slot} == {0, 1}
    # Owners that end without waking (as a runner that died would): one, or both.
    ended = [first, second] if woken == 2 else [first]
    Invocation.objects.filter(pk__in=[inv.pk for inv in ended]).update(status=Status.SUCCESS)
    with transaction.atomic():
        done = wake_next(jobs.keyed_two_slots.name, first.running_key, using="default")
    assert sorted(done.woken) == [inv.pk for inv in calls[2:2 + woken]]
    assert statuses(*calls[2 + woken:]) == [Status.REROUTED] * (3 - woken)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_two_owners_ending_at_once_each_wake_a_parked_invocation_of_their_key():
    # Each waker sees the other owner still running (its end is not committed): one free slot each, the
    # same first parked invocation. The second waits for the first's commit, finds that one woken, and
    # looks again: the key's second parked invocation goes on too.
    import threading

    from django.db import connection, connections

    runner = RunnerFactory()
    of_key = {"task_name": jobs.keyed_two_slots.name, "running_key": '{"account_id":"acme"}', "running_limit": 2}
    owners = [InvocationFactory(**of_key, status=Status.RUNNING, runner=runner, slot=slot) for slot in (0, 1)]
    parked = [InvocationFactory(**of_key, status=Status.REROUTED) for _ in range(3)]
    first_woke, second_waits = threading.Event(), threading.Event()
    found = {}

    def end(owner, name, before_commit):
        try:
            with transaction.atomic():
                Invocation.objects.filter(pk=owner.pk).update(status=Status.SUCCESS)
                found[name] = wake_next(owner.task_name, owner.running_key, using="default").woken
                before_commit()
        finally:
            connections.close_all()

    def first_commits_once_the_second_waits():
        first_woke.set()
        second_waits.wait(30)

    def waiting_on_a_lock():
        # Read outside any transaction: pg_stat_activity is a snapshot taken once per transaction.
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                           "AND datname = current_database()")
            return cursor.fetchone()[0]

    first = threading.Thread(target=end, args=(owners[0], "first", first_commits_once_the_second_waits))
    first.start()
    assert first_woke.wait(30)
    second = threading.Thread(target=end, args=(owners[1], "second", lambda: None))
    second.start()
    wait_for(lambda: waiting_on_a_lock() > 0, timeout=30, what="the second waker to wait on the first")
    second_waits.set()
    first.join(60)
    second.join(60)
    assert found["first"] == [parked[0].pk]
    assert found["second"] == [parked[1].pk]
    assert statuses(*parked) == [Status.REGISTERED, Status.REGISTERED, Status.REROUTED]


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_hand_off_that_loses_its_slot_to_another_claim_records_the_outcome_and_wakes_instead():
    # The outcome frees slot 2 of a key of three; slot 1 is free too, and the hand-off takes the lowest.
    # Another runner claims the key's registered call into slot 1 meanwhile: the hand-off loses at the
    # unique index, and the outcome is recorded all the same, the parked call woken instead of handed.
    import threading
    from datetime import timedelta

    from django.db import connection, connections
    from django.utils import timezone

    from keyjobs.claim import Claimer
    from keyjobs.execute import Outcome, finish

    runner, other = RunnerFactory(), RunnerFactory()
    of_key = {"task_name": jobs.record_span_three.name, "running_key": '{"account_id":"acme"}', "running_limit": 3,
              "queue": "default"}
    InvocationFactory(**of_key, status=Status.RUNNING, runner=other, slot=0)
    ours = InvocationFactory(**of_key, status=Status.RUNNING, runner=runner, slot=2)
    parked = InvocationFactory(**of_key, status=Status.REROUTED, registered_at=timezone.now() - timedelta(minutes=1))
    registered = InvocationFactory(**of_key, status=Status.REGISTERED)
    claimed, go_on = threading.Event(), threading.Event()
    found = {}

    def claim_slot_one():
        try:
            with transaction.atomic():
                Invocation.objects.filter(pk=registered.pk).update(status=Status.RUNNING, slot=1, runner=other)
                claimed.set()
                go_on.wait(30)
        finally:
            connections.close_all()

    def record_ours():
        try:
            found["status"] = finish(ours, Outcome(Status.SUCCESS), runner, using="default", thread=0,
                                     claimer=Claimer(runner, 0, None))
        finally:
            connections.close_all()

    def waiting_on_a_lock():
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                           "AND datname = current_database()")
            return cursor.fetchone()[0]

    claiming = threading.Thread(target=claim_slot_one)
    claiming.start()
    assert claimed.wait(30)
    recording = threading.Thread(target=record_ours)
    recording.start()
    wait_for(lambda: waiting_on_a_lock() > 0, timeout=30, what="the hand-off to wait on the other claim")
    go_on.set()
    claiming.join(60)
    recording.join(60)
    assert found["status"] == Status.SUCCESS
    assert statuses(ours, parked, registered) == [Status.SUCCESS, Status.REGISTERED, Status.RUNNING]


@pytest.mark.django_db
def test_a_woken_invocation_keeps_its_place_in_the_queue():
    runner = RunnerFactory()
    hot = jobs.keyed.delay_many([(("hot", op), {}) for op in "ab"])
    cold = jobs.keyed.delay("cold", "a")
    execute(claim_one(runner), runner, using="default")
    # The hot key's second call was enqueued before the cold one: it goes first.
    assert claim_one(runner).pk == hot[1].pk
    assert statuses(cold) == [Status.REGISTERED]


@pytest.mark.django_db(transaction=True)
def test_round_robin_sends_a_woken_invocation_to_the_back_of_the_queue():
    runner = RunnerFactory()
    task = jobs.keyed_two_slots_round_robin
    hot = task.delay_many([(("hot", op), {}) for op in "abc"])
    cold = task.delay("cold", "a")
    time.sleep(0.01)  # the database's clock moves on: the wake-up's stamp comes after the cold call's
    first, second = claim_one(runner), claim_one(runner)
    assert [first.pk, second.pk] == [hot[0].pk, hot[1].pk]
    execute(first, runner, using="default")
    assert claim_one(runner).pk == cold.pk
    assert claim_one(runner).pk == hot[2].pk


@pytest.mark.django_db(transaction=True)
def test_within_a_key_of_two_slots_starts_keep_priority_then_enqueue_order():
    from keyjobs.worker import Worker

    calls = [jobs.keyed_two_slots.delay("acme", str(n)) for n in range(6)]
    urgent = jobs.keyed_two_slots.using(priority=9).delay("acme", "urgent")
    Worker(threads=1, burst=True).run()
    started = list(Invocation.objects.order_by("started_at", "pk").values_list("pk", flat=True))
    assert started == [urgent.pk, *[inv.pk for inv in calls]]


# -- real workers: the maxima are never exceeded -----------------------------------------


def peaks(log):
    """Return each account's largest number of runs in flight at once, from a record_span log."""
    marks = []
    for line in log.read_text().splitlines():
        mark, account, _, at, _ = line.split()
        marks.append((float(at), mark == "S", account))
    in_flight, peak = defaultdict(int), defaultdict(int)
    # At one instant an end comes before a start: touching runs do not overlap.
    for _, starts, account in sorted(marks, key=lambda m: (m[0], m[1])):
        in_flight[account] += 1 if starts else -1
        peak[account] = max(peak[account], in_flight[account])
    return dict(peak)


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_two_worker_processes_never_put_more_than_the_limit_of_a_key_in_flight(worker_process, tmp_path):
    log = tmp_path / "spans.log"
    workers = [worker_process("--threads", "6") for _ in range(2)]
    wait_for(lambda: Runner.objects.active().count() == 2, timeout=60, what="both workers started")
    accounts = ["gold-1", "gold-2", "acme", "globex", "initech"]
    calls = [((account, n, 0.2, str(log)), {}) for n in range(8) for account in accounts]
    # Half in one delay_many, half one delay() at a time: both ways of filling the slots.
    invocations = jobs.record_span_tiered.delay_many(calls[:20])
    invocations += [jobs.record_span_tiered.delay(*args) for args, _ in calls[20:]]
    three = jobs.record_span_three.delay_many([(("triple", n, 0.2, str(log)), {}) for n in range(12)])
    total = len(invocations) + len(three)
    wait_for(lambda: Invocation.objects.finished().count() == total, timeout=120, what="every run final")
    for worker in workers:
        worker.signal(signal.SIGTERM)
        worker.wait(timeout=30)
    assert Invocation.objects.filter(status=Status.SUCCESS).count() == total
    found = peaks(log)
    limits = {"gold-1": 2, "gold-2": 2, "acme": 1, "globex": 1, "initech": 1, "triple": 3}
    assert all(found[account] <= limit for account, limit in limits.items()), found
    # Work-conserving: with twelve threads for 10 slots, each key filled its slots.
    assert found == limits


# -- PostgreSQL's one-statement claim of a key of N slots ---------------------------------


@pytest.mark.postgres
@pytest.mark.django_db
def test_the_one_statement_claim_takes_a_key_of_two_slots_in_admissions_slots():
    from keyjobs.claim import Claimer
    from keyjobs.store import store

    runner = RunnerFactory()
    calls = [jobs.keyed_two_slots.delay("acme", op) for op in "abc"]  # in a transaction: all registered
    steps = store("default").steps

    def claim_head():
        return steps.claim_head(None, 10, fast_tasks=[jobs.keyed_two_slots.name],
                                claim=Claimer(runner, 0, None).claim(start=False))

    # One candidate of a key per statement: two would pick the same slot.
    first, stopped = claim_head()
    assert ([inv.pk for inv in first], [inv.slot for inv in first], stopped) == ([calls[0].pk], [0], True)
    second, _ = claim_head()
    assert ([inv.pk for inv in second], [inv.slot for inv in second]) == ([calls[1].pk], [1])
    third, stopped = claim_head()
    assert (third, stopped) == ([], True)  # both slots held: the general path parks it
    assert statuses(*calls) == [Status.PENDING, Status.PENDING, Status.REGISTERED]


@pytest.mark.django_db
def test_the_orphan_duty_wakes_parked_work_of_a_key_with_a_slot_free():
    from keyjobs.claim import wake_orphans

    runner = RunnerFactory()
    of_key = {"task_name": jobs.keyed_two_slots.name, "running_key": '{"account_id":"acme"}', "running_limit": 2}
    InvocationFactory(**of_key, status=Status.RUNNING, runner=runner, slot=0)
    parked = InvocationFactory(**of_key, status=Status.REROUTED)
    full = {**of_key, "running_key": '{"account_id":"globex"}'}
    InvocationFactory(**full, status=Status.RUNNING, runner=runner, slot=0)
    InvocationFactory(**full, status=Status.RUNNING, runner=runner, slot=1)
    waits = InvocationFactory(**full, status=Status.REROUTED)
    assert wake_orphans(using="default") == [parked.pk]
    assert statuses(parked, waits) == [Status.REGISTERED, Status.REROUTED]
