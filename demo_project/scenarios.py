"""The demo's scenarios: the same calls to the provider under five concurrency settings.

A scenario resets the provider, enqueues its calls in one transaction, waits
until every invocation it enqueued is final, and sums up what happened from
two witnesses only: the provider's counters and call log, and the database.
Nothing in a summary is what the scenario expected to happen.

``Stack`` runs the provider and the workers as subprocesses, for
``manage.py demo``; ``manage.py enqueue`` runs the scenarios against a
provider and workers started by hand.
"""

import bisect
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

import django
import httpx
from django.db import transaction
from django.db.models import Max, Sum
from django.db.models.functions import Now

from keyjobs import Mode, Status, Task
from keyjobs.admission import Policy, Rate
from keyjobs.conf import conf
from keyjobs.models import Event, Invocation, Runner
from keyjobs.status import FINAL

from . import tasks

ROOT = Path(__file__).resolve().parent.parent

ACCOUNTS = ("acme", "globex", "initech")
OPS = ("fetch_profile", "list_invoices", "refresh_usage", "update_metadata")
#: D asks for a refresh of each account twice per op: 8 requests per account by default.
REFRESHES_PER_OP = 2


class DemoError(Exception):
    """A problem that stops the demo, told in one line."""


@dataclass(frozen=True)
class Load:
    """The accounts the scenarios call the provider for, and the ops they call for each."""

    accounts: tuple[str, ...] = ACCOUNTS
    ops: tuple[str, ...] = OPS

    @classmethod
    def scaled(cls, accounts: int, ops: int) -> "Load":
        """Return a load of ``accounts`` accounts and ``ops`` ops: acme, globex, initech, acme2, ..."""
        return cls(_names(ACCOUNTS, accounts, ""), _names(OPS, ops, "_"))


def _names(base: tuple[str, ...], count: int, separator: str) -> tuple[str, ...]:
    return tuple(
        base[number % len(base)] + (f"{separator}{number // len(base) + 1}" if number >= len(base) else "")
        for number in range(count)
    )


def each_op(load: Load) -> list[dict[str, str]]:
    """Return one call per account and op, op by op, so that every account is near the head of the queue."""
    return [{"account_id": account, "op": op} for op in load.ops for account in load.accounts]


def each_op_twice(load: Load) -> list[dict[str, str]]:
    """Return two calls per account and op: enough for a rate limit to bind."""
    return [call for _ in range(2) for call in each_op(load)]


def refreshes(load: Load) -> list[dict[str, str]]:
    """Return the refresh requests of every account, interleaved."""
    return [{"account_id": account} for _ in range(REFRESHES_PER_OP * len(load.ops)) for account in load.accounts]


#: The APIs a scenario can enqueue through: keyjobs' delay(), or Django's tasks framework (Django 6.1).
APIS = ("keyjobs", "django")


@dataclass(frozen=True)
class Scenario:
    letter: str
    name: str
    task: Task[..., Any]
    calls: Callable[[Load], list[dict[str, str]]]
    #: "django": enqueue the task's twin in ``demo_project.django_tasks`` through ``django.tasks``.
    api: str = "keyjobs"

    def through(self, api: str) -> "Scenario":
        """Return this scenario enqueued through ``api``; DemoError if it has no task declared for it."""
        if api == "django":
            if django.VERSION < (6, 1):
                raise DemoError(f"--api django needs Django 6.1 (django.tasks); this is Django {django.get_version()}")
            from . import django_tasks

            if self.letter not in django_tasks.TWINS:
                raise DemoError(
                    f"scenario {self.letter} has no django.tasks task; --api django runs {', '.join(django_tasks.TWINS)}"
                )
        return replace(self, api=api)

    @property
    def policy(self) -> Policy:
        """The concurrency policy of the task that runs: the keyjobs task's, or its django.tasks twin's."""
        if self.api == "django":
            from . import django_tasks

            return django_tasks.TWINS[self.letter].keyjobs_spec.policy
        return self.task.spec.policy

    @property
    def keyed(self) -> bool:
        """Whether the task promises that the calls for one account never overlap."""
        return self.policy.running is Mode.KEYS

    @property
    def drops(self) -> bool:
        """Whether the task drops the work concurrency control blocks."""
        return self.keyed and not self.policy.park_blocked

    @property
    def merges(self) -> bool:
        """Whether the task merges a duplicate delay() into the invocation already waiting."""
        return self.policy.registration is not Mode.DISABLED

    @property
    def rate(self) -> Rate | None:
        """The task's ``rate_limit``: at most ``count`` calls per account in any ``window`` seconds."""
        rate: Rate | None = self.task.rate_limit
        return rate

    @property
    def limited(self) -> bool:
        """Whether the task lets more than one call per account run at once (``running_limit``)."""
        return self.keyed and self.task.running_limit != 1

    def slots(self, account: str) -> int:
        """Return the calls of ``account`` the task lets run at once: its running_limit, or the function's answer."""
        limit = self.task.running_limit
        return int(limit(account) if callable(limit) else limit)

    @property
    def title(self) -> str:
        # Read off the task's declaration, so that the title cannot drift from what runs.
        policy = self.policy
        declared = [
            f"{option}={mode.name}"
            for option, mode in (
                ("running_concurrency", policy.running),
                ("registration_concurrency", policy.registration),
            )
            if mode is not Mode.DISABLED
        ]
        if self.rate is not None:
            declared.append(f"rate_limit={self.rate}")
        if self.limited:
            limit = self.task.running_limit
            declared.append(f"running_limit={getattr(limit, '__name__', limit)}")
        if declared:
            declared.append(f"reroute={policy.park_blocked}")
        through = " (through django.tasks)" if self.api == "django" else ""
        return f"{self.letter}. {self.name}{through} — {', '.join(declared) or 'no concurrency control'}"

    def enqueue(self, calls: list[dict[str, str]]) -> tuple[set[int], set[int]]:
        """Enqueue ``calls`` in one transaction; return the ids of their invocations, and of those created."""
        if self.api == "django":
            from . import django_tasks

            twin = django_tasks.TWINS[self.letter]
            results = [twin.enqueue(**call) for call in calls]
            return {int(result.id) for result in results}, {int(result.id) for result in results if not result.merged}
        invocations = self.task.delay_many(calls)
        return {invocation.pk for invocation in invocations}, {inv.pk for inv in invocations if not inv.reused}


