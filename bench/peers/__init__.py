"""The peers keyjobs is measured against, run in the bench's own venv (``.venv-bench``)."""

import argparse
from collections.abc import Callable
from typing import Any

from bench.harness import ProviderProcess, Recorder, exit_on_sigterm, say, table, wait_for_postgres
from bench.workloads import ORDERS, by_name, sizes

METRICS = ("keyed", "drain", "latency", "enqueue", "webapp")


def run_peer(
    argv: list[str] | None,
    *,
    prog: str,
    description: str,
    system: str,
    banner: str,
    bench: Callable[[], Any],
    recover: Callable[[Any], bool],
    close: Callable[[Any], None],
) -> int:
    """Parse a peer bench's options and run its metrics, each retried once if ``recover(bench)`` allows."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default=",".join(METRICS), help="Comma-separated metrics.")
    parser.add_argument("--workloads", default=None)
    parser.add_argument("--orders", default=",".join(ORDERS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    exit_on_sigterm()
    only = set(args.only.split(","))
    size = sizes(args.quick)
    say(banner)
    for attempt in (1, 2):
        try:
            runner = bench()
            break
        except Exception as exc:
            # PostgreSQL may have been restarted under the set-up by another suite on this machine.
            say(f"  {system}: could not set up ({type(exc).__name__}: {exc})")
            if attempt == 2 or not wait_for_postgres():
                raise
    runner.quick = args.quick
    results = Recorder(args.json)
    try:
        for metric in METRICS:
            if metric not in only:
                continue
            for attempt in (1, 2):
                try:
                    if metric == "keyed":
                        with ProviderProcess() as provider:
                            runner.keyed(by_name(args.workloads, quick=args.quick), tuple(args.orders.split(",")),
                                         provider, results)
                    elif metric == "webapp":
                        # Issue 22's rows, one enqueue per call from a client process: for a peer that can run them.
                        if hasattr(runner, "webapp"):
                            with ProviderProcess() as provider:
                                runner.webapp(args.quick, provider, results)
                    else:
                        results.add(*getattr(runner, metric)(size))
                    break
                except Exception as exc:
                    say(f"  {system} {metric}: {type(exc).__name__}: {exc}")
                    if attempt == 1 and metric != "keyed" and recover(runner):
                        say(f"  {system} {metric}: once more")
                        continue
                    break
    finally:
        close(runner)
    if not args.json:
        print(table(results, title=system.capitalize()))
    return 0
