"""What a retry can fix: database errors, classified once for every path that writes.

A transient error is one the same step may get past if tried again: the
connection was lost, the server is shutting down, restarting or refusing
connections, or the transaction lost a race (a serialization failure, a
deadlock, a lock timeout; SQLite's "database is locked"). Anything else the
database refuses (data it cannot store, a broken constraint, a missing
column) fails the same way every time: retrying it would only wedge the
thread that tries.

Portable: psycopg is never imported; its errors are read through the
``sqlstate`` they carry, sqlite3's through ``sqlite_errorname``.
"""

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from django.db import connections

from .exceptions import dotted_path
from .values import storable_text

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The first and the longest pause between two tries of a step that ``retrying`` retries.
FIRST_PAUSE, LONGEST_PAUSE = 0.1, 5.0

#: SQLSTATEs a retry can get past (besides class 08, connection exceptions).
TRANSIENT_SQLSTATES = frozenset({
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
    "55P03",  # lock_not_available (lock_timeout)
    "57P01",  # admin_shutdown: the server is stopping or restarting
    "57P02",  # crash_shutdown
    "57P03",  # cannot_connect_now: the server is starting
    "53300",  # too_many_connections: refused for now
})

#: Why PostgreSQL refused a value, by SQLSTATE, in words a person understands.
_REASONS = {
    "22P05": "contains a NUL character, which PostgreSQL cannot store in JSON",
    "22021": "contains a character PostgreSQL cannot store in the database's encoding",
    "22001": "is too long for its column",
    "22003": "holds a number out of the range the database can store",
}


def sqlstate(exc: BaseException) -> str | None:
    """Return the SQLSTATE of a database error (PostgreSQL's), or None."""
    for error in (exc, exc.__cause__):
        state = getattr(error, "sqlstate", None)
        if state:
            return str(state)
    return None


def is_transient(exc: BaseException) -> bool:
    """Return whether the step that raised ``exc`` may succeed if tried again (after reconnecting).

    Takes Django's wrapped errors and the drivers' own alike.
    """
    state = sqlstate(exc)
    if state is not None:
        return state.startswith("08") or state in TRANSIENT_SQLSTATES
    for error in (exc, exc.__cause__):
        sqlite_error = getattr(error, "sqlite_errorname", None)
        if sqlite_error is not None:
            return str(sqlite_error).startswith(("SQLITE_BUSY", "SQLITE_LOCKED"))
    # Without a SQLSTATE, a driver's OperationalError or InterfaceError (PEP 249's names) never
    # reached the server's checks: the connection failed, or was closed under it.
    return any(kind.__name__ in ("OperationalError", "InterfaceError") for kind in type(exc).__mro__)


def retrying(
    what: str,
    step: Callable[[], T],
    *,
    using: str,
    keep_trying: Callable[[], bool] = lambda: True,
    patience: float | None = None,
    retry_for: Callable[[BaseException], bool] = is_transient,
    wait: Callable[[float], object] = time.sleep,
) -> T | None:
    """Run the database step ``step`` until it succeeds; return what it returns, or None once it gives up.

    The one retry loop of keyjobs. Only what ``retry_for`` accepts is retried
    (by default what a retry can fix, ``is_transient``): anything else is
    raised at once, for the caller to record. Between two tries the
    connection of ``using`` is closed (the next try opens a fresh one) and the
    pause grows from ``FIRST_PAUSE`` to ``LONGEST_PAUSE``, slept through
    ``wait`` (an ``Event.wait`` makes it end early at a stop). It gives up,
    with a log line, once ``keep_trying()`` says stop (the runner was declared
    lost, or is stopping) or once ``patience`` seconds have passed since the
    first failure (None: no limit), so every caller says how long it waits
    while the database is away.
    """
    pause, began = FIRST_PAUSE, time.monotonic()
    while True:
        try:
            return step()
        except Exception as exc:
            if not retry_for(exc):
                raise
            connections[using].close()
            waited = time.monotonic() - began
            if not keep_trying() or (patience is not None and waited + pause > patience):
                logger.error("gave up trying to %s after %.1fs: %s", what, waited, exc)
                return None
            if is_transient(exc):
                logger.warning("could not %s (%s); retrying in %.1fs", what, exc, pause)
            else:
                logger.error("could not %s; retrying in %.1fs", what, pause, exc_info=exc)
            wait(pause)
            pause = min(pause * 2, LONGEST_PAUSE)


def reason(exc: BaseException, *, what: str = "the outcome") -> str:
    """Return why the database refused to store ``what``, for a person to read (made storable)."""
    state = sqlstate(exc)
    message = _message(exc)
    if state in _REASONS:
        explained = f"{what} {_REASONS[state]}"
    elif "NUL" in message or "\\u0000" in message:
        explained = f"{what} contains a NUL character, which PostgreSQL cannot store"
    elif "surrogate" in message:
        explained = f"{what} contains a surrogate code point, which is not a character and cannot be stored as UTF-8"
    elif isinstance(exc, RecursionError):
        explained = f"{what} nests too deep to be written as JSON"
    elif "integer string conversion" in message:
        explained = f"{what} contains an integer too long to be written as JSON"
    else:
        explained = f"the database refused to store {what}"
    return storable_text(f"{explained} ({dotted_path(type(exc))}: {message})", limit=4000)


def _message(exc: BaseException) -> str:
    try:
        return str(exc).strip()
    except Exception:  # an exception whose __str__ fails still has a class
        return "(its message could not be read)"
