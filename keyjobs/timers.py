"""When a schedule ticks: a cron expression in the site's time zone, or a fixed interval.

Cron is parsed and evaluated by cronsim, and read out in words by
cron-descriptor; nothing here parses cron by hand. Cron ticks are computed in
``settings.TIME_ZONE`` (Django's default time zone) and stored in UTC, so
that they follow the local clock across daylight saving changes as Debian's
cron does (cronsim's rules): a tick that falls in the hour skipped in spring
runs at the first minute after the jump; in the hour repeated in autumn, an
expression with a fixed hour (``30 2 * * *``) ticks once, and one that runs
every hour or more often (``*/30 * * * *``) ticks in both passes, as the
real time goes on. An interval is real elapsed time and ignores the local
clock.
"""

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cron_descriptor import get_description
from cronsim import CronSim, CronSimError
from django.utils import timezone

#: The shortest interval a schedule may declare.
MIN_INTERVAL = timedelta(seconds=1)


class TimerError(ValueError):
    """A cron expression or an interval that cannot make a schedule; the message says why."""


@dataclass(frozen=True)
class Timer:
    """A schedule's rule: exactly one of ``cron`` (five fields) and ``interval``."""

    cron: str = ""
    interval: timedelta | None = None

    def __post_init__(self) -> None:
        if bool(self.cron) == (self.interval is not None):
            raise TimerError("a schedule is a cron expression or an interval, exactly one of them")
        if self.interval is not None and self.interval <= timedelta(0):
            raise TimerError(f"the interval {self.interval} must be positive")
        if self.cron:
            check_cron(self.cron)

    @classmethod
    def of(cls, schedule: Any, *, min_interval: timedelta = MIN_INTERVAL) -> "Timer":
        """Return the timer of a declaration's ``schedule=``: a cron string or a ``timedelta``; TimerError if neither."""
        if isinstance(schedule, str):
            return cls(cron=schedule.strip())
        if isinstance(schedule, timedelta):
            if schedule < min_interval:
                raise TimerError(f"the interval {schedule} is shorter than {min_interval}")
            return cls(interval=schedule)
        raise TimerError(f"{schedule!r} is neither a cron string nor a timedelta")

    def next_after(self, moment: datetime, *, anchor: datetime | None = None) -> datetime:
        """Return the first tick strictly after ``moment`` (an interval counts from ``anchor``, a past tick)."""
        if self.interval is not None:
            if anchor is None or anchor > moment:
                return moment + self.interval
            return anchor + self.interval * ((moment - anchor) // self.interval + 1)
        local = timezone.localtime(moment, timezone.get_default_timezone())
        return _aware_utc(next(CronSim(self.cron, local)))

    def last_at_or_before(self, moment: datetime, *, since: datetime) -> datetime:
        """Return the latest tick at or before ``moment``, given that ``since`` (at or before it) is a tick."""
        if self.interval is not None:
            return since + self.interval * ((moment - since) // self.interval)
        local = timezone.localtime(moment + timedelta(microseconds=1), timezone.get_default_timezone())
        latest = _aware_utc(next(CronSim(self.cron, local, reverse=True)))
        return max(latest, since)

    def describe(self) -> str:
        """Return the rule in words: ``Every 15 minutes``, ``every 30 seconds``."""
        if self.interval is not None:
            return f"Every {describe_interval(self.interval)}"
        return describe_cron(self.cron)


def check_cron(expression: str) -> None:
    """Raise TimerError, saying why, if cronsim cannot evaluate ``expression``."""
    if len(expression.split()) != 5:
        raise TimerError(f"cron {expression!r} must have five fields (minute hour day month weekday), "
                         f"not {len(expression.split())}")
    try:
        CronSim(expression, timezone.now())
    except CronSimError as exc:
        raise TimerError(f"cron {expression!r} is not valid: {exc}") from None


def describe_cron(expression: str) -> str:
    try:
        return str(get_description(expression))
    except Exception:  # cron-descriptor's errors are its own; the expression was already checked by cronsim
        return expression


def describe_interval(interval: timedelta) -> str:
    seconds = interval.total_seconds()
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''}" if count != 1 else unit
    return f"{seconds:g} seconds" if seconds != 1 else "second"


def _aware_utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)