SCENARIOS = {
    scenario.letter: scenario
    for scenario in (
        Scenario("A", "unsafe", tasks.call_unsafe, each_op),
        Scenario("B", "keyed", tasks.call_keyed, each_op),
        Scenario("C", "keyed, dropping", tasks.call_keyed_drop, each_op),
        Scenario("D", "refresh once", tasks.refresh_once, refreshes),
        Scenario("E", "tiered slots", tasks.call_tiered, each_op),
        Scenario("F", "rate-limited", tasks.call_rated, each_op_twice),
    )
}

#: What a command line names: a scenario's letter, or all of them (the commands' usage line, and the docs').
CHOICES = "|".join([*SCENARIOS, "all"])


# -- the provider's side ------------------------------------------------------


class ProviderClient:
    """Reset and read the provider's counters."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._http = httpx.Client(base_url=url, timeout=10.0, trust_env=False)

    def reset(self, hold: float | None = None) -> dict[str, Any]:
        """Zero the counters and the log, and set the hold if given; return the provider's stats."""
        return self._ask("POST", "/reset", json={} if hold is None else {"hold": hold})

    def stats(self) -> dict[str, Any]:
        """Return the provider's counters and call log."""
        return self._ask("GET", "/stats")

    def _ask(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, **kwargs)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise DemoError(
                f"cannot reach the provider at {self.url} ({exc}); start it with `python -m demo_project.provider`"
            ) from None
        answer: dict[str, Any] = response.json()
        return answer

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "ProviderClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# -- one scenario ---------------------------------------------------------------


@dataclass(frozen=True)
class Account:
    name: str
    calls: int
    collisions: int
    dropped: int
    deduplicated: int
    #: With a rate limit: the most starts of the account's calls within one window, by the database's
    #: records (what the rate limit promises), and the most calls the provider saw arrive within one.
    busiest_window: int = 0
    busiest_at_provider: int = 0
    #: The most calls of the account the provider saw in flight at once, and how many its task allows.
    peak: int = 1
    slots: int = 1


