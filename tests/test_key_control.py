"""Keys an operator holds: paused, a running limit or rate overridden until a time, its waiting work cancelled.

The rule is admission's (``admission.Control``); these tests drive it through
real workers and both claim paths (PostgreSQL's one statement cuts at a
controlled key and the general path decides it), and through ``control``'s
actions, each safe to repeat after a reply lost past its commit.
"""

from datetime import timedelta

import pytest
from django.db import IntegrityError, close_old_connections, transaction
from django.db.models.functions import Now
from django.utils import timezone

from keyjobs import ArgumentError, Status
from keyjobs.admission import Control, KeyState, Policy, Rate, Verdict, admit, room, under
from keyjobs.claim import claim, releases, wake_orphans
from keyjobs.control import cancel_waiting, override_key, pause_key, restore_key, resume_key
from keyjobs.execute import execute
from keyjobs.models import Event, Invocation, KeyAction, KeyControl
from keyjobs.worker import Worker
from tests import jobs
from tests.factories import RunnerFactory
from tests.fault_injection import Fault, Injector, Step, commits, installed

LATER = timedelta(hours=1)


def key_of(invocation):
    return invocation.task_name, invocation.running_key


def statuses(*invocations):
    return [Invocation.objects.get(pk=inv.pk).status for inv in invocations]


def drain():
    """Run a real worker (two threads) until nothing it may claim is left."""
    Worker(threads=2, burst=True).run()


# -- admission -----------------------------------------------------------------------------


def test_a_paused_key_parks_its_work_even_for_a_task_that_drops_blocked_work():
    assert admit(Policy(park_blocked=False), KeyState(paused=True)).verdict is Verdict.PARK
    assert admit(Policy(), KeyState(held={0}, paused=True)).verdict is Verdict.PARK
    assert under(Policy(park_blocked=False), Control(paused=True)).park_blocked


def test_a_paused_key_has_no_room_to_wake_into():
    assert room(KeyState(limit=3, held={1})) == [0, 2]
    assert room(KeyState(limit=3, held={1}, paused=True)) == []


def test_an_override_replaces_the_limit_and_the_rate_and_leaves_the_rest():
    policy = Policy(rate=Rate(10, 60.0), round_robin=True)
    assert under(policy, Control(rate=Rate(1, 3600.0))) == Policy(rate=Rate(1, 3600.0), round_robin=True)
    assert under(policy, Control(limit=3)) == policy
    assert under(policy, None) is policy
    assert Control(limit=3).limit_for(1) == 3
    assert Control().limit_for(2) == 2


# -- pause and resume ----------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_paused_keys_work_waits_parked_while_other_keys_run_then_runs_in_order_after_resume():
    acme = [jobs.keyed.delay("acme", str(n)) for n in range(3)]
    globex = [jobs.keyed.delay("globex", str(n)) for n in range(2)]
    assert pause_key(*key_of(acme[0]), by="alice")
    drain()
    assert statuses(*globex) == [Status.SUCCESS] * 2
    assert statuses(*acme) == [Status.REROUTED] * 3  # waiting, not dropped
    assert Event.objects.filter(invocation=acme[0], note="its key is paused: parked until it resumes").exists()
    assert resume_key(*key_of(acme[0]), by="bob")
    drain()
    assert statuses(*acme) == [Status.SUCCESS] * 3
    started = list(Invocation.objects.filter(pk__in=[inv.pk for inv in acme])
                   .order_by("started_at", "pk").values_list("pk", flat=True))
    assert started == [inv.pk for inv in acme]
    assert not KeyControl.objects.exists()  # nothing held any more: no row, no cost
    assert list(KeyAction.objects.order_by("id").values_list("kind", "by")) == [("paused", "alice"),
                                                                                ("resumed", "bob")]


@pytest.mark.django_db(transaction=True)
def test_a_paused_key_of_a_task_that_drops_blocked_work_keeps_its_work():
    calls = [jobs.keyed_drop.delay("acme", str(n)) for n in range(2)]
    pause_key(*key_of(calls[0]), by="alice")
    drain()
    assert statuses(*calls) == [Status.REROUTED] * 2
    resume_key(*key_of(calls[0]), by="alice")
    drain()
    assert Invocation.objects.get(pk=calls[0].pk).status == Status.SUCCESS


@pytest.mark.django_db(transaction=True)
def test_a_key_paused_while_it_runs_wakes_nothing_when_it_frees_not_even_by_the_orphan_duty():
    runner = RunnerFactory()
    first, second = (jobs.keyed.delay("acme", op) for op in "ab")
    (running,) = claim(runner, using="default", start=True)
    assert running.pk == first.pk
    assert claim(runner, using="default") == []  # the second is parked behind the first
    pause_key(*key_of(first), by="alice")
    execute(running, runner, using="default")  # frees the key: its wake-up finds it paused
    assert statuses(first, second) == [Status.SUCCESS, Status.REROUTED]
    assert wake_orphans(using="default") == []
    resume_key(*key_of(first), by="alice")
    assert statuses(second) == [Status.REGISTERED]


