import threading
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection, transaction
from django.test import override_settings

from keyjobs import ArgumentError, Status
from keyjobs.models import Event, Invocation
from keyjobs.store import store
from tests import jobs
from tests.waiting import at_once


def visible_from_another_connection() -> int:
    """Count claimable invocations as a worker (another thread, another connection) sees them."""
    seen: list[int] = []

    def look() -> None:
        try:
            seen.append(Invocation.objects.filter(status=Status.REGISTERED).count())
        finally:
            connection.close()

    thread = threading.Thread(target=look)
    thread.start()
    thread.join()
    return seen[0]


@pytest.mark.django_db
def test_delay_inserts_a_registered_invocation():
    invocation = jobs.add.delay(1, b=2)
    stored = Invocation.objects.get(pk=invocation.pk)
    assert (stored.task_name, stored.status, stored.args, stored.kwargs) == ("tests.jobs.add", "REGISTERED", [1], {"b": 2})
    assert invocation.reused is False


@pytest.mark.django_db
def test_delay_stores_tuples_as_lists():
    invocation = jobs.add.delay((1, 2), b={"x": (3,)})
    invocation.refresh_from_db()
    assert invocation.args == [[1, 2]] and invocation.kwargs == {"b": {"x": [3]}}


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("value", "message"),
    [
        (object(), r"argument 'b' is a builtins.object, which is not JSON-serializable"),
        ({"when": {1, 2}}, r"argument \"b\['when'\]\" is a builtins.set"),
        ({1: "x"}, r"argument 'b' has the key 1; JSON object keys must be strings"),
        (float("nan"), r"argument 'b' is nan"),
    ],
)
def test_a_non_json_argument_is_refused_and_nothing_is_inserted(value, message):
    with pytest.raises(ArgumentError, match=message):
        jobs.add.delay(1, b=value)
    assert not Invocation.objects.exists()


@pytest.mark.django_db
def test_arguments_that_do_not_fit_the_signature_are_refused():
    with pytest.raises(ArgumentError, match=r"tests.jobs.add.delay\(\): missing a required argument: 'a'"):
        jobs.add.delay(b=1)
    with pytest.raises(ArgumentError, match="unexpected keyword argument 'c'"):
        jobs.add.delay(1, c=1)
    assert not Invocation.objects.exists()


@pytest.mark.django_db
def test_a_refused_call_leaves_what_was_stored_alone():
    kept = jobs.add.delay(1)
    with pytest.raises(ArgumentError):
        jobs.add.delay(object())
    assert list(Invocation.objects.values_list("pk", flat=True)) == [kept.pk]


@pytest.mark.django_db(transaction=True)
def test_delay_in_a_rolled_back_transaction_is_rolled_back_too():
    with pytest.raises(RuntimeError), transaction.atomic():
        jobs.add.delay(1)
        raise RuntimeError("the view failed")
    assert not Invocation.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_delay_is_invisible_to_workers_until_commit():
    with transaction.atomic():
        jobs.add.delay(1)
        assert visible_from_another_connection() == 0
    assert visible_from_another_connection() == 1


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("task", "same", "different"),
    [
        (jobs.once_per_task, [("acme",), ("globex", "other")], None),
        (jobs.once_per_arguments, [("acme",), ("acme", "sync")], ("acme", "other")),
        (jobs.once_per_key, [("acme",), ("acme", "other")], ("globex",)),
    ],
    ids=["TASK", "ARGUMENTS", "KEYS"],
)
def test_registration_concurrency_reuses_the_waiting_invocation(task, same, different):
    first = task.delay(*same[0])
    duplicate = task.delay(*same[1])
    assert duplicate.pk == first.pk and duplicate.reused is True
    assert Event.objects.get(invocation=first, kind=Event.Kind.REUSED).to_status == Status.REGISTERED
    if different is not None:
        other = task.delay(*different)
        assert other.pk != first.pk and other.reused is False


@pytest.mark.django_db
def test_registration_concurrency_disabled_never_reuses():
    assert jobs.add.delay(1).pk != jobs.add.delay(1).pk


@pytest.mark.django_db
def test_registration_concurrency_only_counts_waiting_invocations():
    first = jobs.once_per_key.delay("acme")
    Invocation.objects.filter(pk=first.pk).update(status=Status.RUNNING)
    second = jobs.once_per_key.delay("acme")
    assert second.pk != first.pk and second.reused is False


@pytest.mark.django_db(transaction=True)
def test_concurrent_duplicates_end_up_as_one_invocation():
    results: list[tuple[int, bool]] = []

    def call() -> None:
        invocation = jobs.once_per_key.delay("acme")
        results.append((invocation.pk, invocation.reused))

    assert at_once(call, 6) == []
    assert len({pk for pk, _ in results}) == 1
    assert sorted(reused for _, reused in results) == [False] + [True] * 5
    assert Invocation.objects.count() == 1


@pytest.mark.django_db
def test_delay_many_inserts_every_call():
    created = jobs.keyed.delay_many([(("acme", "a"), {}), {"account_id": "globex", "op": "b"}])
    assert [inv.running_key for inv in created] == ['{"account_id":"acme"}', '{"account_id":"globex"}']
    assert Invocation.objects.count() == 2


