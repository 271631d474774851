"""The fault matrix: one error at each statement of each step, and nothing stranded, stalled or run twice at once.

Each scenario runs a step of an invocation's life with real ``Worker``s in
threads (``tests.fault_injection``). A clean run numbers the step's
statements; then, for each of them, the same scenario runs again with one
error raised there: before the statement reaches the database, or after its
commit with the reply lost; as a lost connection (transient) or as a refusal.
After each case:

- every invocation ends final (a live runner claims whatever is claimable);
- no invocation is held by a live runner that runs no thread for it;
- no two runs of one key overlap (from the log the tasks write);
- nothing was given back by the in-doubt sweep: a step whose reply was lost
  finds its own work done and takes it back (the sweep is the net, tested
  apart in ``tests/test_duties.py``);
- and what the scenario itself promises (a trigger does not turn its
  source's SUCCESS into FAILED, a tick runs once).

A group of cases that fails on main is marked ``xfail(strict=True)`` in
``KNOWN`` with the issue item it belongs to: the fix that makes it pass turns
the mark into a failure, and its author removes the mark.

``KEYJOBS_FAULT_MATRIX_REPORT=path`` appends each case's result to ``path``
(JSON lines), for a table of the matrix.
"""

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import DatabaseError, connection, transaction
from django.db.models.functions import Now
from django.utils import timezone

import keyjobs.claim
import keyjobs.enqueue
import keyjobs.execute
import keyjobs.firing
import keyjobs.models
import keyjobs.recovery
import keyjobs.schedules
import keyjobs.waits
from keyjobs import Mode, Status, on_status, task
from keyjobs.claim import claim
from keyjobs.execute import UNHELD, Outcome, finish
from keyjobs.models import Event, Invocation, Runner, Schedule, Value
from keyjobs.status import HANDED, WOKEN
from keyjobs.store import Store, store
from tests.conftest import TEST_DB
from tests.fault_injection import (
    Fault,
    Injector,
    Statement,
    Step,
    Workers,
    clean_recording,
    commits,
    installed,
    log_span,
    overlapping,
    reset_database,
    settle,
    span,
    stranded,
)

# -- the tasks the scenarios run: each logs its run, so that overlapping runs of a key show ---------------------


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",))
def logged(account_id: str, number: int, log: str, hold: float = 0.0) -> int:
    log_span(log, account_id, hold)
    return number


@task
def logged_plain(number: int, log: str) -> int:
    log_span(log, f"plain-{number}")
    return number


@task(running_concurrency=Mode.KEYS, registration_concurrency=Mode.KEYS, key_arguments=("account_id",))
def logged_once(account_id: str, number: int, log: str) -> int:
    log_span(log, account_id)
    return number


@task(running_concurrency=Mode.KEYS, registration_concurrency=Mode.KEYS, key_arguments=("account_id",),
      debounce=0.05)
def logged_debounced(account_id: str, number: int, log: str) -> int:
    log_span(log, account_id)
    return number


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",), max_retries=1, retry_for=(ConnectionError,),
      retry_backoff=0.01)
def logged_flaky(account_id: str, number: int, log: str) -> int:
    """Fail the first run (its attempts counted in a file beside the log), succeed the next."""
    log_span(log, account_id)
    with open(log + ".attempts", "a+") as attempts:
        attempts.write("x")
        attempts.seek(0)
        if len(attempts.read()) == 1:
            raise ConnectionError("the provider is down, once")
    return number


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",))
def logged_source(account_id: str, number: int, log: str) -> int:
    log_span(log, account_id)
    return number


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",), trigger=on_status(logged_source))
def logged_subscriber(account_id: str, number: int, log: str, result: int) -> int:
    log_span(log, f"{account_id}-subscriber")
    return result


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",))
def logged_parent(account_id: str, number: int, log: str) -> int:
    """Delay a child and wait for it: the run pauses, and resumes once the child is final."""
    with span(log, account_id):  # open across the pause
        logged.delay(f"{account_id}-child", number, log).wait(timeout=30)
        return number