@pytest.mark.django_db(transaction=True)
def test_pause_and_resume_asked_twice_change_nothing_the_second_time():
    call = jobs.keyed.delay("acme", "a")
    assert pause_key(*key_of(call), by="alice")
    assert not pause_key(*key_of(call), by="alice")
    assert resume_key(*key_of(call), by="alice")
    assert not resume_key(*key_of(call), by="alice")
    assert KeyAction.objects.count() == 2


# -- overrides -----------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_an_overridden_limit_lets_more_runs_of_a_key_start_and_each_stores_the_limit_it_started_under():
    runner = RunnerFactory()
    calls = jobs.keyed.delay_many([(("acme", str(n)), {}) for n in range(4)])
    override_key(*key_of(calls[0]), limit=3, until=timezone.now() + LATER, by="alice")
    claimed = claim(runner, using="default", limit=4)
    assert sorted((inv.slot, inv.running_limit) for inv in claimed) == [(0, 3), (1, 3), (2, 3)]
    assert statuses(*calls) == [Status.PENDING] * 3 + [Status.REROUTED]
    assert KeyAction.objects.get().note.startswith("running limit 3 until ")


@pytest.mark.django_db(transaction=True)
def test_a_raised_limit_wakes_the_parked_work_at_once_and_every_freed_slot_wakes_the_next():
    runner = RunnerFactory()
    calls = [jobs.keyed.delay("acme", str(n)) for n in range(5)]
    (first,) = claim(runner, using="default", start=True)
    assert claim(runner, using="default") == []  # the rest parked behind it
    override_key(*key_of(first), limit=2, until=timezone.now() + LATER, by="alice")
    assert statuses(*calls[1:3]) == [Status.REGISTERED, Status.REROUTED]  # one free slot: one woken
    (second,) = claim(runner, using="default", start=True)
    assert (second.pk, second.slot) == (calls[1].pk, 1)
    execute(first, runner, using="default")  # frees slot 0: the next is woken into it
    assert statuses(*calls[2:]) == [Status.REGISTERED, Status.REROUTED, Status.REROUTED]


@pytest.mark.django_db(transaction=True)
def test_once_an_override_ends_by_the_databases_clock_the_declared_limit_returns():
    runner = RunnerFactory()
    calls = jobs.keyed.delay_many([(("acme", str(n)), {}) for n in range(4)])
    override_key(*key_of(calls[0]), limit=2, until=timezone.now() + LATER, by="alice")
    two = claim(runner, using="default", limit=4, start=True)
    assert len(two) == 2
    KeyControl.objects.update(until=Now() - timedelta(seconds=1))  # its time came
    for invocation in two:
        execute(invocation, runner, using="default")
    assert len(claim(runner, using="default", limit=4)) == 1


@pytest.mark.django_db(transaction=True)
def test_restoring_an_override_by_hand_returns_the_declared_limit():
    calls = jobs.keyed.delay_many([(("acme", str(n)), {}) for n in range(3)])
    override_key(*key_of(calls[0]), limit=3, until=timezone.now() + LATER, by="alice")
    assert restore_key(*key_of(calls[0]), by="bob")
    assert not restore_key(*key_of(calls[0]), by="bob")
    assert not KeyControl.objects.exists()
    assert len(claim(RunnerFactory(), using="default", limit=3)) == 1


@pytest.fixture
def forget_deferrals():
    """Forget, after the test, the deferrals this process noted: a later burst worker would wait for them."""
    yield
    with releases._changed:
        releases._due.clear()


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("forget_deferrals")
def test_an_overridden_rate_defers_a_keys_second_start():
    runner = RunnerFactory()
    calls = jobs.keyed.delay_many([(("acme", str(n)), {}) for n in range(2)])
    override_key(*key_of(calls[0]), limit=2, rate=Rate(1, 3600.0), until=timezone.now() + LATER, by="alice")
    claimed = claim(runner, using="default", limit=2, start=True)
    assert [inv.pk for inv in claimed] == [calls[0].pk]
    assert claim(runner, using="default", start=True) == []
    assert Invocation.objects.get(pk=calls[1].pk).run_after is not None
    assert Event.objects.filter(invocation=calls[1], kind=Event.Kind.DEFERRED).exists()


@pytest.mark.django_db(transaction=True)
def test_real_workers_keep_an_overridden_key_within_its_limit_and_use_it(tmp_path):
    log = tmp_path / "spans.log"
    from tests.test_running_limit import peaks

    calls = [jobs.record_span.delay("acme", n, 0.1, str(log)) for n in range(9)]
    override_key(*key_of(calls[0]), limit=3, until=timezone.now() + LATER, by="alice")
    Worker(threads=4, burst=True).run()
    assert statuses(*calls) == [Status.SUCCESS] * 9
    assert peaks(log)["acme"] == 3  # within the override, and all of it used


