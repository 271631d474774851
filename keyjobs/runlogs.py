"""Run logs: the records a task logs through ``logging`` while it runs, kept with its invocation.

``RunLogHandler`` sits on the root logger (``apps.ready()`` adds it) and keeps a record only while a runner
runs an invocation in that thread or coroutine (``current.this_run()``): it formats the record and holds it
in memory for the run, up to ``KEYJOBS_RUN_LOG_LIMIT`` records of at most ``MESSAGE_LIMIT`` characters
each. The records are written in one statement once the outcome is recorded (``signals.invocation_finished``),
after and apart from the outcome's own transaction: a run that logs nothing writes nothing, and recording an
outcome takes no more statements than before.

Stored logs can hold secrets: the pages show them only to those who may view invocations, and
``KEYJOBS_RUN_LOG_REDACT`` names a function ``(record, message) -> str | None`` that sees each record
before it is kept, and returns the message to keep (None drops the record).
"""

import logging
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from django.utils.module_loading import import_string

from .conf import conf
from .current import this_run
from .models import RunLog

logger = logging.getLogger(__name__)

#: The most characters of a message kept.
MESSAGE_LIMIT = 4000
#: The most runs whose records are held at once: a run whose outcome was discarded (taken from its runner) is
#: never written, and is forgotten, oldest first, past this.
RUNS_HELD = 1000
_FORMATTER = logging.Formatter()


@dataclass
class Kept:
    """What one run has logged so far."""

    records: list[tuple[datetime, int, str, str]] = field(default_factory=list)
    #: Records past the limit, counted but not kept.
    dropped: int = 0


class RunLogHandler(logging.Handler):
    """Keep the records logged inside a run, by invocation, until its outcome is recorded (then ``flush_run``)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self._runs: dict[int, Kept] = {}
        self._lock_runs = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        run = this_run()
        limit = conf.RUN_LOG_LIMIT
        if (run is None or limit <= 0 or record.name.startswith("keyjobs.")
                or record.levelno < conf.RUN_LOG_LEVEL):
            return  # outside a run, none kept, or keyjobs' own records (what the engine did, not the task)
        with self._lock_runs:
            found = self._runs.get(run.invocation.pk)
            if found is not None and len(found.records) >= limit:
                found.dropped += 1  # counted, and neither formatted nor redacted: it is not kept
                return
        try:
            message = record.getMessage()
            if record.exc_info:
                message = f"{message}\n{_FORMATTER.formatException(record.exc_info)}"
            redact = conf.RUN_LOG_REDACT
            if redact:
                kept = import_string(redact)(record, message)
                if kept is None:
                    return
                message = str(kept)
        except Exception:
            self.handleError(record)
            return
        with self._lock_runs:
            found = self._runs.get(run.invocation.pk)
            if found is None:
                while len(self._runs) >= RUNS_HELD:
                    del self._runs[next(iter(self._runs))]
                found = self._runs[run.invocation.pk] = Kept()
            if len(found.records) >= limit:
                found.dropped += 1
                return
            found.records.append((datetime.fromtimestamp(record.created, UTC), record.levelno, record.name[:200],
                                  message[:MESSAGE_LIMIT]))

    def take(self, pk: int) -> Kept | None:
        """Return and forget what invocation ``pk``'s run logged."""
        with self._lock_runs:
            return self._runs.pop(pk, None)


#: The one handler keyjobs adds to the root logger.
handler = RunLogHandler()


def install() -> None:
    """Add the handler to the root logger, once (``apps.ready()``)."""
    root = logging.getLogger()
    if handler not in root.handlers:
        root.addHandler(handler)


def flush_run(sender: Any, invocation: Any, status: str, **kwargs: Any) -> None:
    """Write what the run of ``invocation`` logged, in one statement (``signals.invocation_finished``)."""
    kept = handler.take(invocation.pk)
    if kept is None:
        return
    rows = [RunLog(invocation_id=invocation.pk, at=at, level=level, logger=name, message=message)
            for at, level, name, message in kept.records]
    if kept.dropped:
        rows.append(RunLog(invocation_id=invocation.pk, at=rows[-1].at if rows else datetime.now(UTC),
                           level=logging.WARNING, logger=__name__,
                           message=f"{kept.dropped} more record(s) not kept: a run keeps {conf.RUN_LOG_LIMIT} "
                                   "(KEYJOBS_RUN_LOG_LIMIT)"))
    try:
        RunLog.objects.using(invocation._state.db or conf.DATABASE).bulk_create(rows)
    except Exception:
        # The outcome is recorded already; its logs are not worth failing the runner thread for.
        logger.exception("could not store the %d log record(s) of invocation #%s", len(rows), invocation.pk,
                         extra={"invocation_id": invocation.pk})
