"""Celery with Redis, on the same workloads as keyjobs (run in ``.venv-bench``).

    .venv-bench/bin/python -m bench.peers.celery_bench [--quick] [--only keyed,drain,latency,enqueue]

Celery has no per-key control, so its keyed runs report the provider's
collisions; they are timed by the provider's log (first call's start to the
last call's end). No-op tasks are timed by the times they note in Redis.
"""

import sys
import time
from typing import Any

from bench.harness import (
    REDIS_URL,
    ProviderProcess,
    Recorder,
    Result,
    median,
    percentile,
    say,
    spawn,
    stop,
    wait_until,
)
from bench.peers import run_peer
from bench.workloads import Sizes, Workload, latency_gaps

SYSTEM = "celery"


class Bench:
    def __init__(self) -> None:
        from bench.peers import celery_app

        self.module = celery_app
        self.redis = celery_app._redis
        self.redis.ping()

    def clear(self) -> None:
        """Empty the bench's queue and its notes; nothing else in Redis is touched."""
        m = self.module
        self.redis.delete(m.QUEUE, m.DONE_KEY, m.LATENCY_KEY, m.READY_KEY)

    def worker(self, pool: str, concurrency: int, provider_url: str = "", name: str = "celery") -> Any:
        """Start a worker on the bench's queue."""
        process = spawn(
            [sys.executable, "-m", "celery", "-A", "bench.peers.celery_app", "worker", "--pool", pool,
             "--concurrency", str(concurrency), "--queues", self.module.QUEUE, "--without-gossip",
             "--without-mingle", "--without-heartbeat", "--loglevel", "WARNING"],
            name=name, env={"PROVIDER_URL": provider_url, "KEYJOBS_BENCH_REDIS_URL": REDIS_URL},
        )
        return process

    def started(self, process: Any) -> None:
        """Wait until the worker has run the ready task that was queued last."""
        wait_until(lambda: self.redis.llen(self.module.READY_KEY) >= 1, timeout=60, what="the celery worker ready",
                   processes=[process])

    # -- target 1 ---------------------------------------------------------

    def keyed(self, workloads: tuple[Workload, ...], orders: tuple[str, ...], provider: ProviderProcess,
              results: Recorder) -> None:
        for workload in workloads:
            for order in orders:
                results.add(self.keyed_one(workload, order, provider))
        return results

    def keyed_one(self, workload: Workload, order: str, provider: ProviderProcess) -> Result:
        # Every task is queued before the worker starts, so that the timed span holds no enqueueing.
        self.clear()
        provider.reset(workload.seconds)
        calls = workload.calls_in(order)
        case = f"{workload.label()} {order} w1"
        result = Result(1, "keyed", case, "redis", SYSTEM, None, "s", workload.limit, "limit")
        for account, op in calls:
            self.module.call.delay(account, op)
        process = self.worker("threads", workload.threads, provider.url, name="celery-keyed")
        timeout = workload.cutoff
        try:
            def done() -> bool:
                stats = provider.stats()
                return bool(stats["calls"] >= len(calls) and stats["in_flight"] == 0)

            wait_until(done, timeout=timeout, interval=0.1, what="every call made", processes=[process])
        except TimeoutError:
            result.note = f"cut at {timeout:.0f}s"
            return result
        finally:
            stop([process])
        stats = provider.stats()
        elapsed = provider.span(stats)
        result.measured = elapsed
        result.judge(None if elapsed is None else elapsed / workload.limit)
        result.note = f"{stats['collisions']} collisions (no per-key control)"
        result.extra = {"collisions": stats["collisions"]}
        say(f"  celery {case:48} {elapsed or 0:6.2f}s  limit {workload.limit:.2f}s  {result.note}")
        return result

    # -- target 3 ---------------------------------------------------------

    def drain(self, size: Sizes) -> list[Result]:
        results = []
        for pool, concurrency in (("threads", size.drain_threads), ("prefork", 2)):
            self.clear()
            for _ in range(size.drain):
                self.module.noop.delay()
            case = f"no-op drain {pool} c{concurrency}"
            process = self.worker(pool, concurrency, name="celery-drain")
            try:
                wait_until(lambda: self.redis.llen(self.module.DONE_KEY) >= size.drain,
                           timeout=max(120.0, size.drain / 20), interval=0.1, what="the drain", processes=[process])
            except TimeoutError as exc:
                results.append(Result(3, "drain", case, "redis", SYSTEM, None, "/s", note=str(exc)))
                continue
            finally:
                stop([process])
            times = [float(t) for t in self.redis.lrange(self.module.DONE_KEY, 0, -1)]
            rate = len(times) / (max(times) - min(times)) if len(times) > 1 else None
            say(f"  celery drain ({pool} c{concurrency}): {rate or 0:,.0f}/s")
            results.append(Result(3, "drain", case, "redis", SYSTEM, rate, "/s", note=f"{size.drain} tasks"))
        return results

    # -- target 4 ---------------------------------------------------------

    def latency(self, size: Sizes) -> list[Result]:
        self.clear()
        self.module.ready.delay()
        process = self.worker("threads", size.drain_threads, name="celery-latency")
        try:
            self.started(process)
            for gap in latency_gaps(size.latency_samples):
                self.module.stamp.delay(time.time())
                time.sleep(gap)
            wait_until(lambda: self.redis.llen(self.module.LATENCY_KEY) >= size.latency_samples, timeout=30,
                       what="the latency samples", processes=[process])
        finally:
            stop([process])
        samples = [float(seconds) * 1000 for seconds in self.redis.lrange(self.module.LATENCY_KEY, 0, -1)]
        say(f"  celery latency p50 {median(samples):.1f} ms, p99 {percentile(samples, 0.99):.1f} ms")
        return [
            Result(4, "latency", "enqueue-to-start p50, idle worker", "redis", SYSTEM, median(samples), "ms",
                   note=f"{len(samples)} samples, threads c{size.drain_threads}"),
            Result(4, "latency", "enqueue-to-start p99, idle worker", "redis", SYSTEM, percentile(samples, 0.99), "ms",
                   note=f"{len(samples)} samples, threads c{size.drain_threads}"),
        ]

    # -- target 5 ---------------------------------------------------------

    def enqueue(self, size: Sizes) -> list[Result]:
        self.clear()
        noop = self.module.noop
        noop.delay()  # the broker connection opens on first use
        start = time.perf_counter()
        for _ in range(size.enqueue_single):
            noop.delay()
        single = size.enqueue_single / (time.perf_counter() - start)
        self.clear()
        say(f"  celery delay {single:,.0f}/s")
        return [Result(5, "enqueue", "enqueue one at a time", "redis", SYSTEM, single, "/s", note="task.delay()")]


def main(argv: list[str] | None = None) -> int:
    return run_peer(argv, prog="python -m bench.peers.celery_bench", description=__doc__.split("\n\n")[0],
                    system=SYSTEM, banner=f"bench: celery on {REDIS_URL}", bench=Bench,
                    recover=lambda bench: True, close=lambda bench: bench.clear())


if __name__ == "__main__":
    sys.exit(main())
