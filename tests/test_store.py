"""The store: the same rows as the ORM, and each step in one statement on PostgreSQL."""

from datetime import timedelta
from typing import Any

import pytest
from django.db import connection, transaction
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from keyjobs import Status
from keyjobs.claim import Claimer, claim
from keyjobs.exceptions import NotOwner
from keyjobs.models import Event, Invocation
from keyjobs.store import store
from keyjobs.store.portable import KEY_ORDER, QUEUE_ORDER
from keyjobs.transitions import move
from tests import jobs
from tests.factories import InvocationFactory, RunnerFactory

pytestmark = pytest.mark.django_db

postgres_only = pytest.mark.postgres


def fields(invocation: Invocation) -> dict[str, object]:
    return {field.attname: getattr(invocation, field.attname) for field in Invocation._meta.concrete_fields}


def test_invocations_read_by_the_statements_equal_the_orms():
    runner = RunnerFactory()
    InvocationFactory(args=[1, "é", {"nested": [None, 2.5]}], kwargs={"b": True}, running_key="k",
                      run_after=timezone.now() - timedelta(seconds=1), runner=runner, runner_thread=3)
    read = store("default").claimable(None, 1, runner_id=runner.pk)
    assert [fields(inv) for inv in read] == [fields(inv) for inv in Invocation.objects.all()]


def test_a_move_stores_values_expressions_and_stamps_as_the_orm_reads_them():
    runner = RunnerFactory()
    invocation = InvocationFactory(status=Status.RUNNING, runner=runner, attempts=1)
    move([invocation.pk], Status.SUCCESS, using="default", only_from={Status.RUNNING}, owner=runner,
         values={"return_value": {"total": [1, "ü"]}})
    invocation.refresh_from_db()
    assert (invocation.status, invocation.return_value, invocation.attempts) == (Status.SUCCESS, {"total": [1, "ü"]}, 1)
    assert invocation.finished_at is not None


def test_a_claim_records_each_step_in_order():
    runner = RunnerFactory()
    first, second = jobs.add.delay(1), jobs.add.delay(2)
    taken = claim(runner, using="default", limit=2, thread=1, start=True)
    assert [inv.pk for inv in taken] == [first.pk, second.pk]
    assert all(inv.status == Status.RUNNING and inv.attempts == 1 and inv.runner == runner for inv in taken)
    steps = list(Event.objects.order_by("id").values_list("invocation_id", "from_status", "to_status", "runner_thread"))
    assert steps == [
        (first.pk, Status.REGISTERED, Status.PENDING, 1), (first.pk, Status.PENDING, Status.RUNNING, 1),
        (second.pk, Status.REGISTERED, Status.PENDING, 1), (second.pk, Status.PENDING, Status.RUNNING, 1),
    ]


@postgres_only
def test_the_one_statement_claim_stops_at_a_key_that_needs_a_decision():
    runner, other = RunnerFactory(), RunnerFactory()
    plain = jobs.add.delay(1)
    held = jobs.keyed.delay("acme", "a")
    Invocation.objects.filter(pk=held.pk).update(status=Status.RUNNING, runner=other)
    blocked = jobs.keyed.delay("acme", "b")
    after = jobs.add.delay(2)
    taken, stopped = store("default").steps.claim_head(
        None, 10, fast_tasks=[jobs.add.name, jobs.keyed.name], claim=Claimer(runner, 0, None).claim(start=False))
    assert ([inv.pk for inv in taken], stopped) == ([plain.pk], True)
    assert Invocation.objects.get(pk=blocked.pk).status == Status.REGISTERED
    assert Invocation.objects.get(pk=after.pk).status == Status.REGISTERED


@pytest.mark.parametrize(("order", "columns"), [(QUEUE_ORDER, ("priority", "registered_at", "id")),
                                                (KEY_ORDER, ("priority", "id"))])
