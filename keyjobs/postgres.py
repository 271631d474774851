"""PostgreSQL-only code: LISTEN/NOTIFY. Imported only through ``keyjobs.wakeups``."""

import logging
import threading
from collections.abc import Callable

import psycopg
from django.db import connections

logger = logging.getLogger("keyjobs.worker")


def notify(using: str, channel: str, payload: str) -> None:
    """Queue a notification; PostgreSQL delivers it when the transaction commits."""
    with connections[using].cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, %s)", [channel, payload])


class Listener(threading.Thread):
    """Listen on a separate autocommit connection and call back on each notification.

    If the connection drops, reconnect with a growing pause; polling covers the gap.
    """

    def __init__(self, using: str, channel: str, on_wake: Callable[[str], None], stop: threading.Event) -> None:
        super().__init__(name="keyjobs-listener", daemon=True)
        self.using = using
        self.channel = channel
        self.on_wake = on_wake
        self.stop = stop
        self.listening = threading.Event()

    def run(self) -> None:
        pause = 0.1
        while not self.stop.is_set():
            try:
                self._listen()
                pause = 0.1
            except psycopg.Error as exc:
                self.listening.clear()
                logger.warning("keyjobs: lost the LISTEN connection (%s); retrying in %.1fs", exc, pause)
                self.stop.wait(pause)
                pause = min(pause * 2, 5.0)

    def _listen(self) -> None:
        params = connections[self.using].get_connection_params()
        with psycopg.connect(**params, autocommit=True) as connection:
            connection.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(self.channel)))
            self.listening.set()
            while not self.stop.is_set():
                for notification in connection.notifies(timeout=0.5):
                    self.on_wake(notification.payload)