@pytest.mark.django_db
def test_delay_many_deduplicates_like_delay():
    created = jobs.refresh_once.delay_many([{"account_id": "acme"}] * 3 + [{"account_id": "globex"}])
    assert [inv.reused for inv in created] == [False, True, True, False]
    assert Invocation.objects.count() == 2


@pytest.mark.django_db
def test_delay_many_refuses_a_malformed_call_and_inserts_nothing():
    with pytest.raises(ArgumentError, match=r"call 1 must be an \(args, kwargs\) pair"):
        jobs.add.delay_many([{"a": 1}, 5])
    assert not Invocation.objects.exists()


#: Arguments whose JSON has edge cases: non-ASCII text, escapes, nesting, big and fractional numbers.
AWKWARD = (
    ["naïve café ☃ 日本語 🚀", 'quote " backslash \\ newline \n tab \t', 2**60, -1.5, None, True],
    {"nested": {"list": [1, [2, [3, {"deep": "é"}]]], "empty": {}, "none": [], "ünï": "cödé"}},
)


def stored_columns(pk: int) -> tuple:
    """Return invocation ``pk``'s columns as the database holds them, bar its id and database-clock readings."""
    fields = [field for field in Invocation._meta.concrete_fields if field not in Invocation._meta.db_returning_fields]
    quote = connection.ops.quote_name
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {', '.join(quote(field.column) for field in fields)} FROM {quote(Invocation._meta.db_table)} "
            f"WHERE {quote('id')} = %s",
            [pk],
        )
        return cursor.fetchone()


@pytest.mark.django_db
def test_delay_and_delay_many_store_a_call_exactly_as_the_orm_does():
    a, b = AWKWARD
    when = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    saved = Invocation(task_name="tests.jobs.add", queue="awkward", priority=7, args=[a], kwargs={"b": b}, run_after=when)
    saved.save()
    options = jobs.add.using(queue="awkward", priority=7, run_after=when)
    delayed = options.delay(a, b=b)
    [many, _] = options.delay_many([((a,), {"b": b}), ((1,), {})])
    assert stored_columns(delayed.pk) == stored_columns(saved.pk) == stored_columns(many.pk)
    for invocation in (delayed, many):
        stored = Invocation.objects.get(pk=invocation.pk)
        assert (stored.args, stored.kwargs) == ([a], {"b": b}) == (invocation.args, invocation.kwargs)


@pytest.mark.django_db
def test_delay_returns_the_invocation_as_saved_with_the_database_clock():
    invocation = jobs.add.delay(1)
    stored = Invocation.objects.get(pk=invocation.pk)
    assert invocation._state.adding is False and invocation._state.db == "default"
    assert invocation.created_at.tzinfo is not None
    for field in Invocation._meta.db_returning_fields:
        assert getattr(invocation, field.attname) == getattr(stored, field.attname)


@pytest.mark.django_db
def test_delay_many_returns_the_invocations_in_call_order_with_their_pks():
    created = jobs.add.delay_many([((n,), {}) for n in range(50)])
    pks = [invocation.pk for invocation in created]
    assert pks == sorted(pks) and len(set(pks)) == 50
    assert dict(Invocation.objects.values_list("pk", "args")) == {inv.pk: [n] for n, inv in enumerate(created)}
    assert all(not invocation._state.adding and invocation.created_at is not None for invocation in created)


@pytest.mark.django_db
def test_delay_many_stores_each_calls_own_run_after():
    before = store("default").clock()  # a delay counts from the database's clock
    created = jobs.add.using(run_after=timedelta(hours=1)).delay_many([((n,), {}) for n in range(3)])
    stored = dict(Invocation.objects.values_list("pk", "run_after"))
    assert [stored[invocation.pk] for invocation in created] == [invocation.run_after for invocation in created]
    after = store("default").clock()
    assert all(before + timedelta(hours=1) <= invocation.run_after <= after + timedelta(hours=1)
               for invocation in created)


@pytest.mark.django_db
def test_delay_many_past_the_databases_parameter_limit_inserts_every_call_in_order():
    # Several statements on either database: SQLite takes 32,766 parameters a statement, delay_many() 2,000 rows.
    count = 5000
    created = jobs.add.delay_many([((n,), {"b": n % 7}) for n in range(count)])
    assert [invocation.args for invocation in created] == [[n] for n in range(count)]
    stored = dict(Invocation.objects.values_list("pk", "args"))
    assert len(stored) == count and all(stored[inv.pk] == inv.args for inv in created)