def test_an_orders_comparison_finds_what_its_sort_puts_ahead_and_behind(order, columns):
    now = timezone.now()
    for priority, seconds in [(0, 0), (5, 1), (0, 1), (5, 0), (0, 0), (-1, 2)]:
        InvocationFactory(priority=priority, registered_at=now + timedelta(seconds=seconds))
    sort = [("-" if direction else "") + column for column, direction in order]

    def found(place, behind=False):
        prepared = [Invocation._meta.get_field(column).get_db_prep_value(value, connection)
                    for column, value in zip(columns, place, strict=False)]
        condition, params = store("default").ahead(order, prepared, behind=behind)
        return list(Invocation.objects.extra(where=[condition], params=params).order_by(*sort).values_list(*columns))

    listed = list(Invocation.objects.order_by(*sort).values_list(*columns))
    for at, place in enumerate(listed):
        assert (found(place), found(place, behind=True)) == (listed[:at], listed[at + 1:]), place
    # The first columns only: the place after every row equal to it in those.
    assert len(found([0])) == 5


@postgres_only
def test_the_one_statement_claim_starts_a_keys_call_of_higher_priority_first():
    runner = RunnerFactory()
    earlier = jobs.keyed.delay("acme", "earlier")
    urgent = jobs.keyed.using(priority=5).delay("acme", "urgent")
    taken, stopped = store("default").steps.claim_head(
        None, 10, fast_tasks=[jobs.keyed.name], claim=Claimer(runner, 0, None).claim(start=False))
    assert ([inv.pk for inv in taken], stopped) == ([urgent.pk], True)
    assert Invocation.objects.get(pk=earlier.pk).status == Status.REGISTERED


@postgres_only
def test_the_one_statement_claim_leaves_a_task_it_does_not_know_to_the_general_path():
    unknown = InvocationFactory(task_name="tests.jobs.nowhere")
    taken, stopped = store("default").steps.claim_head(
        None, 5, fast_tasks=[jobs.add.name], claim=Claimer(RunnerFactory(), 0, None).claim())
    assert (taken, stopped) == ([], True)
    assert Invocation.objects.get(pk=unknown.pk).status == Status.REGISTERED


@postgres_only
def test_the_one_statement_move_refuses_another_runners_row_and_writes_nothing():
    mine, theirs = RunnerFactory(), RunnerFactory()
    a = InvocationFactory(status=Status.PENDING, runner=mine)
    b = InvocationFactory(status=Status.PENDING, runner=theirs)
    with pytest.raises(NotOwner):
        move([a.pk, b.pk], Status.REGISTERED, using="default", only_from={Status.PENDING}, owner=mine)
    assert set(Invocation.objects.values_list("status", flat=True)) == {Status.PENDING}
    assert not Event.objects.exists()


@postgres_only
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("setting", "prepared"), [(True, True), (False, False)])
def test_the_hot_statements_are_prepared_unless_turned_off(setting, prepared):
    runner = RunnerFactory()
    connection.close()  # a fresh connection: Django's own setting, prepared statements off
    with override_settings(KEYJOBS_PREPARE_STATEMENTS=setting):
        for n in range(8):
            jobs.add.delay(n)
            claim(runner, using="default", start=True)
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE '%%WITH candidates AS (SELECT%%'")
        (count,) = cursor.fetchone()
    assert bool(count) is prepared


@postgres_only
def test_finishing_work_without_a_key_claims_the_threads_next_in_the_same_statement():
    from keyjobs.claim import Claimer
    from keyjobs.execute import execute

    runner = RunnerFactory()
    first, second = jobs.add.delay(1, b=1), jobs.add.delay(2, b=2)
    [running] = claim(runner, using="default", start=True, thread=3)
    handed: list[Invocation] = []
    execute(running, runner, using="default", thread=3, claimer=Claimer(runner, 3, None), handed=handed)
    assert [inv.pk for inv in handed] == [second.pk]
    assert (handed[0].status, handed[0].runner_id, handed[0].runner_thread, handed[0].attempts) == (
        Status.RUNNING, runner.pk, 3, 1)
    assert list(Event.objects.order_by("id").values_list("invocation_id", "to_status"))[-3:] == [
        (first.pk, Status.SUCCESS), (second.pk, Status.PENDING), (second.pk, Status.RUNNING)]


