import argparse
from datetime import timedelta

import pytest

from keyjobs.management.arguments import duration, positive_int, queue_list


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30d", timedelta(days=30)),
        ("12h", timedelta(hours=12)),
        ("45m", timedelta(minutes=45)),
        ("90s", timedelta(seconds=90)),
        ("0s", timedelta(0)),
        ("1:30:00", timedelta(hours=1, minutes=30)),
        ("3 days", timedelta(days=3)),
        ("P1DT2H", timedelta(days=1, hours=2)),
    ],
)
def test_duration_reads_the_short_form_and_djangos(text, expected):
    assert duration(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("week", "'week' is not a duration like 30d"),
        ("30x", "'30x' is not a duration like 30d"),
        ("-1 day", "must not be negative, not '-1 day'"),
        ("-P1D", "must not be negative, not '-P1D'"),
    ],
)
def test_duration_refuses_what_is_not_a_duration_of_zero_or_more(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        duration(text)


def test_positive_int_refuses_zero_and_negatives():
    assert positive_int("3") == 3
    for text in ("0", "-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be at least 1"):
            positive_int(text)


def test_queue_list_refuses_an_empty_name():
    assert queue_list("a, b") == ["a", "b"]
    with pytest.raises(argparse.ArgumentTypeError, match="empty queue name"):
        queue_list("a,,b")
