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
from keyjobs.models import Event, Invocation, RateToken
from keyjobs.spec import Options
from keyjobs.status import OWNED, RESUMABLE, TRANSITIONS, Status, change
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
        "error": invocation.error, "return_value": invocation.return_value,
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
    return InvocationFactory(
        status=status, runner=owner if owned else None, runner_thread=2 if owned else None, slot=0, attempts=1,
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
    # Back to RUNNING from where a run paused is that run going on, as keyjobs.waits writes it.
    made = change(Status(there), runner_id=owner.pk, thread=5, note="parity",
                  values={"error": "x"} if there == Status.FAILED else None,
                  resumed=here in RESUMABLE and there == Status.RUNNING)
    apply([invocation.pk], made, using="default", only_from=None if general else {here})
    check(f"{here}->{there}", snapshot(invocation, before, {owner.pk: "owner"}))


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
    calls = Options(jobs.rated_wide).delay_many([(("acme", n), {}) for n in range(4)])
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
    owner = RunnerFactory()
    running = a_row(Status.RUNNING, owner)
    before = Invocation.objects.get(pk=running.pk)
    running.cancel(by="parity")
    check("cancel requested", snapshot(running, before, {owner.pk: "owner"}, extra=("cancel_requested",)))
