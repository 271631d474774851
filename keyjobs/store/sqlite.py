"""SQLite's store: the portable one, through a cursor that converts a statement's placeholders once.

Django's SQLite cursor rewrites every statement's ``%s`` placeholders to
``?`` with a regular expression on each run, a cost that grows with the
statement's text. The store runs the same few statements for every
invocation, so their conversions are kept, per statement text. Everything
else is the portable store's: Django's cursor wrapper is kept, with its
execute wrappers and its query log.
"""

from typing import Any

from django.db.backends.sqlite3.base import SQLiteCursorWrapper

from .portable import Store

#: Statement texts whose conversion is kept at most; past it, they are forgotten all at once.
CONVERSIONS_KEPT = 1000
_converted: dict[str, str] = {}


class ConvertingOnceCursor(SQLiteCursorWrapper):
    """Django's SQLite cursor, which looks up a statement's conversion before it makes it."""

    def convert_query(self, query: str, *, param_names: list[str] | None = None) -> str:
        if param_names is not None:
            return super().convert_query(query, param_names=param_names)
        converted = _converted.get(query)
        if converted is None:
            if len(_converted) >= CONVERSIONS_KEPT:
                _converted.clear()
            converted = _converted[query] = super().convert_query(query)
        return converted


class SQLiteStore(Store):
    def cursor(self) -> Any:
        """Return Django's cursor wrapper around a ``ConvertingOnceCursor`` (as ``connection.cursor()`` would wrap
        its own: the execute wrappers, the thread check and the query log stay)."""
        connection = self.connection
        connection.ensure_connection()
        connection.validate_thread_sharing()
        with connection.wrap_database_errors:
            cursor = connection.connection.cursor(factory=ConvertingOnceCursor)
        if connection.queries_logged:
            return connection.make_debug_cursor(cursor)
        return connection.make_cursor(cursor)
