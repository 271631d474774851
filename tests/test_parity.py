"""Parity of the status writer: every legal change, and every step of a claim, writes the same on both databases.

Each case is applied from a known row, and what it wrote (the row's fields,
which stamps it set, and its history rows) is compared field by field with
``tests/parity/changes.json``, recorded once and shared by the SQLite and
the PostgreSQL run. On PostgreSQL each move is also applied both through the
one-statement step and through the general path, which must agree. Set
KEYJOBS_RECORD_PARITY=1 to record the file anew (then review its diff).
"""

import json
import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone

from keyjobs.claim import Claimer, claim, record_and_claim, wake_next
from keyjobs.enqueue import enqueue_many
from keyjobs.models import Event, Invocation, RateToken
from keyjobs.spec import Options
from keyjobs.status import FINAL, OWNED, RESUMABLE, TRANSITIONS, Status, change, mark
from keyjobs.store import store
from keyjobs.transitions import apply
from tests import jobs
from tests.factories import InvocationFactory, RunnerFactory

pytestmark = pytest.mark.django_db

EXPECTED = Path(__file__).parent / "parity" / "changes.json"
RECORD = os.environ.get("KEYJOBS_RECORD_PARITY") == "1"
STAMPS = ("registered_at", "run_after", "started_at", "finished_at")
#: A time a note names (a deferral's, a debounce's): it differs between runs.
CLOCK_READING = re.compile(r"\d{4}-\d\d-\d\dT[\d:.]+[+-]\d\d:\d\d")
_recorded: dict[str, Any] = {}


