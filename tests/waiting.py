"""Waiting for something another thread or process does, with a deadline that names what did not happen."""

import time
from collections.abc import Callable


def wait_for(condition: Callable[[], bool], *, timeout: float = 10.0, what: str = "the condition",
             interval: float = 0.05) -> None:
    """Return once ``condition()`` holds; fail the test if it still does not after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:g}s waiting for {what}"
        time.sleep(interval)