@dataclass(frozen=True)
class Summary:
    """What one run of a scenario did, as the provider and the database tell it."""

    scenario: Scenario
    #: delay() calls made.
    enqueued: int
    statuses: dict[str, int]
    calls: int
    collisions: int
    dropped: int
    deduplicated: int
    #: Invocations still not final when the run stopped waiting.
    unfinished: int
    #: From the first enqueue to the last finished_at, both by the database's clock; None if unfinished.
    seconds: float | None
    #: The least time the calls made could take; see ``limit()``.
    limit: float
    timeout: float
    accounts: list[Account]
    log: list[dict[str, Any]]

    @property
    def ok(self) -> bool:
        """Whether every invocation ended, and a keyed task kept its promise of no collisions."""
        return not self.problems()

    def problems(self) -> list[str]:
        """Return what went wrong, one short phrase each."""
        found = []
        if self.scenario.keyed and self.collisions:
            found.append(f"{self.scenario.letter} saw {self.collisions} collision(s)")
        if self.unfinished:
            found.append(f"{self.scenario.letter} left {self.unfinished} invocation(s) unfinished")
        rate = self.scenario.rate
        if rate is not None:
            found += [f"{self.scenario.letter}: {account.name} started {account.busiest_window} calls within "
                      f"{rate.window:g}s, its rate is {rate}" for account in self.accounts
                      if account.busiest_window > rate.count]
        if self.scenario.limited:
            # The limit is a promise both ways: never above it, and every slot used while work waits.
            found += [f"{self.scenario.letter}: {account.name} peaked at {account.peak} in flight, its limit is "
                      f"{account.slots}" for account in self.accounts if account.peak != account.slots]
        return found

    def report(self, *, log: bool = True) -> str:
        """Return the summary as the demo prints it, followed by the provider's call log."""
        outcome = [f"{self.calls} calls", f"{self.collisions} collisions"]
        if self.scenario.drops or self.dropped:
            outcome.append(f"{self.dropped} dropped")
        if self.scenario.merges or self.deduplicated:
            outcome.append(f"{self.deduplicated} deduplicated")
        if self.seconds is None:
            timing = f"{self.unfinished} did not end within {self.timeout:g}s"
        else:
            timing = f"{self.seconds:.2f}s (limit {self.limit:.2f}s)"
        statuses = ", ".join(f"{self.statuses[status]} {status}" for status in Status if status in self.statuses)
        lines = [
            f"=== {self.scenario.title} ===",
            f"  {self.enqueued} enqueued -> {', '.join(outcome)}, {timing}",
            f"  invocations: {statuses}",
        ]
        for account in self.accounts:
            line = f"  {'!!' if account.collisions else 'OK'} {account.name:<8} calls={account.calls:<2} collisions={account.collisions}"
            if self.scenario.drops or account.dropped:
                line += f"  dropped={account.dropped}"
            if self.scenario.merges or account.deduplicated:
                line += f"  deduplicated={account.deduplicated}"
            if self.scenario.rate is not None:
                line += (f"  busiest {self.scenario.rate.window:g}s window: {account.busiest_window} starts "
                         f"({account.busiest_at_provider} arrivals at the provider)")
            if self.scenario.limited:
                line += f"  in flight at most {account.peak} of {account.slots}"
            lines.append(line)
        if log and self.log:
            lines.append("  call log, in seconds from the first call:")
            first = self.log[0]["started"]
            for call in self.log:
                ended = "  …  " if call["ended"] is None else f"{call['ended'] - first:5.2f}"
                mark = "COLLISION" if call["collision"] else "ok"
                lines.append(f"    {call['started'] - first:5.2f}-{ended}  [{mark:<9}] {call['account']:<8} {call['op']}")
        return "\n".join(lines)