def snapshot(
    invocation: Invocation, before: Invocation, runner_ids: dict[int | None, str], extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    """What a change wrote, without what differs between runs (ids, clock readings)."""
    invocation.refresh_from_db()
    row = {
        "status": invocation.status, "attempts": invocation.attempts, "slot": invocation.slot,
        "runner": runner_ids.get(invocation.runner_id), "runner_thread": invocation.runner_thread,
        "error": invocation.error, "error_type": invocation.error_type, "return_value": invocation.return_value,
        "recoveries": invocation.recoveries, "cancel_requested": invocation.cancel_requested,
        "waiters": invocation.waiters, "effective_priority": invocation.effective_priority,
        **{name: getattr(invocation, name) for name in extra},
    }
    for name in STAMPS:
        value, old = getattr(invocation, name), getattr(before, name)
        row[name] = None if value is None else ("kept" if value == old else "stamped")
    events = [
        [event.kind, event.from_status, event.to_status, runner_ids.get(event.runner_id), event.runner_thread,
         CLOCK_READING.sub("<time>", event.note)]
        for event in Event.objects.filter(invocation=invocation).order_by("id")
    ]
    return {"row": row, "events": events}


def check(case: str, found: dict[str, Any]) -> None:
    if RECORD:
        _recorded[case] = found
        return
    expected = json.loads(EXPECTED.read_text())
    assert case in expected, f"{case} is not in {EXPECTED.name}: record it with KEYJOBS_RECORD_PARITY=1"
    assert found == expected[case]


@pytest.fixture(scope="module", autouse=True)
def record_file():
    yield
    if RECORD:
        recorded = json.loads(EXPECTED.read_text()) if EXPECTED.exists() else {}
        recorded.update(_recorded)
        EXPECTED.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")


def a_row(status: Status, owner: Any) -> Invocation:
    past = timezone.now() - timedelta(minutes=5)
    owned = status in OWNED
    # A final row as a run leaves it that used up its recoveries and saw a cancel request: what a retry by hand
    # clears (status.CLEARED_AGAIN) is then seen cleared.
    ended = status in FINAL
    return InvocationFactory(
        status=status, runner=owner if owned else None, runner_thread=2 if owned else None, slot=0, attempts=1,
        recoveries=3 if ended else 0, cancel_requested=ended, error_type="builtins.ValueError" if ended else "",
        registered_at=past, started_at=past if status != Status.REGISTERED else None,
        finished_at=past if status in (Status.SUCCESS, Status.FAILED, Status.CONCURRENCY_CONTROLLED_FINAL) else None,
    )


LEGAL = sorted((str(here), str(there)) for here, theres in TRANSITIONS.items() for there in theres)


@pytest.mark.parametrize("general", [
    pytest.param(True, id="general"), pytest.param(False, id="one-statement", marks=pytest.mark.postgres)])
@pytest.mark.parametrize(("here", "there"), LEGAL)
def test_every_legal_change_writes_the_same_on_every_database(here: str, there: str, general: bool) -> None:
    assert general or store(connection.alias).steps is not None
    owner = RunnerFactory()
    invocation = a_row(Status(here), owner)
    before = Invocation.objects.get(pk=invocation.pk)
    # only_from makes the move one statement where the store has it; without it, the general path.
    # Back to RUNNING from where a run paused is that run going on, as keyjobs.waits writes it; back to
    # REGISTERED from a final status is a retry by hand, which clears what the last run left.
    made = change(Status(there), runner_id=owner.pk, thread=5, note="parity",
                  values={"error": "x"} if there == Status.FAILED else None,
                  resumed=here in RESUMABLE and there == Status.RUNNING, again=here in FINAL)
    apply([invocation.pk], made, using="default", only_from=None if general else {here})
    check(f"{here}->{there}", snapshot(invocation, before, {owner.pk: "owner"}))


@pytest.mark.parametrize("general", [
    pytest.param(True, id="general"), pytest.param(False, id="one-statement", marks=pytest.mark.postgres)])
def test_waits_that_start_and_end_count_the_waiters_alike_on_every_database(general: bool) -> None:
    # Two runs pause on one invocation (its priority is raised by one a waiter), then one goes on.
    owner = RunnerFactory()
    waited = jobs.keyed.delay("acme", "waited on")
    waiting = [a_row(Status.RUNNING, owner) for _ in range(2)]
    before = Invocation.objects.get(pk=waited.pk)
    paused_before = Invocation.objects.get(pk=waiting[0].pk)
    ids = {owner.pk: "owner"}
    for run in waiting:
        apply([run.pk], change(Status.PAUSED, runner_id=owner.pk, thread=5, note="parity",
                               values={"waiting_on": waited.pk}),
              using="default", only_from=None if general else {Status.RUNNING})
    check("wait: two waiters", snapshot(waited, before, ids))
    check("wait: paused", snapshot(waiting[0], paused_before, ids) | {
        "waits on it": Invocation.objects.get(pk=waiting[0].pk).waiting_on_id == waited.pk})
    apply([waiting[0].pk], change(Status.RUNNING, runner_id=owner.pk, thread=5, note="parity", resumed=True,
                                  values={"waiting_on": None}),
          using="default", only_from=None if general else {Status.PAUSED})
    check("wait: one waiter left", snapshot(waited, before, ids))


@pytest.mark.parametrize("general", [
    pytest.param(True, id="general"), pytest.param(False, id="one-statement", marks=pytest.mark.postgres)])
@pytest.mark.parametrize("here", [Status.REGISTERED, Status.REROUTED, Status.RUNNING])
def test_a_write_that_keeps_the_status_writes_the_same_on_every_database(here: Status, general: bool) -> None:
    owner = RunnerFactory()
    invocation = a_row(here, owner)
    before = Invocation.objects.get(pk=invocation.pk)
    made = mark(Event.Kind.DEFERRED, {"run_after": timezone.now() + timedelta(seconds=5), "cancel_requested": True},
                runner_id=owner.pk, thread=5, note="parity")
    apply([invocation.pk], made, using="default", only_from=None if general else {here})
    check(f"mark {here}", snapshot(invocation, before, {owner.pk: "owner"}))


@pytest.mark.parametrize("start", [True, False], ids=["start", "pending"])
def test_a_claim_writes_the_same_on_every_database(start: bool) -> None:
    runner = RunnerFactory()
    invocation = jobs.keyed.delay("acme", "a")
    before = Invocation.objects.get(pk=invocation.pk)
    [claimed] = claim(runner, using="default", thread=3, start=start)
    check(f"claim {'start' if start else 'pending'}", snapshot(claimed, before, {runner.pk: "runner"}))


@pytest.mark.django_db(transaction=True)
def test_a_hand_off_and_a_wake_up_write_the_same_on_every_database() -> None:
    runner, other = RunnerFactory(), RunnerFactory()
    parked = InvocationFactory(task_name=jobs.keyed.name, running_key='{"account_id":"acme"}', status=Status.REROUTED,
                               queue="default")
    woken = InvocationFactory(task_name=jobs.keyed.name, running_key='{"account_id":"globex"}', status=Status.REROUTED,
                              queue="default")
    handed_before, woken_before = (Invocation.objects.get(pk=parked.pk), Invocation.objects.get(pk=woken.pk))
    from django.db import transaction

    with transaction.atomic():
        done = wake_next(jobs.keyed.name, parked.running_key, using="default", runner=other,
                         claimer=Claimer(runner, 4, None))
    assert done.handed is not None and done.handed.pk == parked.pk
    with transaction.atomic():
        wake_next(jobs.keyed.name, woken.running_key, using="default", runner=other)
    ids = {runner.pk: "claimer", other.pk: "waker"}
    check("hand-off", snapshot(parked, handed_before, ids))
    check("wake-up", snapshot(woken, woken_before, ids))


@pytest.mark.django_db(transaction=True)
def test_a_hand_off_and_a_wake_up_of_a_key_of_three_slots_write_the_same_on_every_database() -> None:
    # One owner in slot 0: the key's two free slots go to its next two parked invocations, the first
    # handed over in slot 1, the second woken; the third stays parked.
    from django.db import transaction

    runner, other = RunnerFactory(), RunnerFactory()
    of_key = {"task_name": jobs.record_span_three.name, "running_key": '{"account_id":"acme"}', "running_limit": 3,
              "queue": "default"}
    InvocationFactory(**of_key, status=Status.RUNNING, runner=other, slot=0)
    parked = [InvocationFactory(**of_key, status=Status.REROUTED) for _ in range(3)]
    before = [Invocation.objects.get(pk=invocation.pk) for invocation in parked]
    with transaction.atomic():
        done = wake_next(jobs.record_span_three.name, of_key["running_key"], using="default", runner=other,
                         claimer=Claimer(runner, 4, None))
    assert done.handed is not None and done.handed.pk == parked[0].pk and done.woken == [parked[1].pk]
    ids = {runner.pk: "claimer", other.pk: "waker"}
    for name, invocation, was in zip(("handed", "woken", "still parked"), parked, before, strict=True):
        check(f"three slots: {name}", snapshot(invocation, was, ids))


def test_recording_an_outcome_and_claiming_next_writes_the_same_on_every_database() -> None:
    runner = RunnerFactory()
    done = a_row(Status.RUNNING, runner)
    following = jobs.add.delay(1, 2)
    done_before, following_before = Invocation.objects.get(pk=done.pk), Invocation.objects.get(pk=following.pk)
    moved, claimed = record_and_claim(done, Status.SUCCESS, values={"return_value": 3}, note="",
                                      claimer=Claimer(runner, 2, None), using="default")
    assert moved == [done.pk] and [inv.pk for inv in claimed] == [following.pk]
    ids = {runner.pk: "runner"}
    check("record and claim: outcome", snapshot(done, done_before, ids))
    check("record and claim: next", snapshot(following, following_before, ids))


@pytest.mark.django_db(transaction=True)
def test_a_rate_limited_claim_and_a_deferral_write_the_same_on_every_database() -> None:
    runner = RunnerFactory()
    calls = enqueue_many(Options(jobs.rated_wide), [(("acme", n), {}) for n in range(4)])
    before = {call.pk: Invocation.objects.get(pk=call.pk) for call in calls}
    claimed = [claim(runner, using="default", thread=n, start=True) for n in range(4)]
    assert [len(taken) for taken in claimed] == [1, 1, 1, 0]
    ids = {runner.pk: "runner"}
    check("rate-limited claim", snapshot(calls[0], before[calls[0].pk], ids))
    check("deferred by a full rate window", snapshot(calls[3], before[calls[3].pk], ids))
    started = Invocation.objects.get(pk=calls[0].pk)
    assert started.started_at == RateToken.objects.order_by("used_at").values_list("used_at", flat=True).first()


def test_a_debounced_merge_and_a_cancel_request_write_the_same_on_every_database() -> None:
    waiting = jobs.debounced.delay("acme", "first")
    before = Invocation.objects.get(pk=waiting.pk)
    jobs.debounced.delay("acme", "second")
    check("debounced merge", snapshot(waiting, before, {}, extra=("args",)))
    runner = RunnerFactory()
    held = jobs.debounced_across_keys.delay("acme", "a")
    Invocation.objects.filter(pk=held.pk).update(status=Status.RUNNING, runner=runner)
    parked = jobs.debounced_across_keys.delay("acme", "b")
    Invocation.objects.filter(pk=parked.pk).update(status=Status.REROUTED)
    before = Invocation.objects.get(pk=parked.pk)
    jobs.debounced_across_keys.delay("gold-1", "c")
    check("debounced merge of a parked invocation into another key",
          snapshot(parked, before, {}, extra=("args", "running_key", "running_limit")))
    owner = RunnerFactory()
    running = a_row(Status.RUNNING, owner)
    before = Invocation.objects.get(pk=running.pk)
    running.cancel(by="parity")
    check("cancel requested", snapshot(running, before, {owner.pk: "owner"}, extra=("cancel_requested",)))


@pytest.mark.parametrize("past", [False, True], ids=["death counted", "past max_recoveries"])
def test_a_recovery_writes_the_same_on_every_database(past: bool) -> None:
    from keyjobs.recovery import recover_dead_runner

    dead, alive = RunnerFactory(host="box", pid=7), RunnerFactory()
    invocation = a_row(Status.RUNNING, dead)
    Invocation.objects.filter(pk=invocation.pk).update(recoveries=3 if past else 0)  # add's max_recoveries is 3
    before = Invocation.objects.get(pk=invocation.pk)
    assert recover_dead_runner(dead.pk, using="default", by=alive, why="was killed") == [invocation.pk]
    found = json.loads(json.dumps(snapshot(invocation, before, {dead.pk: "dead", alive.pk: "alive"}))
                       .replace(f"runner {dead.pk} ", "runner <dead> "))
    check(f"recovered: {'past max_recoveries' if past else 'death counted'}", found)


@pytest.mark.django_db(transaction=True)
def test_a_paused_key_and_an_override_write_the_same_on_every_database() -> None:
    from keyjobs import control

    runner = RunnerFactory()
    key = '{"account_id":"acme"}'
    control.pause_key(jobs.keyed.name, key, by="ops")
    waiting = jobs.keyed.delay("acme", "a")
    before = Invocation.objects.get(pk=waiting.pk)
    assert claim(runner, using="default", thread=1, start=True) == []
    check("claim of a paused key", snapshot(waiting, before, {runner.pk: "runner"}))
    control.resume_key(jobs.keyed.name, key, by="ops")
    control.override_key(jobs.keyed.name, key, until=timezone.now() + timedelta(minutes=5), limit=2, by="ops")
    second = jobs.keyed.delay("acme", "b")
    firsts = {pk: Invocation.objects.get(pk=pk) for pk in (waiting.pk, second.pk)}
    taken = claim(runner, using="default", thread=1, start=True, limit=2)
    assert sorted(invocation.pk for invocation in taken) == sorted(firsts)
    for name, pk in (("first", waiting.pk), ("second", second.pk)):
        check(f"claim under an override: {name}",
              snapshot(Invocation.objects.get(pk=pk), firsts[pk], {runner.pk: "runner"}, extra=("running_limit",)))
