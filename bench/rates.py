"""Rate windows and debounce (issue 12): rate_limit="20/s" per account, and debounce 0.5 s.

    .venv/bin/python -m bench.rates [--db sqlite|postgres|both] [--only rate,debounce]

Both rows run on two real ``manage.py runworker`` processes. The rate row
counts each account's starts in every 1 s window by the database's records
(the starts the rate limit promises, whichever worker made them), and sets
the total time beside the 3 s its 60 calls per account need at 20 a second.
The debounce row sends each of 50 accounts 20 requests over 1 s and counts
the runs, and whether each ran with its account's last request.

Procrastinate and Celery cannot express these workloads: Procrastinate has
no rate limit and no debounce; Celery's ``rate_limit`` is per worker and per
task, with no key, and it has no debounce. The table says so on their rows
instead of leaving them empty.
"""

import itertools
import sys
import threading
import time
from datetime import datetime, timedelta

from .harness import Recorder, Result, bench_main, run_rows, say, wait_until

ROWS = ("rate", "debounce")
PEERS_CANNOT = ("Procrastinate and Celery cannot express it (no per-key rate limit: Celery's rate_limit is per "
                "worker and per task; neither debounces)")

#: 10 accounts x 60 no-op calls at rate_limit="20/s": three windows of 20 each.
RATE_ACCOUNTS, RATE_CALLS, RATE = 10, 60, 20
#: 50 accounts x 20 requests over 1 s, debounce 0.5 s.
DEBOUNCE_ACCOUNTS, DEBOUNCE_REQUESTS, DEBOUNCE_SPREAD = 50, 20, 1.0
THREADS, WORKERS = 8, 2
#: Threads sending the debounce row's requests, each for a share of the accounts: on PostgreSQL one delay()
#: at a time could not send 1,000 in a second on a loaded machine; SQLite writes one at a time anyway, and
#: senders racing for its lock only wait longer.
SENDERS = {"sqlite": 1, "postgres": 10}


def peers(case: str, db: str) -> Result:
    return Result(12, "rates", case, db, "procrastinate, celery", None, "", note=PEERS_CANNOT)


def busiest_window(starts: list[datetime], seconds: float) -> int:
    """Return the most starts within one window [t, t + seconds) from any start."""
    starts = sorted(starts)
    width = timedelta(seconds=seconds)
    most, first = 0, 0
    for last, start in enumerate(starts):
        while starts[first] <= start - width:
            first += 1
        most = max(most, last - first + 1)
    return most


def rate(db: str) -> list[Result]:
    """10 accounts x 60 no-op calls, rate_limit="20/s": no 1 s window over 20 starts; within 1.10x of 3 s."""
    from bench import runs, tasks
    from keyjobs.models import Invocation

    limit = RATE_CALLS / RATE
    calls = [((f"account-{a}", n), {}) for n in range(RATE_CALLS) for a in range(RATE_ACCOUNTS)]
    with runs.Workers(WORKERS, THREADS, name=f"rates-{db}") as pool:
        # The same calls with no rate limit first: what this machine needs for them anyway.
        runs.clear()
        tasks.noop_keyed_numbered.delay_many(calls)
        runs.wait_finished(len(calls), timeout=120, workers=pool)
        unlimited, _ = runs.span()
        runs.clear()
        tasks.noop_rated.delay_many(calls)
        runs.wait_finished(len(calls), timeout=120, workers=pool)
    elapsed, statuses = runs.span()
    busiest = 0
    for a in range(RATE_ACCOUNTS):
        starts = list(Invocation.objects.filter(running_key=f'{{"account_id":"account-{a}"}}')
                      .values_list("started_at", flat=True))
        busiest = max(busiest, busiest_window(starts, 1.0))
    case = f"rate_limit=20/s {RATE_ACCOUNTS}x{RATE_CALLS} no-op t{THREADS} w{WORKERS}"
    result = Result(12, "rates", case, db, "keyjobs", elapsed, "s", limit, "60 calls at 20/s",
                    note=f"busiest 1s window of an account: {busiest} starts (at most {RATE}); the same calls "
                         f"without a rate limit: {unlimited or 0:.2f}s "
                         f"{runs.describe(statuses)}".strip())
    result.judge(elapsed / limit if elapsed else None, at_most=1.10)
    result.ok = bool(result.ok and busiest <= RATE and not runs.describe(statuses))
    say(f"  {db:8} {case:52} {elapsed or 0:6.2f}s  {result.ratio or 0:.2f}x 3 s  {result.note}")
    return [result, peers(case, db)]


