"""rate_limit: at most N starts of a key in any window, deferred (or dropped) past that, arbitrated by the database."""

import signal
import threading
from datetime import datetime, timedelta

import pytest
from django.db import connections, transaction

from keyjobs import Mode, Status, TaskDeclarationError, task
from keyjobs.admission import KeyState, Policy, Rate, Verdict, admit, in_fast_path
from keyjobs.claim import _defer as claim_step
from keyjobs.claim import claim
from keyjobs.enqueue import enqueue_many
from keyjobs.models import Event, Invocation, RateToken, Runner
from keyjobs.spec import Options
from keyjobs.store import store
from keyjobs.worker import Worker
from tests import jobs
from tests.factories import RunnerFactory
from tests.fault_injection import Step, every_fault
from tests.waiting import wait_for

LATER = datetime(2030, 1, 1)


def most_starts_in_a_window(starts: list[datetime], window: float) -> int:
    """The most starts that fall in one half-open window [s, s + window) beginning at a start."""
    starts = sorted(starts)
    return max((sum(1 for other in starts if start <= other < start + timedelta(seconds=window)) for start in starts),
               default=0)


# -- the rule ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("spelled", "rate"), [
    ("100/m", Rate(100, 60.0)), ("10/s", Rate(10, 1.0)), ("1000/h", Rate(1000, 3600.0)), ("5/10s", Rate(5, 10.0)),
    ((100, timedelta(minutes=1)), Rate(100, 60.0)), (" 20 / s ", Rate(20, 1.0)),
])
def test_a_rate_is_spelled_as_a_string_or_a_pair(spelled: object, rate: Rate) -> None:
    assert Rate.parse(spelled) == rate


def test_a_full_window_defers_a_start_the_slots_allow_or_drops_it_where_blocked_work_is_dropped() -> None:
    rate = Rate(3, 1.0)
    assert admit(Policy(rate=rate), KeyState(window_full_until=LATER)) .verdict is Verdict.DEFER
    assert admit(Policy(rate=rate), KeyState(window_full_until=LATER)).until == LATER
    assert admit(Policy(rate=rate, park_blocked=False), KeyState(window_full_until=LATER)).verdict is Verdict.DROP
    # The slots are asked first: a busy key parks, whatever its window.
    assert admit(Policy(rate=rate), KeyState(held={0}, window_full_until=LATER)).verdict is Verdict.PARK
    assert admit(Policy(rate=rate), KeyState()).verdict is Verdict.START


def test_a_rate_limited_task_takes_the_general_path() -> None:
    assert not in_fast_path(jobs.rated.spec.policy)
    assert in_fast_path(jobs.keyed.spec.policy)


@pytest.mark.parametrize(("options", "message"), [
    ({"rate_limit": "100/week"}, "rate_limit='100/week' must be"),
    ({"rate_limit": "fast"}, "rate_limit='fast' must be"),
    ({"rate_limit": "0/s"}, "rate_limit='0/s' must allow at least 1 start"),
    ({"rate_limit": (5, timedelta(0))}, "must allow at least 1 start"),
    ({"rate_limit": (-1, timedelta(seconds=1))}, "must allow at least 1 start"),
    ({"rate_limit": (2.5, timedelta(seconds=1))}, "must count whole starts"),
    ({"rate_limit": 10}, "rate_limit=10 must be a string"),
])
def test_a_bad_rate_limit_is_refused_at_decoration(options: dict[str, object], message: str) -> None:
    with pytest.raises(TaskDeclarationError, match="rate_limit") as refused:
        task(running_concurrency=Mode.KEYS, key_arguments=("account_id",), **options)(jobs.rated.func)
    assert message in str(refused.value)


def test_a_rate_limit_needs_a_running_key() -> None:
    with pytest.raises(TaskDeclarationError, match="rate_limit counts the starts of each running key"):
        task(rate_limit="10/s")(jobs.rated.func)


# -- the database arbitrates -----------------------------------------------------------------------


@pytest.mark.django_db
def test_a_key_takes_at_most_its_count_of_tokens_in_a_window() -> None:
    db = store("default")
    rate = Rate(2, 60.0)
    first, second, third = (db.take_start("t", "k", rate) for _ in range(3))
    assert first.taken_at is not None and second.taken_at is not None
    assert third.taken_at is None and third.full_until == first.taken_at + timedelta(seconds=60)
    assert RateToken.objects.filter(task_name="t", running_key="k").count() == 2
    # Another key has its own window.
    assert db.take_start("t", "other", rate).taken_at is not None


@pytest.mark.django_db
def test_a_token_frees_a_window_after_its_use() -> None:
    db = store("default")
    rate = Rate(1, 60.0)
    assert db.take_start("t", "k", rate).taken_at is not None
    RateToken.objects.update(used_at=db.clock() - timedelta(seconds=61))
    assert db.take_start("t", "k", rate).taken_at is not None


@pytest.mark.django_db(transaction=True)
@pytest.mark.postgres
def test_two_connections_racing_for_the_last_token_get_one_start_between_them() -> None:
    rate = Rate(1, 60.0)
    taken, release = threading.Event(), threading.Event()
    found: dict[str, object] = {}

    def first() -> None:
        try:
            with transaction.atomic():
                found["first"] = store("default").take_start("t", "k", rate).taken_at
                taken.set()
                release.wait(10)
        finally:
            connections.close_all()

    racer = threading.Thread(target=first)
    racer.start()
    assert taken.wait(10)
    with transaction.atomic():
        found["second, while the first holds it"] = store("default").take_start("t", "k", rate).taken_at
    release.set()
    racer.join(10)
    with transaction.atomic():
        found["second, once the first committed"] = store("default").take_start("t", "k", rate).taken_at
    assert found["first"] is not None
    assert found["second, while the first holds it"] is None
    assert found["second, once the first committed"] is None