@pytest.mark.django_db(transaction=True)
def test_delay_many_in_a_rolled_back_transaction_is_rolled_back_too():
    with pytest.raises(RuntimeError), transaction.atomic():
        jobs.add.delay_many([((n,), {}) for n in range(5000)])
        raise RuntimeError("the view failed")
    assert not Invocation.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_delay_outside_a_transaction_is_one_statement(django_assert_num_queries):
    with django_assert_num_queries(1):
        jobs.add.delay(1)
    assert Invocation.objects.count() == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: jobs.add.delay("PostgreSQL refuses \x00 in JSON"),
         r"tests\.jobs\.add\.delay\(\): argument 'a' is a string that contains a NUL character \(at index 19\)"),
        (lambda: jobs.add.delay(1, b={"meta": {"tags": ["ok", "\x00"]}}),
         r"argument \"b\['meta'\]\['tags'\]\[1\]\" is a string that contains a NUL character"),
        (lambda: jobs.add.delay(1, b={"k\x00": 1}), r"argument 'b' has a key \('k\\x00'\) that contains a NUL"),
        (lambda: jobs.keyed.delay("acme\x00", "op"), r"tests\.jobs\.keyed\.delay\(\): argument 'account_id' is a "
                                                     r"string that contains a NUL"),
        (lambda: jobs.keyed.delay("\ud800", "op"), r"argument 'account_id' is a string that contains the surrogate"),
        (lambda: jobs.add.delay(10**5000), r"argument 'a' is an integer of more than 4300 digits"),
        (lambda: jobs.add.delay_many([((1,), {}), ((2,), {"b": "\x00"})]), r"argument 'b' is a string that contains"),
    ],
    ids=["nul", "nul-deep", "nul-in-a-key", "nul-in-a-key-argument", "surrogate-in-a-key-argument", "huge-int",
         "delay-many"],
)
def test_what_a_database_would_refuse_is_refused_before_it_and_the_callers_transaction_goes_on(call, message):
    with transaction.atomic():
        kept = jobs.add.delay(1)
        with pytest.raises(ArgumentError, match=message):
            call()
        assert Invocation.objects.count() == 1  # the transaction is usable
        also = jobs.add.delay(2)
    assert sorted(Invocation.objects.values_list("pk", flat=True)) == [kept.pk, also.pk]


@pytest.mark.django_db
@override_settings(KEYJOBS_MAX_VALUE_BYTES=1000)
def test_arguments_past_the_size_limit_are_refused_with_the_setting_named():
    jobs.add.delay("x" * 900)
    with pytest.raises(ArgumentError, match=r"tests\.jobs\.add\.delay\(\): the arguments together take over 1,000 "
                                            r"bytes as JSON, past the limit \(KEYJOBS_MAX_VALUE_BYTES\)"):
        jobs.add.delay("x" * 600, b="y" * 600)
    assert Invocation.objects.count() == 1


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_delay_and_delay_many_wake_runners_once_each_on_commit():
    import psycopg

    with psycopg.connect(**connection.get_connection_params(), autocommit=True) as listener:
        listener.execute("LISTEN keyjobs")
        jobs.add.delay(1)
        assert [n.payload for n in listener.notifies(timeout=1, stop_after=1)] == ["default"]
        with transaction.atomic():
            # Several statements, each asking for the wake-up: the runners get it once, at commit.
            jobs.add.using(queue="bulk").delay_many([((n,), {}) for n in range(5000)])
            assert [n.payload for n in listener.notifies(timeout=0.3)] == []
        assert [n.payload for n in listener.notifies(timeout=0.5)] == ["bulk"]


@pytest.mark.django_db
def test_delay_many_parks_what_follows_the_first_of_its_key_and_says_so():
    first, second, other, third = jobs.keyed.delay_many(
        [(("acme", "a"), {}), (("acme", "b"), {}), (("globex", "a"), {}), (("acme", "c"), {})]
    )
    stored = dict(Invocation.objects.values_list("pk", "status"))
    assert [stored[inv.pk] for inv in (first, second, other, third)] == [
        Status.REGISTERED, Status.REROUTED, Status.REGISTERED, Status.REROUTED]
    notes = dict(Event.objects.values_list("invocation_id", "note"))
    assert set(notes) == {second.pk, third.pk}
    assert notes[second.pk] == f"parked at enqueue behind #{first.pk} of its key, enqueued with it"


@pytest.mark.django_db
def test_delay_many_runs_a_parked_key_in_order():
    from keyjobs.claim import claim
    from keyjobs.execute import execute
    from tests.factories import RunnerFactory

    runner = RunnerFactory()
    calls = jobs.keyed.delay_many([(("acme", str(n)), {}) for n in range(4)])
    ran = []
    while claimed := claim(runner, using="default", start=True):
        ran.append(claimed[0].pk)
        execute(claimed[0], runner, using="default")
    assert ran == [inv.pk for inv in calls]


@pytest.mark.django_db
def test_delay_many_leaves_work_that_is_dropped_when_blocked_to_be_decided_when_it_comes_up():
    jobs.keyed_drop.delay_many([(("acme",), {}), (("acme",), {})])
    assert set(Invocation.objects.values_list("status", flat=True)) == {Status.REGISTERED}


@pytest.mark.django_db
def test_delay_many_parks_a_backlog_larger_than_one_statement_takes():
    jobs.keyed.delay_many([(("acme", str(n)), {}) for n in range(5000)])  # 4,999 history rows: 35,000 parameters
    assert Invocation.objects.filter(status=Status.REROUTED).count() == 4999
    assert Event.objects.filter(to_status=Status.REROUTED).count() == 4999