@postgres_only
def test_an_outcome_refused_to_a_runner_that_lost_the_invocation_claims_nothing():
    from keyjobs.claim import Claimer, record_and_claim

    mine, theirs = RunnerFactory(), RunnerFactory()
    taken_from_me = InvocationFactory(status=Status.RUNNING, runner=theirs)
    waiting = jobs.add.delay(1)
    with pytest.raises(NotOwner):
        record_and_claim(taken_from_me, Status.SUCCESS, values={}, note="", claimer=Claimer(mine, 0, None),
                        using="default")
    assert Invocation.objects.get(pk=taken_from_me.pk).status == Status.RUNNING
    assert Invocation.objects.get(pk=waiting.pk).status == Status.REGISTERED


@pytest.mark.sqlite
@pytest.mark.django_db(transaction=True)
def test_threads_of_one_process_take_turns_to_write_to_sqlite():
    import threading

    runner = RunnerFactory()
    jobs.add.delay(1)
    order: list[str] = []
    holding, release = threading.Event(), threading.Event()

    def hold_the_turn() -> None:
        with store("default").writing():
            order.append("held")
            holding.set()
            release.wait(5)
            order.append("released")

    def claim_meanwhile() -> None:
        try:
            holding.wait(5)
            claim(runner, using="default")
            order.append("claimed")
        finally:
            connection.close()

    threads = [threading.Thread(target=hold_the_turn), threading.Thread(target=claim_meanwhile)]
    for thread in threads:
        thread.start()
    holding.wait(5)
    threading.Timer(0.2, release.set).start()
    for thread in threads:
        thread.join(10)
    assert order == ["held", "released", "claimed"]


@postgres_only
@pytest.mark.parametrize("queues", [None, ["default", "reports", "urgent"]])
def test_every_hot_statement_is_converted_once_whatever_its_length(queues):
    """psycopg parses a statement longer than 4 kB on every run (0.1 ms for the 6 kB wake-up that claims): the
    store's cursor converts each text once (``NativeCursor``), and a second round of the same work adds none."""
    from keyjobs.execute import execute
    from keyjobs.store import postgres

    seen: list[str] = []

    def spy(run, sql, params, many, context):
        seen.append(sql)
        return run(sql, params, many, context)

    def a_round() -> None:
        for op in "abc":
            jobs.keyed.delay("acme", op)  # a key's chain: hand-offs and wake-ups
        jobs.add.delay(1), jobs.add.delay(2)  # keyless work: record-and-claim
        jobs.keyed.delay("other", "x")  # a wake-up that claims the queue's next
        queue = claim(runner, using="default", queues=queues, start=True, thread=0)
        while queue:
            invocation = queue.pop(0)
            handed: list[Invocation] = []
            execute(invocation, runner, using="default", thread=0, claimer=Claimer(runner, 0, queues), handed=handed)
            queue[:0] = handed or claim(runner, using="default", queues=queues, start=True, thread=0)
        assert Invocation.objects.exclude(status=Status.SUCCESS).count() == 0

    runner = RunnerFactory()
    a_round()
    converted = postgres.native.cache_info().currsize
    with connection.execute_wrapper(spy):
        a_round()
    steps = [sql for sql in seen if sql.startswith("WITH")]
    assert steps and max(map(len, steps)) > 4096  # the wake-up that claims: longer than psycopg would keep
    assert postgres.native.cache_info().currsize == converted  # every text of the second round known already


def test_placeholders_are_converted_to_postgresqls_own() -> None:
    from keyjobs.store.postgres import native

    assert native("SELECT %s, %s, '%%'") == ("SELECT $1, $2, '%'", ())
    assert native("SELECT %(a)s, %(b)s, %(a)s") == ("SELECT $1, $2, $1", ("a", "b"))
    with pytest.raises(ValueError, match="mixes"):
        native("SELECT %(a)s, %s")