# -- deferred, never lost ------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_starts_over_the_rate_are_deferred_and_all_run_within_the_rate() -> None:
    invocations = [jobs.rated.delay("acme", number) for number in range(7)]
    Worker(threads=2, burst=True).run()
    finished = Invocation.objects.filter(pk__in=[inv.pk for inv in invocations])
    assert sorted(finished.values_list("status", flat=True)) == [Status.SUCCESS] * 7
    starts = list(finished.values_list("started_at", flat=True))
    assert most_starts_in_a_window(starts, 1.0) <= 3
    # 7 starts at 3 a second need three windows.
    assert max(starts) - min(starts) >= timedelta(seconds=2)
    deferred = Event.objects.filter(kind=Event.Kind.DEFERRED, invocation__in=invocations)
    assert deferred.exists()
    assert all("its key's rate window (3/s) was full: deferred until" in note
               for note in deferred.values_list("note", flat=True))


@pytest.mark.django_db(transaction=True)
def test_a_task_that_drops_blocked_work_drops_a_start_over_its_rate() -> None:
    outcomes = []
    for number in range(3):
        invocation = jobs.rated_drop.delay("acme", number)
        Worker(threads=1, burst=True).run()
        invocation.refresh_from_db()
        outcomes.append(invocation.status)
    assert outcomes == [Status.SUCCESS, Status.SUCCESS, Status.CONCURRENCY_CONTROLLED_FINAL]


@pytest.mark.django_db(transaction=True)
def test_a_deferred_invocation_holds_no_thread_and_blocks_no_other_key() -> None:
    rated = [jobs.rated.delay("acme", number) for number in range(4)]
    worker = Worker(threads=1, poll_interval=0.05)
    running = threading.Thread(target=worker.run)
    running.start()
    try:
        wait_for(lambda: Event.objects.filter(kind=Event.Kind.DEFERRED, invocation=rated[3]).exists(),
                 timeout=30, what="the fourth start deferred")
        other = jobs.keyed.delay("globex", "sync")
        wait_for(lambda: Invocation.objects.get(pk=other.pk).status == Status.SUCCESS, timeout=30,
                 what="the other key's run")
        wait_for(lambda: Invocation.objects.get(pk=rated[3].pk).status == Status.SUCCESS, timeout=30,
                 what="the deferred run")
    finally:
        worker.stop()
        running.join(30)
    other_finished = Invocation.objects.get(pk=other.pk).finished_at
    assert other_finished < Invocation.objects.get(pk=rated[3].pk).started_at


@pytest.mark.django_db(transaction=True)
def test_a_retry_counts_as_a_start() -> None:
    runner = RunnerFactory()
    first = jobs.rated_drop.delay("acme", 1)
    [claimed] = claim(runner, using="default", thread=0, start=True)
    assert claimed.pk == first.pk
    Invocation.objects.filter(pk=first.pk).update(status=Status.REGISTERED)  # as a retry registers it again
    [again] = claim(runner, using="default", thread=0, start=True)
    assert again.pk == first.pk
    Invocation.objects.filter(pk=first.pk).update(status=Status.SUCCESS)
    jobs.rated_drop.delay("acme", 2)
    assert claim(runner, using="default", thread=0, start=True) == []  # the window (2/m) is full: dropped
    assert Invocation.objects.filter(status=Status.CONCURRENCY_CONTROLLED_FINAL).count() == 1


# -- real worker processes ---------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_two_worker_processes_racing_never_exceed_the_rate_of_a_key(worker_process, tmp_path) -> None:
    """Four runs of an account may run at once: only the rate window (3/s) holds the racing workers back."""
    log = tmp_path / "starts.log"
    workers = [worker_process("--threads", "4") for _ in range(2)]
    wait_for(lambda: Runner.objects.active().count() == 2, timeout=60, what="both workers started")
    accounts, per_account = 3, 10
    invocations = enqueue_many(Options(jobs.rated_wide),
        [((f"account-{a}", n, str(log)), {}) for n in range(per_account) for a in range(accounts)])
    wait_for(lambda: Invocation.objects.finished().count() == len(invocations), timeout=120,
             what="every run final")
    for worker in workers:
        worker.signal(signal.SIGTERM)
        worker.wait(timeout=30)
    assert Invocation.objects.filter(status=Status.SUCCESS).count() == len(invocations)
    for a in range(accounts):
        starts = list(Invocation.objects.filter(args__0=f"account-{a}").values_list("started_at", flat=True))
        assert len(starts) == per_account
        assert most_starts_in_a_window(starts, 1.0) <= 3, f"account-{a} started more than 3 times in a second"
    pids = {line.split()[3] for line in log.read_text().splitlines()}
    assert len(pids) == 2, "both worker processes took work"


@pytest.mark.django_db(transaction=True)
def test_a_deferral_that_failed_or_lost_its_reply_is_written_once_when_the_claim_comes_again() -> None:
    runner = RunnerFactory()
    keys = iter(range(1000))

    def a_full_window() -> Invocation:
        key = f"acme{next(keys)}"
        calls = enqueue_many(Options(jobs.rated_per_minute), [((key, n), {}) for n in range(4)])
        for thread in range(3):
            claim(runner, using="default", thread=thread, start=True)
        return calls[3]

    deferred = every_fault(Step("deferral", (claim_step,)), a_full_window,
                           lambda invocation: claim(runner, using="default", thread=3, start=True))
    for invocation in deferred:
        invocation.refresh_from_db()
        assert invocation.status == Status.REGISTERED and invocation.run_after is not None
        assert Event.objects.filter(invocation=invocation, kind=Event.Kind.DEFERRED).count() == 1
