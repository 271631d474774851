"""Argument types for keyjobs' commands: bad input is refused in one line, while the options are parsed."""

import argparse
import re
from datetime import timedelta

from django.utils.dateparse import parse_duration

#: The short form: a whole number and one unit, as in 30d, 12h, 45m or 90s.
SHORT_DURATION = re.compile(r"(?P<number>\d+)(?P<unit>[dhms])")
UNITS = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}


def _at_least(text: str, least: int, says: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be {says}, not {value}")
    return value


def positive_int(text: str) -> int:
    """Parse a whole number of at least 1."""
    return _at_least(text, 1, "at least 1")


def whole_number(text: str) -> int:
    """Parse a whole number of 0 or more."""
    return _at_least(text, 0, "0 or more")


def duration(text: str) -> timedelta:
    """Parse a duration of zero or more: 30d, 12h, 45m, 90s, or what Django's parse_duration reads (1:30:00, P1DT2H)."""
    short = SHORT_DURATION.fullmatch(text.strip())
    if short:
        return timedelta(**{UNITS[short["unit"]]: int(short["number"])})
    value = parse_duration(text.strip())
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30d, 12h, 45m, 90s, 1:30:00 or P1DT2H")
    if value < timedelta(0):
        raise argparse.ArgumentTypeError(f"must not be negative, not {text!r}")
    return value


def queue_list(text: str) -> list[str]:
    """Parse comma-separated queue names."""
    queues = [queue.strip() for queue in text.split(",")]
    if not all(queues):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty queue name; write a,b,c")
    return queues