@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",))
def logged_large(account_id: str, number: int, log: str, payload: str = "") -> str:
    """Return ``payload``: past KEYJOBS_INLINE_VALUE_BYTES, an argument and a result stored out of line."""
    log_span(log, account_id)
    return payload


# -- the scenarios ------------------------------------------------------------------------------------------------

#: Seconds a case may take to settle: enough for recovery and the sweeps at the short settings below, on a loaded
#: machine too (a passing case settles as soon as it can; only a failing one waits this long).
SETTLE = 15.0
#: The worker settings of every case: short, so that the duties act within a case.
SETTINGS = {"KEYJOBS_HEARTBEAT_INTERVAL": 0.2, "KEYJOBS_LEASE": 2.0}
ONE_THREAD: dict[str, Any] = {"threads": 1, "poll_interval": 0.05}


@dataclass
class Case:
    """One run of a scenario: its run log, and what its setup and the caller's step made."""

    log: Path
    made: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return str(self.log)


@dataclass(frozen=True)
class Scenario:
    """A step under test: the data it starts from, who runs it, and what must hold besides the common checks."""

    step: Step
    setup: Callable[[Case], None]
    #: The step itself when a producer runs it in the caller's thread (enqueue, merge), under the fault.
    act: Callable[[Case], None] | None = None
    #: What the caller's thread does while the workers run (a runner of the test's own ending its run).
    during: Callable[[Case], None] | None = None
    workers: tuple[dict[str, Any], ...] = (ONE_THREAD,)
    #: What else must hold once the case settles; each problem as a sentence.
    check: Callable[[Case], list[str]] = lambda case: []
    #: What a clean run must show: that it took the path under test.
    took_path: Callable[[Case], list[str]] = lambda case: []


def _an_event(**lookup: Any) -> Callable[[Case], list[str]]:
    """Return a check that the history holds an event of ``lookup``: the sign that a run took a path."""
    def took(case: Case) -> list[str]:
        return [] if Event.objects.filter(**lookup).exists() else [f"no event of {lookup}"]
    return took


def _first_call(task_: Any) -> Callable[[Case], None]:
    """Return a setup that delays a first call of ``task_`` (key "a")."""
    def setup(case: Case) -> None:
        task_.delay("a", 0, case.path)
    return setup


def _second_call(task_: Any) -> Callable[[Case], None]:
    """Return the step of a caller that delays a second call of ``task_`` (key "a"), kept for ``_returned_is_stored``."""
    def act(case: Case) -> None:
        case.made["second"] = task_.delay("a", 1, case.path)
    return act


def _returned_is_stored(case: Case) -> list[str]:
    made = case.made.get("second")
    if made is not None and not Invocation.objects.filter(pk=made.pk).exists():
        return [f"delay() returned #{made.pk} without an error, and it is not stored"]
    return []


def _claim_setup(case: Case) -> None:
    logged.delay("a", 0, case.path)
    logged.delay("a", 1, case.path)
    logged.delay("b", 0, case.path)


def _busy_key_setup(case: Case) -> None:
    # The key is held by a runner of the test's (``_busy_key_frees``), so that the worker's first claim decides a
    # call of a busy key. Delayed in a transaction, that call is registered, not parked at enqueue.
    holder = Runner.objects.create(host="holder-host", pid=2, threads=1)
    logged.delay("a", 0, case.path)
    [held] = claim(holder, using="default", start=True)
    with transaction.atomic():
        case.made["next"] = logged.delay("a", 1, case.path)
    case.made.update(holder=holder, held=held)


def _busy_key_frees(case: Case) -> None:
    """Once the worker has parked the key's next call (or a second has passed), the holder ends its run."""
    deadline = time.monotonic() + 1.0
    while (Invocation.objects.filter(pk=case.made["next"].pk, status=Status.REGISTERED).exists()
           and time.monotonic() < deadline):
        time.sleep(0.02)
    finish(case.made["held"], Outcome(Status.SUCCESS, {"return_value": 0}), case.made["holder"], using="default")


