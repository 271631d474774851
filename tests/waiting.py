"""Waiting for something another thread or process does, with a deadline that names what did not happen; a real
runner in a thread, for the work to be done."""

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from django.db import connection

if TYPE_CHECKING:
    from keyjobs.worker import Worker


def wait_for(condition: Callable[[], bool], *, timeout: float = 10.0, what: str = "the condition",
             interval: float = 0.05) -> None:
    """Return once ``condition()`` holds; fail the test if it still does not after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:g}s waiting for {what}"
        time.sleep(interval)


def at_once(call: Callable[[], None], threads: int) -> list[BaseException]:
    """Run ``call`` on ``threads`` threads released together; return what they raised once all have ended.

    Each thread closes its own database connection when it ends.
    """
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            start.wait()
            call()
        except BaseException as exc:  # pragma: no cover - returned to the test
            errors.append(exc)
        finally:
            connection.close()

    running = [threading.Thread(target=run) for _ in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join()
    return errors


@contextmanager
def thread_worker(threads: int = 2, poll_interval: float = 0.02, **options: Any) -> Iterator["Worker"]:
    """A real runner in a thread of this process while the block runs; stopped at its end, its thread ended."""
    from keyjobs.worker import Worker

    running = Worker(threads=threads, poll_interval=poll_interval, **options)
    thread = threading.Thread(target=running.run)
    thread.start()
    try:
        yield running
    finally:
        running.stop()
        thread.join(30)
        assert not thread.is_alive(), "the runner's thread did not end within 30 s of its stop"
