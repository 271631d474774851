"""What the accounts page shows: each account's recent calls, as the database and the provider tell them.

Two witnesses, as in the demo's summaries: the invocations of the demo's
tasks for the account (status, when each ran, how many requests merged into
it) and the provider's counters (calls, collisions).
"""

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from django.conf import settings
from django.db.models import Count
from django.urls import reverse

from demo_project.scenarios import DemoError, ProviderClient
from keyjobs import Status
from keyjobs.models import Event, Invocation
from keyjobs.status import OWNED, WAITING

from .actions import STAMPS
from .models import Account

#: Invocations shown per account, the most recent.
RECENT = 16


def phase(status: str) -> str:
    """Return the phase the page groups ``status`` under: waiting, running, done, failed or dropped."""
    if status in WAITING:
        return "waiting"
    if status in OWNED:
        return "running"
    return {Status.SUCCESS: "done", Status.CONCURRENCY_CONTROLLED_FINAL: "dropped"}.get(status, "failed")


def seconds_between(origin: datetime | None, moment: datetime | None) -> float | None:
    return None if origin is None or moment is None else (moment - origin).total_seconds()


def epoch_ms(moment: datetime | None) -> int | None:
    return None if moment is None else round(moment.timestamp() * 1000)


@dataclass(frozen=True)
class Call:
    """One invocation of a demo task for the account."""

    invocation: Invocation
    #: Requests merged into it by registration concurrency (its REUSED events).
    merged: int
    #: Seconds from the first start in the row to this call's start and end, for the eye.
    since: float | None = None
    until: float | None = None

    @property
    def op(self) -> str:
        return str(self.invocation.kwargs.get("op", "refresh"))

    @property
    def task(self) -> str:
        return self.invocation.task_name.rpartition(".")[2]

    @property
    def phase(self) -> str:
        return phase(self.invocation.status)

    @property
    def started_ms(self) -> int | None:
        return epoch_ms(self.invocation.started_at)

    @property
    def finished_ms(self) -> int | None:
        return epoch_ms(self.invocation.finished_at)


@dataclass(frozen=True)
class Row:
    account: Account
    #: Oldest first, so that a serial key reads left to right.
    calls: list[Call]
    #: The provider's counts for the account since its last reset: calls, collisions, max_in_flight.
    provider: dict[str, int] | None
    #: (task, URL) of the monitor's key view of each keyed task seen among the calls.
    keys: list[tuple[str, str]] = field(default_factory=list)

    @property
    def phases(self) -> Counter[str]:
        return Counter(call.phase for call in self.calls)

    @property
    def merged(self) -> int:
        return sum(call.merged for call in self.calls)

    @property
    def busy(self) -> bool:
        return any(call.phase in ("waiting", "running") for call in self.calls)


@dataclass(frozen=True)
class Activity:
    rows: list[Row]
    provider_url: str
    #: The provider's stats, or None if it could not be reached.
    provider: dict[str, Any] | None

    @property
    def busy(self) -> bool:
        return any(row.busy for row in self.rows) or bool(self.provider and self.provider["in_flight"])


def recent_calls(account: Account) -> list[Invocation]:
    """Return the latest invocations of the demo's tasks for ``account``, oldest first."""
    latest = Invocation.objects.filter(task_name__in=STAMPS, kwargs__account_id=account.name).order_by("-pk")
    return list(reversed(latest[:RECENT]))


def key_url(invocation: Invocation) -> str:
    """Return the URL of the monitor's key view of ``invocation``'s task and running key."""
    query = urlencode({"task": invocation.task_name, "key": invocation.running_key})
    return f"{reverse('admin:keyjobs_invocation_key')}?{query}"


def provider_stats() -> dict[str, Any] | None:
    """Return the provider's counters, or None if it does not answer."""
    with ProviderClient(settings.PROVIDER_URL) as provider:
        try:
            return provider.stats()
        except DemoError:
            return None


def activity(accounts: list[Account]) -> Activity:
    """Return what the page shows of ``accounts``."""
    invocations = {account.pk: recent_calls(account) for account in accounts}
    ids = [invocation.pk for listed in invocations.values() for invocation in listed]
    merged = dict(
        Event.objects.filter(invocation__in=ids, kind=Event.Kind.REUSED)
        .values_list("invocation").annotate(count=Count("pk")).order_by()
    )
    stats = provider_stats()
    rows = []
    for account in accounts:
        listed = invocations[account.pk]
        origin = min((invocation.started_at for invocation in listed if invocation.started_at), default=None)
        calls = [
            Call(invocation, merged.get(invocation.pk, 0),
                 since=seconds_between(origin, invocation.started_at),
                 until=seconds_between(origin, invocation.finished_at))
            for invocation in listed
        ]
        keyed = {call.invocation.task_name: call.invocation for call in calls if call.invocation.running_key}
        rows.append(Row(
            account=account,
            calls=calls,
            provider=None if stats is None else stats["accounts"].get(account.name, {"calls": 0, "collisions": 0}),
            keys=[(name.rpartition(".")[2], key_url(invocation)) for name, invocation in sorted(keyed.items())],
        ))
    return Activity(rows=rows, provider_url=settings.PROVIDER_URL, provider=stats)