def _two_keys(case: Case) -> None:
    logged.delay("a", 0, case.path)
    logged.delay("b", 0, case.path)


def _two_plain(case: Case) -> None:
    logged_plain.delay(0, case.path)
    logged_plain.delay(1, case.path)


def _hand_off_setup(case: Case) -> None:
    logged.delay("a", 0, case.path, hold=0.2)
    logged.delay("a", 1, case.path)


def _wake_up_setup(case: Case) -> None:
    logged.using(queue="q1").delay("a", 0, case.path, hold=0.2)
    logged.using(queue="q2").delay("a", 1, case.path)


def _recovery_setup(case: Case) -> None:
    dead = Runner.objects.create(host="dead-host", pid=1, threads=1)
    logged.delay("a", 0, case.path)
    [claimed] = claim(dead, using="default", start=True)
    logged.delay("a", 1, case.path)
    # Silent for a little less than the lease: the worker's recovery duty, not its start, finds it lost (a fault
    # at its start would end the worker, which its supervisor starts again: a test of the restart, not of recovery).
    lease = SETTINGS["KEYJOBS_LEASE"]
    Runner.objects.filter(pk=dead.pk).update(heartbeat_at=Now() - timedelta(seconds=lease - 0.25))
    case.made["recovered"] = claimed


def _recovered_once(case: Case) -> list[str]:
    """The death is counted once, however often the recovery was tried."""
    recoveries = Invocation.objects.get(pk=case.made["recovered"].pk).recoveries
    return [] if recoveries == 1 else [f"one death counted {recoveries} times"]


def _last_recovery_setup(case: Case) -> None:
    _recovery_setup(case)
    Invocation.objects.filter(pk=case.made["recovered"].pk).update(recoveries=3)  # its max_recoveries, used up


def _failed_once(case: Case) -> list[str]:
    """The death past its max_recoveries ends it FAILED, once; its key's next call goes on."""
    invocation = Invocation.objects.get(pk=case.made["recovered"].pk)
    ends = Event.objects.filter(invocation=invocation, to_status=Status.FAILED).count()
    if invocation.status != Status.FAILED or ends != 1 or invocation.recoveries != 3:
        return [f"it is {invocation.status} after {ends} FAILED event(s) and {invocation.recoveries} recoveries, "
                "not FAILED once after 3"]
    return []


def _tick_setup(case: Case) -> None:
    case.made["schedule"] = Schedule.objects.create(
        name="matrix", task_name=logged.name, kwargs={"account_id": "s", "number": 0, "log": case.path},
        interval=timedelta(hours=1), next_run=timezone.now() - timedelta(seconds=1))


def _ticked_once(case: Case) -> list[str]:
    schedule = Schedule.objects.get(pk=case.made["schedule"].pk)
    runs = Invocation.objects.filter(cause_schedule=schedule).count()
    problems = [] if runs == 1 else [f"the tick made {runs} invocations, not 1"]
    if schedule.next_run is None or schedule.next_run <= timezone.now():
        problems.append(f"the schedule's next_run did not move on: {schedule.next_run}")
    return problems


def _ticked(case: Case) -> list[str]:
    return [] if Invocation.objects.filter(cause_schedule__isnull=False).exists() else ["the tick made no invocation"]


def _trigger_setup(case: Case) -> None:
    case.made["source"] = logged_source.delay("a", 0, case.path)


def _triggered_once(case: Case) -> list[str]:
    source = Invocation.objects.get(pk=case.made["source"].pk)
    if source.status != Status.SUCCESS:
        return [f"the source ended {source.status}, not SUCCESS: {source.error}"]
    made = Invocation.objects.filter(cause_invocation=source, task_name=logged_subscriber.name).count()
    # A subscriber the database refuses fails alone, and the source's history says so.
    said = Event.objects.filter(invocation=source, kind=Event.Kind.TRIGGER_FAILED).exists()
    return [] if (made, said) in ((1, False), (0, True)) else [
        f"its SUCCESS triggered {made} invocations, not 1{', and its history says one failed' if said else ''}"]


