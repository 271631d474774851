"""keyjobs.values: what can be stored, and error text made storable."""

import pytest
from django.test import override_settings

from keyjobs.exceptions import ArgumentError, ResultNotStorable
from keyjobs.values import MAX_DEPTH, MAX_INT_DIGITS, check_arguments, check_result, storable_text


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
