"""Telling idle runners that work may be waiting.

Wake-ups are hints, never the source of truth: a runner that misses one still
finds the work on its next poll. PostgreSQL delivers them with LISTEN/NOTIFY
(``keyjobs.postgres``); other databases have none, and runners poll at a
shorter interval instead. Portable code reaches PostgreSQL only through this
module.
"""

import threading
from collections.abc import Callable, Sequence
from typing import Any

from django.db import connections

from .conf import conf

#: The LISTEN/NOTIFY channel; the payload is the queue name.
CHANNEL = "keyjobs"


def supports_notify(using: str) -> bool:
    """Return whether the database can wake runners itself."""
    return connections[using].vendor == "postgresql"


def notify(using: str, queue: str) -> None:
    """Wake runners of ``queue`` once the current transaction commits (PostgreSQL only; else nothing)."""
    if supports_notify(using):
        from .postgres import notify as pg_notify

        pg_notify(using, CHANNEL, queue)


def insert_and_notify(
    using: str, model: Any, fields: Sequence[Any], rows: Sequence[Sequence[Any]], returning: Sequence[Any], queue: str
) -> list[tuple[Any, ...]]:
    """Insert rows of ``model`` and wake runners of ``queue`` on commit, in one statement; return ``returning``.

    PostgreSQL only: callers check supports_notify() first, and insert by themselves elsewhere.
    """
    from .postgres import insert_and_notify as pg_insert_and_notify

    return pg_insert_and_notify(using, model, fields, rows, returning, CHANNEL, queue)


def poll_interval(using: str) -> float:
    """Return how long an idle runner waits between two looks for work."""
    configured = conf.POLL_INTERVAL
    if configured is not None:
        return configured
    return 1.0 if supports_notify(using) else 0.05


def start_listener(using: str, on_wake: Callable[[str], None], stop: threading.Event) -> threading.Thread | None:
    """Call ``on_wake(queue)`` for every wake-up until ``stop`` is set; None when the database has none."""
    if not supports_notify(using):
        return None
    from .postgres import Listener

    listener = Listener(using, CHANNEL, on_wake, stop)
    listener.start()
    return listener