def send(accounts: list[int], began: float, sent: dict[int, list[float]]) -> None:
    """Send ``accounts`` their requests, each account's spread over the second, one sender thread's share.

    Note in ``sent`` when each request of each account went.
    """
    from django.db import connections

    from bench import tasks

    try:
        for request in range(DEBOUNCE_REQUESTS):
            for account in accounts:
                ahead = began + DEBOUNCE_SPREAD * request / DEBOUNCE_REQUESTS - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)
                tasks.refresh_debounced.delay(f"account-{account}", request)
                sent.setdefault(account, []).append(time.perf_counter())
    finally:
        connections.close_all()


def debounce(db: str) -> list[Result]:
    """50 accounts x 20 requests over 1 s, debounce 0.5 s: 50 runs, each with its account's last request."""
    from bench import runs
    from keyjobs.models import Invocation

    with runs.Workers(WORKERS, THREADS, name=f"rates-{db}") as pool:
        runs.clear()
        began = time.perf_counter()
        times: dict[int, list[float]] = {}
        senders = [threading.Thread(target=send, args=(list(range(first, DEBOUNCE_ACCOUNTS, SENDERS[db])), began,
                                                       times))
                   for first in range(SENDERS[db])]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        sent = time.perf_counter() - began
        # Every run has started once nothing is waiting; then wait for them to end.
        wait_until(lambda: not Invocation.objects.waiting().exists(), timeout=60, what="no run waiting",
                   processes=pool.processes)
        made = Invocation.objects.count()
        runs.wait_finished(made, timeout=60, workers=pool)
    last = DEBOUNCE_REQUESTS - 1
    with_last = Invocation.objects.filter(status="SUCCESS", return_value=last).count()
    _, statuses = runs.span()
    case = f"debounce 0.5s {DEBOUNCE_ACCOUNTS} accounts x {DEBOUNCE_REQUESTS} requests over 1s w{WORKERS}"
    gap = max(later - earlier for stamps in times.values() for earlier, later in itertools.pairwise(stamps))
    result = Result(12, "rates", case, db, "keyjobs", float(made), "runs", float(DEBOUNCE_ACCOUNTS), "one per account",
                    note=f"{with_last} ran with their account's last request; requests sent in {sent:.2f}s, an "
                         f"account's at most {gap:.2f}s apart "
                         f"{runs.describe(statuses)}".strip())
    result.judge(made / DEBOUNCE_ACCOUNTS, at_most=1.0)
    result.ok = bool(made == DEBOUNCE_ACCOUNTS and with_last == DEBOUNCE_ACCOUNTS)
    say(f"  {db:8} {case:52} {made} runs, {with_last} with the last request; sent in {sent:.2f}s, "
        f"an account's at most {gap:.2f}s apart")
    return [result, peers(case, db)]


def run_database(db: str, rows: list[str], results: Recorder) -> None:
    from bench import runs

    runs.setup(db, name="kj_bench_rates")  # its own scratch database: other benches may run meanwhile
    benches = {"rate": rate, "debounce": debounce}
    run_rows(db, rows, lambda row: benches[row](db), results, target=12, metric="rates")


def main(argv: list[str] | None = None) -> int:
    return bench_main(argv, module="bench.rates", doc=__doc__ or "", rows=ROWS, timeout=900,
                      quick_help="Accepted for bench's sake: the rows are short anyway.",
                      title="keyjobs, rate windows and debounce (issue 12)",
                      run=lambda args, results: run_database(args.db, args.only.split(","), results))


if __name__ == "__main__":
    sys.exit(main())
