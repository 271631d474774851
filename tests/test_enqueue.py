import threading

import pytest
from django.db import connection, transaction

from keyjobs import ArgumentError, Status
from keyjobs.models import Event, Invocation
from tests import jobs


def visible_from_another_connection() -> int:
    """Count claimable invocations as a worker (another thread, another connection) sees them."""
    seen: list[int] = []

    def look() -> None:
        try:
            seen.append(Invocation.objects.claimable().count())
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
    barrier = threading.Barrier(6)
    results: list[tuple[int, bool]] = []

    def call() -> None:
        try:
            barrier.wait()
            invocation = jobs.once_per_key.delay("acme")
            results.append((invocation.pk, invocation.reused))
        finally:
            connection.close()

    threads = [threading.Thread(target=call) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
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
