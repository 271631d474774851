"""keyjobs.values: what can be stored, and error text made storable."""

import threading
import time
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection, transaction
from django.test import override_settings
from django.utils import timezone

from keyjobs import Status
from keyjobs.exceptions import ArgumentError, ResultNotStorable, ValueMissing
from keyjobs.models import Invocation, Value
from keyjobs.store import store
from keyjobs.values import HEAD, MAX_DEPTH, MAX_INT_DIGITS, check_arguments, check_result, storable_text, to_json
from keyjobs.worker import Worker
from tests import jobs


def nested(depth):
    value = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    "value",
    [None, True, 0, -1, 2**64, pytest.param(10 ** (MAX_INT_DIGITS - 1), id="longest-int"), 1.5, -0.0, 1e308, "", "é😀\u2028", [], (), {},
     {"a": [1, {"b": None}]}, nested(MAX_DEPTH)],
)
def test_plain_data_is_accepted(value):
    check_arguments({"value": value}, where="t.delay()")
    check_result(value, where="t")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"meta": {"tags": ["a", "b\x00"]}}, r"argument \"x\['meta'\]\['tags'\]\[1\]\" is a string that contains a "
                                             r"NUL character \(at index 1\), which PostgreSQL cannot store in JSON"),
        ({"k\x00": 1}, r"argument 'x' has a key \('k\\x00'\) that contains a NUL character"),
        (["\ud800"], r"argument 'x\[0\]' is a string that contains the surrogate U\+D800 \(at index 0\)"),
        ("\ud83d\ude00", r"contains the surrogate U\+D83D"),  # a pair of surrogates is not the emoji
        ({"\udfff": 1}, r"has a key \('\\udfff'\) that contains the surrogate U\+DFFF"),
        pytest.param(10**MAX_INT_DIGITS, rf"is an integer of more than {MAX_INT_DIGITS} digits", id="huge-int"),
        pytest.param(-(10**MAX_INT_DIGITS), rf"is an integer of more than {MAX_INT_DIGITS} digits", id="-huge-int"),
        (float("nan"), r"argument 'x' is nan, which JSON cannot hold"),
        ([float("-inf")], r"argument 'x\[0\]' is -inf"),
        ({1: "a"}, r"argument 'x' has the key 1; JSON object keys must be strings"),
        ({None: "a"}, r"has the key None"),
        ({1, 2}, r"argument 'x' is a builtins.set, which is not JSON-serializable"),
        (b"bytes", r"is a builtins.bytes"),
        (nested(MAX_DEPTH + 1), rf"nests containers more than {MAX_DEPTH} levels deep"),
    ],
)
def test_what_a_database_would_refuse_or_change_is_refused_with_where_it_is(value, message):
    with pytest.raises(ArgumentError, match=message):
        check_arguments({"x": value}, where="t.delay()")


def test_a_value_that_contains_itself_is_refused_not_walked_for_ever():
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(ResultNotStorable, match="levels deep \\(or contains itself\\)"):
        check_result(loop, where="t")


@override_settings(KEYJOBS_MAX_VALUE_BYTES=100)
def test_arguments_past_the_size_limit_are_refused_together():
    check_arguments({"a": "x" * 40, "b": "y" * 40}, where="t.delay()")
    with pytest.raises(ArgumentError, match=r"the arguments together take over 100 bytes as JSON, past the limit "
                                            r"\(KEYJOBS_MAX_VALUE_BYTES\)"):
        check_arguments({"a": "x" * 60, "b": "y" * 60}, where="t.delay()")


@override_settings(KEYJOBS_MAX_VALUE_BYTES=100)
def test_a_result_past_the_size_limit_is_refused():
    with pytest.raises(ResultNotStorable, match="the result takes over 100 bytes"):
        check_result({"rows": ["é" * 30] * 2}, where="t")  # 120 bytes in UTF-8, 60 characters


def test_a_value_sharing_its_parts_is_refused_without_walking_all_of_them():
    value: list[object] = ["x" * 1000]
    for _ in range(60):  # 2**60 strings once unfolded
        value = [value, value]
    with pytest.raises(ResultNotStorable, match="the result takes over"):
        check_result(value, where="t")


def test_storable_text_marks_nul_and_replaces_surrogates():
    assert storable_text("a\x00b\ud800c") == "a\\x00b\ufffdc"
    assert storable_text("plain ascii") == "plain ascii"


def test_storable_text_keeps_both_ends_of_a_long_text_within_the_limit():
    text = "start " + "x" * 10_000 + " end"
    kept = storable_text(text, limit=500)
    assert len(kept) <= 500
    assert kept.startswith("start ") and kept.endswith(" end") and "characters cut by keyjobs" in kept


# -- large values, stored out of line -------------------------------------------------------------------------------