def limit(invocations: Iterable[dict[str, Any]], hold: float, threads: int, rate: Rate | None = None) -> float:
    """Return the least time the calls made could take: the longest chain of one key, or the pool's width.

    The calls of one running key run its ``running_limit`` at a time; calls
    without a key are chains of one; and no more than ``threads`` calls run
    at a time. With a ``rate``, a key's n calls also need ceil(n / count) - 1
    windows before its last one starts.
    """
    made = [invocation for invocation in invocations if invocation["started_at"] is not None]
    chains = Counter(invocation["running_key"] or f"#{invocation['pk']}" for invocation in made)
    slots = {invocation["running_key"] or f"#{invocation['pk']}": invocation.get("running_limit", 1) for invocation in made}
    longest = max((-(-count // slots[key]) for key, count in chains.items()), default=0)
    calls = max(chains.values(), default=0)
    paced = 0.0 if rate is None else (-(-calls // rate.count) - 1) * rate.window + hold
    return max(longest * hold, len(made) * hold / threads, paced)


def live_threads(*, using: str | None = None) -> int:
    """Return how many runner threads are alive: those of runners not stopped whose heartbeat is recent."""
    recent = Now() - timedelta(seconds=3 * conf.HEARTBEAT_INTERVAL)
    alive = Runner.objects.using(using or conf.DATABASE).active().filter(heartbeat_at__gte=recent)
    return int(alive.aggregate(threads=Sum("threads"))["threads"] or 0)


def run(
    scenario: Scenario,
    provider: ProviderClient,
    *,
    load: Load = Load(),
    hold: float | None = None,
    threads: int | None = None,
    timeout: float | None = None,
) -> Summary:
    """Run ``scenario`` on the workers that are running, and return what happened.

    ``hold`` changes the provider's (else it keeps its own); ``threads`` is the
    size of the pool (else the live runners' threads are counted); ``timeout``
    is how long to wait for the invocations to end (else well over what the
    load needs).
    """
    using = conf.DATABASE
    hold = provider.reset(hold)["hold"]
    threads = threads or live_threads(using=using) or 1
    if timeout is None:
        timeout = 30.0 + 3 * hold * max(len(load.ops), len(load.accounts) * len(load.ops) / threads)
    # Events up to this one belong to earlier runs; an invocation left waiting
    # by one of those may be reused by this one, but its old events are not ours.
    last_event = Event.objects.using(using).aggregate(last=Max("pk"))["last"] or 0
    calls = scenario.calls(load)
    # One transaction: no worker sees any call before all of them are in, so
    # that no refresh can start before its duplicates arrive to merge into it.
    with transaction.atomic(using=using):
        ids, created = scenario.enqueue(calls)
    unfinished = wait_until_final(ids, timeout=timeout, using=using)
    return collect(
        scenario, ids, created=created, enqueued=len(calls), last_event=last_event, stats=provider.stats(),
        threads=threads, unfinished=unfinished, timeout=timeout, using=using,
    )


def wait_until_final(ids: set[int], *, timeout: float, using: str) -> int:
    """Wait until every invocation of ``ids`` is final; return how many still are not after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = Invocation.objects.using(using).filter(pk__in=ids).exclude(status__in=FINAL).count()
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def collect(
    scenario: Scenario,
    ids: set[int],
    *,
    created: set[int],
    enqueued: int,
    last_event: int,
    stats: dict[str, Any],
    threads: int,
    unfinished: int,
    timeout: float,
    using: str,
) -> Summary:
    """Sum up a run of ``scenario`` from the provider's ``stats`` and the database's rows of ``ids``."""
    rows = list(
        Invocation.objects.using(using).filter(pk__in=ids).order_by("pk")
        .values("pk", "status", "kwargs", "running_key", "running_limit", "created_at", "started_at", "finished_at")
    )
    reuses = Counter(
        Event.objects.using(using)
        .filter(invocation__in=ids, kind=Event.Kind.REUSED, pk__gt=last_event)
        .values_list("invocation_id", flat=True)
    )
    dropped: Counter[str] = Counter()
    deduplicated: Counter[str] = Counter()
    for row in rows:
        account = row["kwargs"]["account_id"]
        dropped[account] += row["status"] == Status.CONCURRENCY_CONTROLLED_FINAL
        deduplicated[account] += reuses[row["pk"]]
    seconds = None
    if not unfinished:
        # Both ends by the database's clock: the first enqueue of this run (a
        # reused leftover was enqueued earlier) and the last invocation to end.
        first = min(row["created_at"] for row in [row for row in rows if row["pk"] in created] or rows)
        seconds = (max(row["finished_at"] for row in rows) - first).total_seconds()
    counted = stats["accounts"]
    return Summary(
        scenario=scenario,
        enqueued=enqueued,
        statuses=dict(Counter(row["status"] for row in rows)),
        calls=stats["calls"],
        collisions=stats["collisions"],
        dropped=sum(dropped.values()),
        deduplicated=sum(deduplicated.values()),
        unfinished=unfinished,
        seconds=seconds,
        limit=limit(rows, stats["hold"], threads, scenario.rate),
        timeout=timeout,
        accounts=[
            Account(
                name=account,
                calls=counted.get(account, {}).get("calls", 0),
                collisions=counted.get(account, {}).get("collisions", 0),
                dropped=dropped[account],
                deduplicated=deduplicated[account],
                busiest_window=busiest_window(
                    [row["started_at"].timestamp() for row in rows
                     if row["kwargs"]["account_id"] == account and row["started_at"] is not None], scenario.rate),
                busiest_at_provider=busiest_window(
                    [call["started"] for call in stats["log"] if call["account"] == account], scenario.rate),
                peak=counted.get(account, {}).get("max_in_flight", 0),
                slots=scenario.slots(account) if scenario.keyed else 1,
            )
            for account in dict.fromkeys(row["kwargs"]["account_id"] for row in rows)
        ],
        log=stats["log"],
    )


def busiest_window(moments: list[float], rate: Rate | None) -> int:
    """Return the most of ``moments`` (seconds) within one window of ``rate``, [t, t + window) from each; 0 without one.

    The rate limit counts starts as the database records them. The provider
    sees each call some milliseconds later, more for a thread's first call
    (it opens its client): that latency varies, so the provider may see calls
    a little closer together than they started.
    """
    if rate is None:
        return 0
    starts = sorted(moments)
    return max((bisect.bisect_left(starts, start + rate.window) - n for n, start in enumerate(starts)), default=0)


def run_all(
    scenarios: Iterable[Scenario],
    provider: ProviderClient,
    *,
    report: Callable[[Summary], None],
    **options: Any,
) -> list[Summary]:
    """Run ``scenarios`` in order, handing each summary to ``report``; stop after one that left invocations unfinished."""
    summaries = []
    for scenario in scenarios:
        summary = run(scenario, provider, **options)
        report(summary)
        summaries.append(summary)
        if summary.unfinished:
            # Its leftovers would hold keys and make calls during the next scenario.
            break
    return summaries


# -- the processes of `manage.py demo` -----------------------------------------

LISTENING = re.compile(r"provider listening on (\S+) ")


class Stack:
    """The provider and the workers, as subprocesses on this database; ``stop()`` ends them all.

    The subprocesses get sessions of their own, so that a Ctrl-C in the
    terminal reaches the demo alone, which then stops them in order.
    """

    #: Seconds a subprocess gets to exit after SIGTERM before it is killed.
    GRACE = 10.0

    def __init__(self, *, port: int, hold: float, threads: int, workers: int) -> None:
        self.port = port
        self.hold = hold
        self.threads = threads
        self.workers = workers
        self.url = ""
        self.provider: subprocess.Popen[str] | None = None
        self.runners: list[subprocess.Popen[str]] = []

    def start(self, *, timeout: float = 30.0) -> str:
        """Start the provider, then the workers; return the provider's URL once all of them are ready."""
        self.url = self._start_provider(timeout)
        self._start_workers(timeout)
        return self.url

    def _start_provider(self, timeout: float) -> str:
        self.provider = subprocess.Popen(
            [sys.executable, "-m", "demo_project.provider", "--port", str(self.port), "--hold", str(self.hold), "--quiet"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        assert self.provider.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.provider.stdout, selectors.EVENT_READ)
            line = self.provider.stdout.readline() if selector.select(timeout) else ""
        listening = LISTENING.match(line)
        if listening is None:
            complaint = self._end(self.provider).strip().splitlines()
            self.provider = None
            raise DemoError(complaint[-1] if complaint else f"the provider did not start within {timeout:g}s")
        return listening[1]

    def _start_workers(self, timeout: float) -> None:
        runners = Runner.objects.using(conf.DATABASE)
        last_runner = runners.aggregate(last=Max("pk"))["last"] or 0
        environment = {**os.environ, "PROVIDER_URL": self.url, "PYTHONUNBUFFERED": "1"}
        for _ in range(self.workers):
            self.runners.append(
                subprocess.Popen(
                    # Verbosity 0 logs warnings only, which would otherwise drown the summaries. No reloader
                    # (DEBUG's default): stop() sends SIGTERM, which the reloader's outer process turns into a kill.
                    [sys.executable, "manage.py", "runworker", "--noreload", "--threads", str(self.threads),
                     "--verbosity", "0"],
                    cwd=ROOT, env=environment, stdout=subprocess.DEVNULL, text=True, start_new_session=True,
                )
            )
        # Ready means registered: otherwise the first timing would include Django's start-up.
        pids = [process.pid for process in self.runners]
        deadline = time.monotonic() + timeout
        while runners.active().filter(pk__gt=last_runner, pid__in=pids).count() < len(pids):
            for process in self.runners:
                if process.poll() is not None:
                    raise DemoError(f"a worker exited with status {process.returncode} before it was ready")
            if time.monotonic() >= deadline:
                raise DemoError(f"the workers were not ready within {timeout:g}s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the workers (they finish the calls they are making), then the provider."""
        # One SIGTERM each: a second one makes a worker exit at once.
        for process in self.runners:
            self._terminate(process)
        for process in self.runners:
            self._reap(process)
        self.runners = []
        if self.provider is not None:
            self._end(self.provider)
            self.provider = None

    def _end(self, process: subprocess.Popen[str]) -> str:
        """End ``process``; return what it wrote to a piped stderr."""
        self._terminate(process)
        return self._reap(process)

    def _terminate(self, process: subprocess.Popen[str]) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)

    def _reap(self, process: subprocess.Popen[str]) -> str:
        """Wait for ``process`` to exit, killing it after the grace period; return what it wrote to a piped stderr."""
        try:
            _, errors = process.communicate(timeout=self.GRACE)
        except subprocess.TimeoutExpired:
            process.kill()
            _, errors = process.communicate()
        return errors or ""

    def __enter__(self) -> "Stack":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
