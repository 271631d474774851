"""The keyed workloads of issues 2 and 6, the same for keyjobs and its peers.

A workload is a set of provider calls per account, each held for a fixed
time. Its physical limit is the larger of its longest per-account chain and
its total work spread over every thread.
"""

from dataclasses import dataclass

ORDERS = ("grouped", "interleaved")
#: A run slower than its limit by this factor is cut short and reported as such, so that every run ends.
PATIENCE = 12.0


@dataclass(frozen=True)
class Workload:
    name: str
    accounts: int  # cold accounts, each with `calls` calls
    calls: int
    seconds: float  # the provider's hold: how long each call takes
    threads: int  # runner threads in all, over every worker process
    hot_calls: int = 0  # calls of one extra, hot account
    peer_figure: str = ""  # what the issue measured on a peer, for the reader
    slots: int = 1  # calls of one account that may run at once (running_limit)

    @property
    def total(self) -> int:
        return self.accounts * self.calls + self.hot_calls

    @property
    def limit(self) -> float:
        """Seconds no scheduler can beat: the longest chain (over its slots), or all the work over all the threads."""
        chain = max(self.calls, self.hot_calls) * self.seconds / self.slots
        return max(chain, self.total * self.seconds / self.threads)

    @property
    def cutoff(self) -> float:
        """Seconds after which a run of this workload is cut short."""
        return max(30.0, self.limit * PATIENCE)

    def label(self) -> str:
        hot = f"+hot{self.hot_calls}" if self.hot_calls else ""
        slots = f" running_limit={self.slots}" if self.slots > 1 else ""
        return f"{self.name} {self.accounts}x{self.calls}{hot} {self.seconds * 1000:g}ms{slots} t{self.threads}"

    def calls_in(self, order: str) -> list[tuple[str, str]]:
        """Return (account, op) pairs in enqueue order: each account's calls together, or round-robin."""
        chains = [[(f"acct{a:03d}", f"op{c}") for c in range(self.calls)] for a in range(self.accounts)]
        if self.hot_calls:
            chains.insert(0, [("hot", f"op{c}") for c in range(self.hot_calls)])
        if order == "grouped":
            return [call for chain in chains for call in chain]
        if order == "interleaved":
            longest = max(len(chain) for chain in chains)
            return [chain[i] for i in range(longest) for chain in chains if i < len(chain)]
        raise ValueError(f"unknown order {order!r}; the orders are {', '.join(ORDERS)}")


#: Issue 2's blocked-work case: 3 accounts x 4 calls of 0.4 s on 8 threads (limit 1.6 s).
BLOCKED = Workload("blocked", 3, 4, 0.4, 8, peer_figure="pynenc 1.43x")
#: Issue 2's wide case: 200 accounts x 5 calls of 50 ms on 16 threads (limit 3.125 s).
WIDE = Workload("wide", 200, 5, 0.05, 16, peer_figure="pynenc 14.8x")
#: 50 accounts x 8 calls of 0.1 s (limit 2.5 s on 16 threads).
MEDIUM = Workload("medium", 50, 8, 0.1, 16, peer_figure="pynenc 4.8x")
#: One hot account with 40 calls beside 40 cold accounts with one each (limit: the hot chain, 2 s).
HOT = Workload("hotcold", 40, 1, 0.05, 16, hot_calls=40, peer_figure="pynenc 3.0x")
#: Procrastinate's case in issue 6: 100 accounts x 10 jobs of 20 ms, concurrency 8 (limit 2.5 s).
PROCRASTINATE = Workload("pcase", 100, 10, 0.02, 8, peer_figure="procrastinate 1.6x interleaved, 17.7x grouped")

#: One hot account with 40 calls of 0.1 s beside 40 cold ones with one each, 8 threads (issue 12; limit 4 s).
HOTCHAIN = Workload("hotchain", 40, 1, 0.1, 8, hot_calls=40)

ALL = (BLOCKED, WIDE, MEDIUM, HOT, PROCRASTINATE, HOTCHAIN)
QUICK = (BLOCKED, WIDE)

#: Issue 22's short calls: 100 accounts x 50 calls of 10 ms on 8 threads (limit 6.25 s, the work).
SHORT = Workload("short", 100, 50, 0.01, 8)
#: Issue 22's running_limit=3: 8 accounts x 15 calls of 0.1 s on 16 threads (limit max(0.5, 0.75) = 0.75 s).
SLOTS3 = Workload("slots3", 8, 15, 0.1, 16, slots=3)
#: Issue 12's running_limit=3: 20 accounts x 30 calls of 50 ms on 16 threads (limit max(0.5, 1.875) s).
LIMIT3 = Workload("limit3", 20, 30, 0.05, 16, slots=3)
#: Issue 22's rows enqueued as a web app enqueues (bench.webapp), and their --quick sizes.
DELAYED = (SHORT, WIDE, SLOTS3)
DELAYED_QUICK = (Workload("short-q", 100, 10, 0.01, 8), Workload("wide-q", 100, 5, 0.05, 16), SLOTS3)


def by_name(names: str | None, *, quick: bool) -> tuple[Workload, ...]:
    """Return the workloads named (comma-separated), else the quick or full set."""
    if not names:
        return QUICK if quick else ALL
    return tuple(named(name) for name in names.split(","))


def named(name: str) -> Workload:
    """Return the workload called ``name``; SystemExit naming the known ones if there is none."""
    known = {workload.name: workload for workload in (*ALL, LIMIT3, *DELAYED, *DELAYED_QUICK)}
    if name not in known:
        raise SystemExit(f"unknown workload {name!r}; the workloads are {', '.join(known)}")
    return known[name]


@dataclass(frozen=True)
class Sizes:
    """How much each non-keyed measurement does, the same for keyjobs and its peers."""

    drain: int  # no-op invocations queued, then drained by one worker process
    drain_threads: int  # that worker's threads (a peer's concurrency)
    latency_samples: int  # invocations enqueued one at a time onto an idle worker
    enqueue_single: int  # delay() calls, one at a time
    enqueue_bulk: int  # calls in one delay_many()
    hot_backlog: int  # invocations queued for the hot key (target 2)
    history_finished: int  # finished invocations already in the table (target 6)
    history_waiting: int  # waiting no-op invocations in the table
    history_window: float  # seconds the worker drains them for


FULL_SIZES = Sizes(drain=3000, drain_threads=4, latency_samples=200, enqueue_single=2000, enqueue_bulk=20_000,
                   hot_backlog=10_000, history_finished=1_000_000, history_waiting=100_000, history_window=10.0)
QUICK_SIZES = Sizes(drain=1000, drain_threads=4, latency_samples=50, enqueue_single=500, enqueue_bulk=20_000,
                    hot_backlog=1000, history_finished=50_000, history_waiting=5000, history_window=3.0)


def sizes(quick: bool) -> Sizes:
    return QUICK_SIZES if quick else FULL_SIZES


def latency_gaps(samples: int) -> list[float]:
    """Pauses between two enqueues: long enough for the worker to be idle again, and jittered so
    that they do not beat in step with a polling interval."""
    import random

    generator = random.Random(6)
    return [generator.uniform(0.03, 0.09) for _ in range(samples)]