#: The threshold the tests below set (KEYJOBS_INLINE_VALUE_BYTES): small, so that their values stay small too.
INLINE = 1000


def run_all() -> None:
    """Run a burst worker until nothing is left; fail, not hang, if an invocation is stuck."""
    worker = Worker(threads=1, burst=True, poll_interval=0.01)
    thread = threading.Thread(target=worker.run)
    thread.start()
    thread.join(30)
    if thread.is_alive():
        worker.stop()
        thread.join(10)
        pytest.fail("the burst worker did not finish within 30 s: an invocation is stuck")


@pytest.mark.django_db(transaction=True)
@override_settings(KEYJOBS_INLINE_VALUE_BYTES=INLINE)
@pytest.mark.parametrize("over", [-1, 0, 1, 2])
def test_arguments_round_trip_at_and_around_the_threshold(over):
    # A string argument takes its length and two quotes: the call takes INLINE + over bytes.
    payload = "é" * ((INLINE + over - 2) // 2) + "x" * ((INLINE + over - 2) % 2)
    invocation = jobs.echo.delay(payload)
    stored = Invocation.objects.get(pk=invocation.pk)
    assert (stored.arguments_value_id is not None) == (over > 0)
    if over > 0:
        assert stored.args == [None] and stored.arguments_outline == {
            "args": {"0": {"bytes": INLINE + over, "head": to_json(payload)[:HEAD]}}, "kwargs": {}}
        assert Value.objects.get().size == len(f'{{"args":{{"0":{to_json(payload)}}},"kwargs":{{}}}}'.encode())
    run_all()
    assert Invocation.objects.get(pk=invocation.pk).get_result() == {"args": [payload], "kwargs": {}}


@pytest.mark.django_db(transaction=True)
@override_settings(KEYJOBS_INLINE_VALUE_BYTES=INLINE)
@pytest.mark.parametrize("over", [-1, 0, 1])
def test_a_result_round_trips_at_and_around_the_threshold(over):
    invocation = jobs.text_of.delay(INLINE + over - 2)
    run_all()
    invocation.refresh_from_db()
    assert (invocation.result_value_id is not None) == (over > 0)
    assert (invocation.return_value is None) == (over > 0)
    assert invocation.result == "x" * (INLINE + over - 2) == invocation.get_result()


@pytest.mark.django_db(transaction=True)
@override_settings(KEYJOBS_INLINE_VALUE_BYTES=INLINE)
def test_the_largest_arguments_move_out_and_the_call_comes_back_as_made():
    big, bigger = {"rows": list(range(100))}, ["y" * 700, {"z": 1}]
    invocation = jobs.keyed_echo.delay("acme", big, "small", bigger, extra=bigger, last=(1, 2))
    stored = Invocation.objects.get(pk=invocation.pk)
    # Largest first until the rest fits: bigger, twice (by position, then by name); big (about 300 bytes) stays.
    assert stored.args == ["acme", big, "small", None] and stored.kwargs == {"extra": None, "last": [1, 2]}
    assert set(stored.arguments_outline["args"]) == {"3"} and set(stored.arguments_outline["kwargs"]) == {"extra"}
    run_all()
    assert Invocation.objects.get(pk=invocation.pk).get_result() == {
        "account_id": "acme", "payload": big, "rest": ["small", bigger], "extra": {"extra": bigger, "last": [1, 2]}}


@pytest.mark.django_db(transaction=True)
@override_settings(KEYJOBS_INLINE_VALUE_BYTES=INLINE)
def test_a_key_argument_over_the_limit_is_refused_naming_it():
    with pytest.raises(ArgumentError, match=r"keyed_echo.delay\(\): the key arguments take 1,202 bytes as JSON "
                                            r"together, over KEYJOBS_INLINE_VALUE_BYTES \(1,000\), .* the largest "
                                            r"is argument 'account_id' \(1,202 bytes\)"):
        jobs.keyed_echo.delay("k" * 1200, "small")
    assert not Invocation.objects.exists() and not Value.objects.exists()
    # Under the limit, a key argument stays in the row whatever else moves out.
    invocation = jobs.keyed_echo.delay("k" * 900, "p" * 900)
    assert Invocation.objects.get(pk=invocation.pk).args == ["k" * 900, None]


@pytest.mark.django_db(transaction=True)
@override_settings(KEYJOBS_INLINE_VALUE_BYTES=INLINE, KEYJOBS_MAX_VALUE_BYTES=5000)
def test_past_the_hard_limit_a_call_is_refused_and_nothing_is_stored():
    with pytest.raises(ArgumentError, match=r"over 5,000 bytes as JSON, past the limit \(KEYJOBS_MAX_VALUE_BYTES\)"):
        jobs.echo.delay("x" * 6000)
    assert not Invocation.objects.exists() and not Value.objects.exists()


@pytest.mark.django_db(transaction=True)
@override_settings(KEYJOBS_INLINE_VALUE_BYTES=INLINE)
def test_a_value_shared_by_1000_invocations_is_stored_once():
    config = {"rules": [{"id": number, "name": f"rule {number}"} for number in range(100)]}
    made = jobs.keyed_echo.delay_many([(("acme", config), {"number": number}) for number in range(1000)])
    made += [jobs.keyed_echo.delay("acme", config, number=1000 + number) for number in range(3)]
    value = Value.objects.get()
    assert Invocation.objects.filter(arguments_value=value).count() == 1003
    with transaction.atomic():  # in one transaction too (the caller's): held once more, stored once
        jobs.keyed_echo.delay_many([(("globex", dict(config)), {})] * 10)
    assert Value.objects.count() == 1 and Invocation.objects.filter(arguments_value=value).count() == 1013
    assert Invocation.objects.get(pk=made[-1].pk).call_arguments() == (["acme", config], {"number": 1002})


@pytest.mark.django_db(transaction=True)
@override_settings(KEYJOBS_INLINE_VALUE_BYTES=INLINE)
def test_prunejobs_deletes_only_the_values_no_invocation_refers_to():
    kept, gone = jobs.echo.delay("k" * 2000), jobs.echo.delay("g" * 2000)
    result = jobs.text_of.delay(2000)
    run_all()
    Invocation.objects.filter(pk=gone.pk).update(finished_at=timezone.now() - timedelta(days=10))
    out = StringIO()
    call_command("prunejobs", "--dry-run", stdout=out)
    assert "1 finished invocation(s) would be deleted, and 0 stored value(s)" in out.getvalue()
    call_command("prunejobs", "--batch", "1", stdout=out)
    # Its arguments and its result (echo returns them): two values.
    assert "deleted 1 finished invocation(s), 0 stopped runner(s) and 2 stored value(s)" in out.getvalue()
    kept.refresh_from_db()
    result.refresh_from_db()
    assert set(Value.objects.values_list("pk", flat=True)) == {
        kept.arguments_value_id, kept.result_value_id, result.result_value_id}


@pytest.mark.django_db(transaction=True)
@override_settings(KEYJOBS_INLINE_VALUE_BYTES=INLINE)
def test_a_concurrent_delay_and_prunejobs_never_leave_an_invocation_pointing_at_nothing():
    # One thread delays calls of three large values, alone or in a transaction it holds a moment; the other deletes
    # every invocation and prunes the values, again and again: each value is referred to, unreferred and held by turns.
    payloads = [f"{number}" * 3000 for number in range(3)]
    stop, errors, delayed = threading.Event(), [], []

    def delay() -> None:
        try:
            for number in range(150):
                if number % 2:  # delay() alone: its own transaction
                    delayed.append(jobs.echo.delay(payloads[number % 3]).pk)
                    continue
                with transaction.atomic():
                    delayed.append(jobs.echo.delay(payloads[number % 3]).pk)
                    time.sleep(0.002)
                made = Invocation.objects.filter(pk=delayed[-1]).values_list("arguments_value", flat=True).first()
                if made is not None and not Value.objects.filter(pk=made).exists():
                    errors.append(f"#{delayed[-1]} points at nothing")
        except Exception as exc:
            errors.append(repr(exc))
        finally:
            stop.set()
            connection.close()

    def prune() -> None:
        try:
            while not stop.is_set():
                Invocation.objects.all().delete()
                store("default").prune_values(100)
        except Exception as exc:
            errors.append(repr(exc))
        finally:
            connection.close()

    threads = [threading.Thread(target=delay), threading.Thread(target=prune)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and len(delayed) == 150
    assert not Invocation.objects.filter(arguments_value__isnull=False).exclude(
        arguments_value__in=Value.objects.values("pk")).exists()


def _delete_around_keyjobs(digest: str) -> None:
    """Delete a value as a hand with SQL would, its foreign keys' checks off for the moment."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SET session_replication_role = replica")
            cursor.execute("DELETE FROM keyjobs_value WHERE digest = %s", [digest])
            cursor.execute("SET session_replication_role = DEFAULT")
        else:
            cursor.execute("PRAGMA foreign_keys = OFF")
            cursor.execute("DELETE FROM keyjobs_value WHERE digest = %s", [digest])
            cursor.execute("PRAGMA foreign_keys = ON")


@pytest.mark.django_db(transaction=True)
@override_settings(KEYJOBS_INLINE_VALUE_BYTES=INLINE)
def test_a_run_whose_arguments_value_is_gone_ends_failed_with_why_not_retried():
    invocation = jobs.echo.delay("c" * 2000)  # whatever its code raises is retried
    follower = jobs.keyed_echo.delay("acme", "p" * 2000)
    _delete_around_keyjobs(Invocation.objects.get(pk=follower.pk).arguments_value_id)
    _delete_around_keyjobs(Invocation.objects.get(pk=invocation.pk).arguments_value_id)
    also = jobs.keyed_echo.delay("acme", "small")
    run_all()
    for gone in (invocation, follower):
        gone.refresh_from_db()
        assert gone.status == Status.FAILED and gone.attempts == 1
        assert gone.error.startswith("its arguments' stored value ") and "is missing" in gone.error
        assert gone.error_type == "keyjobs.exceptions.ValueMissing"
    assert Invocation.objects.get(pk=also.pk).get_result()["payload"] == "small"  # the key freed


@pytest.mark.django_db(transaction=True)
@override_settings(KEYJOBS_INLINE_VALUE_BYTES=INLINE)
def test_a_result_whose_value_is_gone_says_so():
    invocation = jobs.text_of.delay(2000)
    run_all()
    invocation.refresh_from_db()
    _delete_around_keyjobs(invocation.result_value_id)
    invocation.refresh_from_db()
    with pytest.raises(ValueMissing, match=r"its result's stored value \w+ is missing"):
        invocation.get_result()


@pytest.mark.django_db(transaction=True)
@override_settings(KEYJOBS_INLINE_VALUE_BYTES=INLINE)
def test_a_debounced_merge_takes_the_later_calls_large_arguments():
    first = jobs.debounced.delay("acme", "a" * 2000)
    merged = jobs.debounced.delay("acme", "b" * 2000)
    assert merged.pk == first.pk
    stored = Invocation.objects.get(pk=first.pk)
    assert stored.args == ["acme", None] and stored.call_arguments() == (["acme", "b" * 2000], {})
    assert Value.objects.count() == 2  # the first call's, unreferred now: prunejobs deletes it
    call_command("prunejobs", stdout=StringIO())
    assert list(Value.objects.values_list("pk", flat=True)) == [stored.arguments_value_id]


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
@override_settings(KEYJOBS_INLINE_VALUE_BYTES=INLINE)
def test_the_prune_skips_a_value_a_delay_holds_without_waiting_for_it():
    held, go_on = threading.Event(), threading.Event()
    jobs.echo.delay("h" * 2000).delete()  # its value stays, referred to by nothing

    def delay_and_wait() -> None:
        try:
            with transaction.atomic():
                jobs.echo.delay("h" * 2000)
                held.set()
                go_on.wait(10)
        finally:
            connection.close()

    thread = threading.Thread(target=delay_and_wait)
    thread.start()
    try:
        assert held.wait(10)
        # Referred to by no committed invocation, but held by the delay (which found it stored): skipped, not
        # waited for. A wait for its lock raises at once here instead of passing slowly.
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SET LOCAL lock_timeout = '500ms'")
            assert store("default").prune_values(100) == 0
    finally:
        go_on.set()
        thread.join()
    [invocation] = Invocation.objects.all()
    assert Value.objects.filter(pk=invocation.arguments_value_id).exists()


@pytest.mark.django_db(transaction=True)
@override_settings(KEYJOBS_INLINE_VALUE_BYTES=INLINE)
def test_a_rolled_back_delay_leaves_neither_its_invocation_nor_its_value():
    with pytest.raises(RuntimeError), transaction.atomic():
        jobs.echo.delay("r" * 2000)
        raise RuntimeError("the caller's transaction fails")
    assert not Invocation.objects.exists() and not Value.objects.exists()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
@override_settings(KEYJOBS_INLINE_VALUE_BYTES=INLINE)
def test_a_batch_of_the_prune_refused_for_a_reference_it_did_not_see_prunes_the_others_and_raises_nothing():
    """Read committed: a delay() that commits its reference after the prune's statement began is not seen by it
    (seen in CI's concurrent test). Here the batch's statement is made as blind to the reference: the foreign key,
    checked at the statement (Django defers it to the commit), refuses it; the others are pruned, it is kept."""
    kept = jobs.echo.delay("k" * 2000)
    for letter in "abc":
        jobs.echo.delay(letter * 2000).delete()  # three values, referred to by nothing
    blind: list[str] = []

    def a_statement_blind_to_the_reference(execute, sql, params, many, context):  # type: ignore[no-untyped-def]
        if not blind and sql.startswith("DELETE") and Value._meta.db_table in sql:
            blind.append(sql)
            return execute(f"DELETE FROM {connection.ops.quote_name(Value._meta.db_table)}", None, many, context)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(a_statement_blind_to_the_reference):
        assert store("default").prune_values(100) == 3
    assert blind
    assert Invocation.objects.get(pk=kept.pk).call_arguments()[0] == ["k" * 2000]
    assert Value.objects.count() == 1
