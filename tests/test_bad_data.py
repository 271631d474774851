"""Arbitrary values through delay(), a real worker and back: refused at delay(), or final and intact.

Values, keys, results and exception messages are generated over the whole
code-point range (NUL and surrogates included), with huge integers, NaN and
infinities, deep nesting and non-string dict keys. Each ends one of two ways:
``ArgumentError`` at delay() (nothing inserted, the caller's transaction goes
on), or a final status with the value intact (or FAILED with the reason).
Never unfinished, and the worker serves the next one.

A moderate number of examples by default; more with
``KEYJOBS_HYPOTHESIS_EXAMPLES=1000``. Results and messages reach the task
pickled (base64), since no argument may carry what the task must return.
"""

import base64
import contextlib
import os
import pickle
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection, transaction
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from keyjobs import ArgumentError, Mode, Status, task
from keyjobs.models import Invocation
from keyjobs.values import MAX_DEPTH, MAX_TEXT
from keyjobs.worker import Worker

EXAMPLES = int(os.environ.get("KEYJOBS_HYPOTHESIS_EXAMPLES", 100))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- the tasks ---------------------------------------------------------------------------------


@task(running_concurrency=Mode.KEYS, key_arguments=("key",))
def keyed_echo(key: Any, value: Any) -> Any:
    return value


@task
def give(pickled: str) -> Any:
    """Return the value pickled in ``pickled``: one no argument could carry."""
    return pickle.loads(base64.b64decode(pickled))


@task
def fail_with(pickled: str) -> None:
    raise ValueError(pickle.loads(base64.b64decode(pickled)))


def pickled(value: Any) -> str:
    return base64.b64encode(pickle.dumps(value)).decode()


# -- the values --------------------------------------------------------------------------------

#: Every code point, surrogates and NUL included; the troublemakers also on their own, so that they come often.
characters = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=())
texts = st.one_of(st.text(characters, max_size=20), st.sampled_from(["a\x00b", "\x00", "\ud800", "\udfff x",
                                                                     "\ud83d\ude00", "😀", "\u2028", "é"]))
integers = st.one_of(st.integers(), st.integers(-(2**70), 2**70),
                     st.builds(lambda digits, sign: sign * 10**digits, st.integers(10, 6000), st.sampled_from([1, -1])))
floats = st.floats(allow_nan=True, allow_infinity=True)
atoms = st.one_of(st.none(), st.booleans(), integers, floats, texts)


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


plain = st.recursive(
    atoms,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(texts, children, max_size=4),
        st.dictionaries(st.one_of(st.integers(-3, 3), st.none(), st.booleans()), children, min_size=1, max_size=2),
    ),
    max_leaves=12,
)
#: Mostly plain data; now and then nesting about as deep as allowed, or a type JSON does not have.
values = st.one_of(plain, plain, plain, st.one_of(st.integers(MAX_DEPTH - 2, MAX_DEPTH + 2).map(nested),
                                                  st.frozensets(st.integers())))


# -- reading back ------------------------------------------------------------------------------


def same(stored: Any, given: Any) -> bool:
    """Return whether ``stored`` is ``given`` as JSON gives it back (tuples are lists)."""
    if isinstance(given, float) and type(stored) is int and connection.vendor == "postgresql":
        # jsonb keeps numbers as decimals and writes 1e+23 back as 100000000000000000000000.
        return float(stored) == given
    if type(given) is bool or type(stored) is bool:
        return type(given) is type(stored) and given == stored
    if isinstance(given, (list, tuple)):
        return isinstance(stored, list) and len(stored) == len(given) and all(map(same, stored, given))
    if isinstance(given, dict):
        return (isinstance(stored, dict) and stored.keys() == given.keys()
                and all(same(stored[key], value) for key, value in given.items()))
    return type(stored) is type(given) and stored == given


def final(invocation: Invocation) -> Invocation:
    invocation.wait(timeout=60)
    invocation.refresh_from_db()
    return invocation


@contextlib.contextmanager
def serving_worker() -> Iterator[Worker]:
    """Run a real worker (two runner threads) on the test database while the block runs; check it kept serving."""
    worker = Worker(threads=2, poll_interval=0.05)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        yield worker
        after = keyed_echo.delay("after", "the worker still serves")
        assert final(after).status == Status.SUCCESS
        assert all(status in (Status.SUCCESS, Status.FAILED) for status in Invocation.objects.values_list("status",
                                                                                                           flat=True))
    finally:
        worker.stop()
        thread.join(60)
    assert not thread.is_alive()
    assert not getattr(worker, "stop_reason", ""), worker.stop_reason


# -- the properties ----------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_an_argument_or_key_is_refused_at_delay_or_comes_back_intact():
    with serving_worker():

        @SETTINGS
        @given(value=values)
        def check(value: Any) -> None:
            before = Invocation.objects.count()
            with transaction.atomic():
                try:
                    invocation = keyed_echo.delay(value, value)  # the value as the key and as an argument
                except ArgumentError as exc:
                    assert str(exc).startswith("tests.test_bad_data.keyed_echo.delay(): ")
                    event(f"refused: {str(exc).split(' ', 3)[3][:30]}")
                    refused = True
                else:
                    refused = False
                assert Invocation.objects.count() == before + (not refused)  # the transaction goes on
            if refused:
                return
            invocation = final(invocation)
            event("stored")
            assert invocation.status == Status.SUCCESS, invocation.error
            # Read as a user reads them: a value past the inline size is stored out of line (its row holds None).
            assert same(invocation.call_arguments()[0][1], value) and same(invocation.stored_result(), value)

        check()


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_a_result_ends_intact_or_failed_with_the_reason():
    with serving_worker():

        @SETTINGS
        @given(value=values)
        def check(value: Any) -> None:
            invocation = final(give.delay(pickled(value)))
            event(invocation.status)
            if invocation.status == Status.SUCCESS:
                assert same(invocation.stored_result(), value)  # out of line past the inline size
            else:
                assert invocation.status == Status.FAILED
                assert invocation.error_type == "keyjobs.exceptions.ResultNotStorable", invocation.error
                assert invocation.error.startswith("tests.test_bad_data.give: result ")
                assert "return value" in invocation.error

        check()


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_an_exception_message_is_recorded_storable():
    with serving_worker():

        @SETTINGS
        @given(message=st.one_of(texts, st.builds(lambda piece, times: (piece or "x") * times, texts,
                                                  st.sampled_from([1, 2, 8000]))))
        def check(message: str) -> None:
            invocation = final(fail_with.delay(pickled(message)))
            assert (invocation.status, invocation.error_type) == (Status.FAILED, "builtins.ValueError")
            marked = message.replace("\x00", "\\x00")
            marked = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in marked)
            if len(f"ValueError: {marked}") <= MAX_TEXT:
                assert invocation.error == f"ValueError: {marked}"
            else:
                assert len(invocation.error) == MAX_TEXT and "characters cut by keyjobs" in invocation.error
                assert invocation.error.startswith(f"ValueError: {marked[:1000]}")
                assert invocation.error.endswith(marked[-1000:])

        check()
