"""The store: the engine's database access, behind one interface, with PostgreSQL's version beside the portable one.

``store(using)`` is the one place that chooses: ``portable.Store`` (plain SQL
every database Django supports takes, through Django's cursor),
``sqlite.SQLiteStore`` (the same, converting each statement's placeholders
once) or ``postgres.PostgresStore`` (the same, plus whole steps in one
statement, LISTEN/NOTIFY and a one-statement insert). Code outside this package asks the
store what it can do (``store.steps``, ``store.notifies``) and never checks
the database's vendor. The store depends on the models and the lifecycle
only, never on the orchestration that calls it.
"""

from typing import Any

from django.db import connections
from django.db.models import QuerySet

from .interface import Claimed, KeyAhead, LockedRow, Recorded, Steps, WaitingRow, Woken
from .portable import Store
from .sqlite import SQLiteStore

__all__ = ["Claimed", "KeyAhead", "LockedRow", "Recorded", "Steps", "Store", "WaitingRow", "Woken", "raw_rows", "store"]


def store(using: str) -> Store:
    """Return the store of database ``using``, built on first use by this thread's connection."""
    connection = connections[using]
    built: Store | None = getattr(connection, "_keyjobs_store", None)
    if built is None:
        if connection.vendor == "postgresql":
            from .postgres import PostgresStore

            built = PostgresStore(connection)
        elif connection.vendor == "sqlite":
            built = SQLiteStore(connection)
        else:
            built = Store(connection)
        connection._keyjobs_store = built  # type: ignore[attr-defined]
    return built


def raw_rows(queryset: "QuerySet[Any]") -> list[tuple[Any, ...]]:
    """Return the rows of a ``values_list()`` queryset as the database driver hands them over.

    For the reads of tens of thousands of rows (the timeline's events, the rollup's history): Django's
    per-value converters cost more than the query there. The caller reads the moments as the driver gives them
    (text on SQLite, ``datetime`` on PostgreSQL).
    """
    sql, params = queryset.query.sql_with_params()
    with connections[queryset.db].cursor() as cursor:
        cursor.execute(sql, params)
        rows: list[tuple[Any, ...]] = cursor.fetchall()
    return rows
