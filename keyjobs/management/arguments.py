"""Argument types for keyjobs' commands: bad input is refused in one line, while the options are parsed."""

import argparse


def positive_int(text: str) -> int:
    """Parse a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def queue_list(text: str) -> list[str]:
    """Parse comma-separated queue names."""
    queues = [queue.strip() for queue in text.split(",")]
    if not all(queues):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty queue name; write a,b,c")
    return queues
