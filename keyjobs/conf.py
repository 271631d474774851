"""keyjobs' settings, read lazily so that override_settings works in tests.

Every setting is optional; the defaults suit a laptop on SQLite.
"""

from datetime import timedelta
from typing import Any

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

        The hard limit: past it, ``delay()`` raises ``ArgumentError`` and a
        result ends its invocation FAILED. A worker holds the whole value in
        memory while it runs the task. Default 50 MB.
        """
        return getattr(settings, "KEYJOBS_MAX_VALUE_BYTES", 50_000_000)

    @property
    def INLINE_VALUE_BYTES(self) -> int:
        """The most bytes of JSON kept in an invocation's row (``KEYJOBS_INLINE_VALUE_BYTES``, default 8,192).

        Arguments that take more together, largest first, and a larger
        result are stored once in a table of their own (``keyjobs.values``),
        out of the queue's way: claims, wake-ups and the monitor's lists read
        the rows, and a value shared by many calls is stored once. The key
        arguments always stay in the row, so they may take at most this much
        together.
        """
        return getattr(settings, "KEYJOBS_INLINE_VALUE_BYTES", 8192)

    @property
    def WORKFLOW_MAX_STEPS(self) -> int:
        """The most steps one workflow may record (``KEYJOBS_WORKFLOW_MAX_STEPS``); default 1,000.

        A workflow past it fails with ``WorkflowLimitExceeded``: a loop of
        steps without end belongs in a new workflow (or a schedule).
        """
        return getattr(settings, "KEYJOBS_WORKFLOW_MAX_STEPS", 1000)

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

    @property
    def TASK_OPTIONS(self) -> Any:
        """Options of declared tasks that the deployment changes, by task name (``KEYJOBS_TASK_OPTIONS``).

        ``{"billing.tasks.sync_account": {"running_limit": 5, "rate_limit": "10/s"}}``:
        each task runs as if ``@task`` had been given these options too,
        validated as ``@task`` validates them (the checks ``keyjobs.E005`` to
        ``E008`` refuse what cannot apply). Which options may be changed, and
        why the others may not: ``keyjobs.options.OPTIONS``.
        """
        return getattr(settings, "KEYJOBS_TASK_OPTIONS", {})

    @property
    def METRICS_TOKEN(self) -> str:
        """The bearer token that opens the metrics endpoint to a scraper (``KEYJOBS_METRICS_TOKEN``).

        Empty (the default): only staff sessions may read it.
        """
        return getattr(settings, "KEYJOBS_METRICS_TOKEN", "")

    @property
    def ROLLUP_KEEP(self) -> timedelta:
        """How long the rollup's minutes per task are kept (``KEYJOBS_ROLLUP_KEEP``, a ``timedelta``; default 8 days,
        past the Tasks page's longest window): older ones are deleted by a runner's duty and by ``prunejobs``."""
        return getattr(settings, "KEYJOBS_ROLLUP_KEEP", timedelta(days=8))

    @property
    def KEY_ROLLUP_KEEP(self) -> timedelta:
        """How long the rollup's minutes per key are kept (``KEYJOBS_KEY_ROLLUP_KEEP``, a ``timedelta``; default 1
        day, past the Keys page's longest window): a row per key and minute is the rollup's bulk."""
        return getattr(settings, "KEYJOBS_KEY_ROLLUP_KEEP", timedelta(days=1))

    @property
    def RUN_LOG_LIMIT(self) -> int:
        """The most records a run keeps of what it logged (``KEYJOBS_RUN_LOG_LIMIT``, default 200); 0 keeps none."""
        return getattr(settings, "KEYJOBS_RUN_LOG_LIMIT", 200)

    @property
    def RUN_LOG_LEVEL(self) -> int:
        """The least level of a record a run keeps (``KEYJOBS_RUN_LOG_LEVEL``, default ``logging.INFO``)."""
        return getattr(settings, "KEYJOBS_RUN_LOG_LEVEL", 20)

    @property
    def RUN_LOG_REDACT(self) -> str:
        """A dotted path to ``redact(record, message) -> str | None``, called on each record a run would keep.

        It returns the message to store, or None to keep nothing of the record (``KEYJOBS_RUN_LOG_REDACT``).
        """
        return getattr(settings, "KEYJOBS_RUN_LOG_REDACT", "")


conf = Settings()