@postgres_only
def test_a_record_and_claim_reads_the_backlog_in_order_whatever_the_statistics_say():
    """Statistics taken when nothing was registered (a finished day, a queue that just filled): PostgreSQL guessed one
    registered row, read the backlog through keyjobs_status_finished, then over every row, and sorted all of it at
    each claim (0.2 ms of a record-and-claim's 0.4 behind a backlog of 1,000)."""
    from keyjobs.execute import execute

    InvocationFactory.create_batch(500, status=Status.SUCCESS)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    jobs.add.delay_many([((n,), {}) for n in range(300)])
    seen: list[tuple[str, Any]] = []

    def spy(run, sql, params, many, context):
        seen.append((sql, params))
        return run(sql, params, many, context)

    runner = RunnerFactory()
    (first,) = claim(runner, using="default", queues=None, start=True, thread=0)
    with connection.execute_wrapper(spy):
        execute(first, runner, using="default", thread=0, claimer=Claimer(runner, 0, None), handed=[])
    (statement, params), = [(sql, params) for sql, params in seen if "candidates AS" in sql and "moved AS" in sql]
    with transaction.atomic(), store("default").cursor() as cursor:
        cursor.execute("EXPLAIN " + statement, params)
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "keyjobs_claim " in plan and "keyjobs_status_finished" not in plan, plan


@pytest.mark.django_db(transaction=True)
def test_the_owners_of_a_key_are_read_through_their_partial_index_whatever_its_backlog():
    jobs.keyed.delay_many([(("hot", "x"), {})] * 3000)
    first = Invocation.objects.order_by("id").first()
    Invocation.objects.filter(pk=first.pk).update(status=Status.RUNNING, runner=RunnerFactory())
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("ANALYZE")  # SQLite keeps no statistics unless asked: a runner's database has none
        cursor.execute(connection.ops.explain_query_prefix() + " " + store("default").owned_slots_sql(),
                       [first.task_name, first.running_key])
        plan = "\n".join(str(row[-1]) for row in cursor.fetchall())
    assert "keyjobs_one_owner_per_running_key" in plan, plan
    assert store("default").owned_slots(first.task_name, first.running_key, lock=False) == {0}
    # The general wake-up reads them with the key's control, in one statement: through the same index.
    with connection.cursor() as cursor:
        cursor.execute(connection.ops.explain_query_prefix() + " " + store("default").key_slots_sql(),
                       [first.task_name, first.running_key] * 2)
        plan = "\n".join(str(row[-1]) for row in cursor.fetchall())
    assert "keyjobs_one_owner_per_running_key" in plan and "keyjobs_by_key" not in plan, plan
    assert store("default").key_slots(first.task_name, first.running_key) == ({0}, None)


@postgres_only
def test_a_thread_that_frees_a_key_with_nothing_to_hand_over_takes_the_queues_next_in_the_wake_up():
    """On PostgreSQL the wake-up claims the freeing thread's next (as a record-and-claim does for keyless work): no
    claim of its own follows each freed key."""
    from keyjobs.execute import execute

    runner = RunnerFactory()
    keyed = jobs.keyed.delay("acme", "a")
    plain = jobs.add.delay(1)
    (first,) = claim(runner, using="default", queues=None, start=True, thread=0)
    assert first.pk == keyed.pk
    handed: list[Invocation] = []
    with CaptureQueriesContext(connection) as statements:
        execute(first, runner, using="default", thread=0, claimer=Claimer(runner, 0, None), handed=handed)
    assert [invocation.pk for invocation in handed] == [plain.pk]
    assert Invocation.objects.get(pk=plain.pk).status == Status.RUNNING
    assert not [query for query in statements.captured_queries if query["sql"].startswith("WITH candidates")]
