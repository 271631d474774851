"""keyjobs' settings, read lazily so that override_settings works in tests.

Every setting is optional; the defaults suit a laptop on SQLite.
"""

from django.conf import settings


class Settings:
    @property
    def DATABASE(self) -> str:
        """The database alias that holds invocations (``KEYJOBS_DATABASE``)."""
        return getattr(settings, "KEYJOBS_DATABASE", "default")

    @property
    def LISTEN_DATABASE(self) -> str | None:
        """The database alias whose connection settings a runner LISTENs with (``KEYJOBS_LISTEN_DATABASE``).

        None: ``KEYJOBS_DATABASE``'s own. Behind a pooler in transaction mode
        (PgBouncer), which cannot keep a LISTEN, name an alias that reaches
        the same database directly: each runner process holds one connection
        of it.
        """
        return getattr(settings, "KEYJOBS_LISTEN_DATABASE", None)

    @property
    def DEFAULT_QUEUE(self) -> str:
        """The queue of a task that names none (``KEYJOBS_DEFAULT_QUEUE``)."""
        return getattr(settings, "KEYJOBS_DEFAULT_QUEUE", "default")

    @property
    def POLL_INTERVAL(self) -> float | None:
        """Seconds an idle runner waits before looking for work unprompted.

        ``KEYJOBS_POLL_INTERVAL``; None picks 1.0 on PostgreSQL, where
        LISTEN/NOTIFY wakes runners and polling is only the safety net, and
        0.05 elsewhere, where polling is how new work is found.
        """
        return getattr(settings, "KEYJOBS_POLL_INTERVAL", None)

    @property
    def HEARTBEAT_INTERVAL(self) -> float:
        """Seconds between two heartbeats of a runner (``KEYJOBS_HEARTBEAT_INTERVAL``)."""
        return getattr(settings, "KEYJOBS_HEARTBEAT_INTERVAL", 5.0)

    @property
    def LEASE(self) -> float:
        """Seconds without a heartbeat after which a runner counts as dead (``KEYJOBS_LEASE``).

        Its invocations are then recovered by the other runners. Default: six
        heartbeat intervals.
        """
        lease = getattr(settings, "KEYJOBS_LEASE", None)
        return lease if lease is not None else 6 * self.HEARTBEAT_INTERVAL

    @property
    def MAX_VALUE_BYTES(self) -> int:
        """The most bytes of JSON a call's arguments, or a result, may take (``KEYJOBS_MAX_VALUE_BYTES``).

        Every claim reads an invocation's arguments: large data belongs
        elsewhere (a file, a table), with its id as the argument. Default 1 MB.
        """
        return getattr(settings, "KEYJOBS_MAX_VALUE_BYTES", 1_000_000)

    @property
    def AUTODISCOVER(self) -> bool:
        """Import every installed app's ``tasks`` module at start-up (``KEYJOBS_AUTODISCOVER``)."""
        return getattr(settings, "KEYJOBS_AUTODISCOVER", True)

    @property
    def PREPARE_STATEMENTS(self) -> bool:
        """Prepare the worker's repeated statements on PostgreSQL (``KEYJOBS_PREPARE_STATEMENTS``).

        Turn it off behind a connection pooler that cannot keep prepared
        statements (PgBouncer before 1.21 in transaction mode).
        """
        return getattr(settings, "KEYJOBS_PREPARE_STATEMENTS", True)

    @property
    def SCHEDULE_GRACE(self) -> float:
        """Seconds after its time a schedule's tick still counts as on time (``KEYJOBS_SCHEDULE_GRACE``).

        A schedule that skips missed ticks (``catch_up`` off) skips a tick
        found later than this, as one missed while no runner ran. Default 60.
        """
        return getattr(settings, "KEYJOBS_SCHEDULE_GRACE", 60.0)


conf = Settings()