#: A value stored out of line (over KEYJOBS_INLINE_VALUE_BYTES' 8,192 bytes).
LARGE = "v" * 10_000


def _large_second_call(case: Case) -> None:
    case.made["second"] = logged_large.delay("a", 1, case.path, payload=LARGE)


def _large_call(case: Case) -> None:
    case.made["large"] = logged_large.delay("a", 0, case.path, payload=LARGE)


def _values_whole(case: Case) -> list[str]:
    """Every value an invocation refers to is stored, and a large result reads back as returned."""
    problems = [f"#{pk} refers to a value that is not stored" for pk in Invocation.objects.filter(
        arguments_value__isnull=False).exclude(arguments_value__in=Value.objects.values("pk")).values_list("pk", flat=True)]
    problems += [f"#{pk}'s result refers to a value that is not stored" for pk in Invocation.objects.filter(
        result_value__isnull=False).exclude(result_value__in=Value.objects.values("pk")).values_list("pk", flat=True)]
    for invocation in Invocation.objects.filter(status=Status.SUCCESS, task_name=logged_large.name):
        payload = invocation.call_arguments()[1].get("payload", "")
        if invocation.get_result() != payload:
            problems.append(f"#{invocation.pk}'s result is not what it returned")
    return problems + _returned_is_stored(case)


def _stored_apart(field: str) -> Callable[[Case], list[str]]:
    def took(case: Case) -> list[str]:
        found = Invocation.objects.filter(**{f"{field}__isnull": False}).exists()
        return [] if found else [f"no invocation with a {field}"]
    return took


def _prune_setup(case: Case) -> None:
    # One value no invocation refers to any more (its invocation deleted), and one still referred to.
    logged_large.delay("gone", 0, case.path, payload="g" * 10_000).delete()
    _large_call(case)


def _prune(case: Case) -> None:
    store("default").prune_values(100)


def _pruned_unreferred(case: Case) -> list[str]:
    return [] if Value.objects.count() <= 2 else ["the prune deleted nothing"]


def _pause_setup(case: Case) -> None:
    logged_parent.delay("p", 0, case.path)


def _waiters_counted(case: Case) -> list[str]:
    """Each invocation counts as waiters exactly the runs that wait on it: a pause or a resume tried again, or
    recovered, leaves no boost behind (``Invocation.waiters``)."""
    waiting: dict[int, int] = {}
    for waited in Invocation.objects.filter(waiting_on__isnull=False).values_list("waiting_on_id", flat=True):
        waiting[waited] = waiting.get(waited, 0) + 1
    counted = dict(Invocation.objects.filter(waiters__gt=0).values_list("pk", "waiters"))
    return [f"#{pk} counts {counted.get(pk, 0)} waiters, {waiting.get(pk, 0)} wait on it"
            for pk in sorted(waiting.keys() | counted.keys()) if waiting.get(pk, 0) != counted.get(pk, 0)]