@pytest.mark.parametrize("arguments, problem", [
    ({}, "needs a running limit, a rate, or both"),
    ({"limit": 0}, "from 1 to 32767"),
    ({"limit": 2, "until": timezone.now() - timedelta(seconds=1)}, "must end in the future"),
])
def test_a_bad_override_is_refused_before_anything_is_written(arguments, problem):
    with pytest.raises(ArgumentError, match=problem):
        override_key("t", "k", by="alice", **{"until": timezone.now() + LATER, **arguments})


@pytest.mark.django_db
@pytest.mark.parametrize("fields", [
    {"running_limit": 0, "until": timezone.now()},
    {"running_limit": 2},  # an override that never ends
    {"rate_count": 3, "until": timezone.now()},  # a count without its window
    {"rate_count": 3, "rate_window": 0.0, "until": timezone.now()},
])
def test_the_database_refuses_a_control_it_could_not_apply(fields):
    with pytest.raises(IntegrityError), transaction.atomic():
        KeyControl.objects.create(task_name="t", running_key="k", **fields)


@pytest.mark.django_db
def test_the_database_holds_one_control_per_key():
    KeyControl.objects.create(task_name="t", running_key="k", paused=True)
    with pytest.raises(IntegrityError), transaction.atomic():
        KeyControl.objects.create(task_name="t", running_key="k")


# -- cancelling a key's waiting work -------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_cancel_waiting_ends_what_waits_for_a_key_and_leaves_its_run_and_other_keys_alone():
    runner = RunnerFactory()
    acme = [jobs.keyed.delay("acme", str(n)) for n in range(4)]
    other = jobs.keyed.delay("globex", "a")
    (running,) = claim(runner, using="default", start=True)
    claim(runner, using="default")  # parks the rest of acme
    cancelled = cancel_waiting(*key_of(acme[0]), by="alice")
    assert sorted(cancelled) == [inv.pk for inv in acme[1:]]
    assert statuses(*acme) == [Status.RUNNING] + [Status.CANCELLED] * 3
    assert not Invocation.objects.get(pk=running.pk).cancel_requested
    assert Invocation.objects.get(pk=other.pk).status != Status.CANCELLED
    assert Event.objects.filter(invocation=acme[1], to_status=Status.CANCELLED,
                                note__startswith="cancelled by alice").exists()
    assert cancel_waiting(*key_of(acme[0]), by="alice") == []
    assert list(KeyAction.objects.values_list("kind", "by", "note")) == [
        ("cancelled", "alice", "3 waiting invocation(s) cancelled")]


# -- a reply lost after each new step's commit strands nothing -----------------------------


#: The override an operator asks for, asked again the same when its reply is lost.
UNTIL = timezone.now() + timedelta(days=1)


def _override(task_name, running_key):
    return override_key(task_name, running_key, limit=2, until=UNTIL, by="alice")


ACTIONS = {
    "pause": (pause_key, None),
    "resume": (resume_key, pause_key),
    "override": (_override, None),
    "restore": (restore_key, _override),
    "cancel waiting": (cancel_waiting, None),
}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("action", list(ACTIONS))
def test_an_action_that_meets_an_error_at_any_statement_is_asked_again_and_strands_nothing(action):
    act, before = ACTIONS[action]
    function = act if act is not _override else override_key
    for fault in _faults(action):
        Invocation.objects.all().delete()
        KeyControl.objects.all().delete()
        KeyAction.objects.all().delete()
        calls = [jobs.keyed.delay("acme", str(n)) for n in range(3)]
        key = key_of(calls[0])
        if before is not None:
            before(*key, **({"by": "alice"} if before is pause_key else {}))
        actions = KeyAction.objects.count()
        with installed(Injector(Step(action, (function,)), fault)) as injector, \
                pytest.raises(Exception, match="injected"):
            act(*key, **({} if act is _override else {"by": "alice"}))
        assert injector.fired
        close_old_connections()  # as the next request does: a lost connection is given up
        # The operator, hearing of an error, asks again: the key is as asked, recorded once.
        act(*key, **({} if act is _override else {"by": "alice"}))
        assert KeyAction.objects.count() == actions + 1, (action, fault)
        # Then whatever the key holds is let go: nothing waiting is left behind.
        resume_key(*key, by="alice")
        restore_key(*key, by="alice")
        drain()
        assert not Invocation.objects.exclude(status__in=[Status.SUCCESS, Status.CANCELLED]).exists(), (
            action, fault, list(Invocation.objects.values_list("status", flat=True)))


def _faults(action):
    """Each error the action can meet (recorded on a clean run): before each of its statements, and after each
    commit with the reply lost; each as a transient error and as a refusal."""
    act, before = ACTIONS[action]
    function = act if act is not _override else override_key
    call = jobs.keyed.delay("acme", "probe")
    key = key_of(call)
    if before is not None:
        before(*key, **({"by": "alice"} if before is pause_key else {}))
    with installed(Injector(Step(action, (function,)))) as recording:
        act(*key, **({} if act is _override else {"by": "alice"}))
    assert recording.recorded
    return [Fault(statement.number, after=after, transient=transient)
            for after, statements in ((False, recording.recorded), (True, commits(recording.recorded)))
            for statement in statements for transient in (True, False)]