SCENARIOS: dict[str, Scenario] = {scenario.step.name: scenario for scenario in [
    Scenario(Step("enqueue", (keyjobs.enqueue.enqueue,)), _first_call(logged), act=_second_call(logged),
             check=_returned_is_stored),
    Scenario(Step("merge", (keyjobs.enqueue._register,)), _first_call(logged_once), act=_second_call(logged_once),
             check=_returned_is_stored, took_path=_an_event(kind=Event.Kind.REUSED)),
    Scenario(Step("merge (debounce)", (keyjobs.enqueue._register,)), _first_call(logged_debounced),
             act=_second_call(logged_debounced), check=_returned_is_stored,
             took_path=_an_event(kind=Event.Kind.DEBOUNCED)),
    Scenario(Step("claim", (keyjobs.claim.claim,)), _claim_setup),
    Scenario(Step("claim (a busy key)", (keyjobs.claim.claim,)), _busy_key_setup, during=_busy_key_frees,
             took_path=_an_event(note__startswith="its key was busy")),
    Scenario(Step("start", (keyjobs.execute.start,)), _two_keys, workers=({**ONE_THREAD, "prefetch": 2},)),
    Scenario(Step("record", (keyjobs.execute.finish,)), _first_call(logged)),
    Scenario(Step("record (a retry)", (keyjobs.execute.finish,)), _first_call(logged_flaky),
             took_path=_an_event(to_status=Status.RETRY)),
    Scenario(Step("record-and-claim", (keyjobs.claim.record_and_claim,)), _two_plain),
    Scenario(Step("hand-off", (keyjobs.claim.wake_next,)), _hand_off_setup, workers=({**ONE_THREAD, "threads": 2},),
             took_path=_an_event(note__startswith=HANDED)),
    Scenario(Step("wake-up", (keyjobs.claim.wake_next,)), _wake_up_setup,
             workers=({**ONE_THREAD, "queues": ["q1"]}, {**ONE_THREAD, "queues": ["q2"]}),
             took_path=_an_event(note__startswith=WOKEN)),
    Scenario(Step("recovery", (keyjobs.recovery._recover,)), _recovery_setup, check=_recovered_once,
             took_path=_an_event(note__startswith="recovered:")),
    Scenario(Step("recovery past max_recoveries", (keyjobs.recovery._recover,)), _last_recovery_setup,
             check=_failed_once, took_path=_an_event(to_status=Status.FAILED, note__startswith="recovered:")),
    Scenario(Step("schedule tick", (keyjobs.schedules.tick,)), _tick_setup, check=_ticked_once, took_path=_ticked),
    Scenario(Step("trigger", (keyjobs.firing.fire,)), _trigger_setup, check=_triggered_once),
    Scenario(Step("pause and resume", (keyjobs.waits._move,), occurrences=2), _pause_setup, check=_waiters_counted,
             took_path=_an_event(to_status=Status.PAUSED)),
    Scenario(Step("enqueue (a large value)", (keyjobs.enqueue.enqueue,)), _first_call(logged_large),
             act=_large_second_call, check=_values_whole, took_path=_stored_apart("arguments_value")),
    Scenario(Step("read large arguments", (keyjobs.models.Invocation.call_arguments,)), _large_call,
             check=_values_whole, took_path=_stored_apart("arguments_value")),
    Scenario(Step("record (a large result)", (keyjobs.execute.finish,)), _large_call, check=_values_whole,
             took_path=_stored_apart("result_value")),
    Scenario(Step("prune values", (Store.prune_values,)), _prune_setup, act=_prune, check=_values_whole,
             took_path=_pruned_unreferred),
]}


# -- running a case --------------------------------------------------------------------------------------------------


@dataclass
class Result:
    problems: list[str]
    fired: str
    restarts: list[str]
    seconds: float


def run_case(scenario: Scenario, injector: Injector, log: Path) -> Result:
    """Run ``scenario`` once from an empty database with ``injector`` on every connection; return what went wrong."""
    began = time.monotonic()
    reset_database()
    case = Case(log)
    scenario.setup(case)
    with installed(injector):
        if scenario.act is not None:
            with suppress(DatabaseError):  # the caller hears of it: allowed, as long as nothing is stranded
                scenario.act(case)
            connection.close_if_unusable_or_obsolete()  # as Django does once the caller's request ends
        with Workers(*scenario.workers) as workers:
            if scenario.during is not None:
                scenario.during(case)
            problems = settle(lambda: stranded(log) + scenario.check(case), timeout=SETTLE)
    problems += overlapping(log) + swept()
    return Result(problems, injector.fired, workers.restarts, time.monotonic() - began)


def swept() -> list[str]:
    """Return what the in-doubt sweep gave back: a step tried again takes back what it committed itself (it is the
    step's success), and the sweep is only the net under that (``duties.GiveBackUnheld``, tested on its own)."""
    return [f"#{pk} was given back by the in-doubt sweep: its step did not find it done"
            for pk in Event.objects.filter(note__startswith=UNHELD).values_list("invocation_id", flat=True)]


#: Each scenario's clean run, recorded once a session: its statements.
_recorded: dict[str, list[Statement]] = {}


def statements_of(name: str, log: Path) -> list[Statement]:
    """Return the statements of scenario ``name``'s step, numbered in a clean run (which must pass its checks)."""
    if name not in _recorded:
        scenario = SCENARIOS[name]
        injector, result = clean_recording(scenario.step, lambda injector: run_case(scenario, injector, log))
        assert not result.problems, f"the clean run of {name} failed: {result.problems}"
        assert not result.restarts, f"the clean run of {name} restarted a worker: {result.restarts}"
        assert injector.recorded, f"the step {name} ran no statement in a clean run: its functions moved?"
        missed = scenario.took_path(Case(log))
        assert not missed, f"the clean run of {name} did not take its path: {missed}"
        _recorded[name] = injector.recorded
    return _recorded[name]


def _report(name: str, fault: Fault, statement: Statement, result: Result) -> None:
    path = os.environ.get("KEYJOBS_FAULT_MATRIX_REPORT")
    if not path:
        return
    with open(path, "a") as out:
        out.write(json.dumps({
            "database": TEST_DB, "step": name, "statement": fault.statement, "of": len(_recorded[name]),
            "sql": " ".join(statement.sql.split())[:160], "transaction": statement.transaction,
            "when": "after" if fault.after else "before", "error": "transient" if fault.transient else "refused",
            "passed": not result.problems, "problems": result.problems, "fired": result.fired,
            "restarts": result.restarts, "seconds": round(result.seconds, 2),
        }) + "\n")


# -- the matrix ------------------------------------------------------------------------------------------------------

#: Groups of cases that fail on main, by (step, when, error, database or "both"): the issue item that fixes them.
KNOWN: dict[tuple[str, str, str, str], str] = {}


def _cases() -> Iterator[Any]:
    for name in SCENARIOS:
        for when in ("before", "after"):
            for error in ("transient", "refused"):
                reason = KNOWN.get((name, when, error, TEST_DB)) or KNOWN.get((name, when, error, "both"))
                marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
                yield pytest.param(name, when, error, marks=marks, id=f"{name}-{when}-{error}")


#: The matrix touches keyjobs' tables only: after each test, only those are emptied (and no post_migrate runs).
KEYJOBS_ONLY = ["keyjobs"]


@contextmanager
def short_leases(settings: Any) -> Iterator[None]:
    for name, value in SETTINGS.items():
        setattr(settings, name, value)
    yield


@pytest.mark.django_db(transaction=True, available_apps=KEYJOBS_ONLY)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_each_step_runs_clean_and_takes_its_path(name, settings, tmp_path):
    with short_leases(settings):
        statements_of(name, tmp_path / "clean.log")


@pytest.mark.django_db(transaction=True, available_apps=KEYJOBS_ONLY)
@pytest.mark.parametrize(("name", "when", "error"), list(_cases()))
def test_one_fault_at_any_statement_strands_nothing(name, when, error, settings, tmp_path, request):
    scenario = SCENARIOS[name]
    # A group known to fail stops at its first failing case (each costs SETTLE), unless a report wants them all.
    known = request.node.get_closest_marker("xfail") is not None and not os.environ.get("KEYJOBS_FAULT_MATRIX_REPORT")
    failed = []
    with short_leases(settings):
        statements = statements_of(name, tmp_path / "clean.log")
        for statement in commits(statements) if when == "after" else statements:
            fault = Fault(statement.number, after=when == "after", transient=error == "transient")
            result = run_case(scenario, Injector(scenario.step, fault), tmp_path / f"{statement.number}.log")
            _report(name, fault, statement, result)
            if result.problems:
                failed.append(f"{fault} ({' '.join(statement.sql.split())[:100]}): {'; '.join(result.problems)}")
                if known:
                    break
    assert not failed, f"{name}: {len(failed)} case(s) left something stranded:\n" + "\n".join(failed)
