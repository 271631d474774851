"""A web app's side of a keyed run: one enqueue per call, from a process of its own.

    python -m bench.client TASK WORKLOAD ORDER [--system keyjobs|dbos] [--census OUT.json]

Started by a bench with ``DATABASE_URL`` set (keyjobs) or ``BENCH_DBOS_DSN``
(DBOS). It sets up, opens its connection, prints ``ready`` and waits for a
line on stdin; then it makes each call of the workload in ``ORDER``: with
keyjobs ``TASK.delay(account, op)`` of ``bench.tasks``, in autocommit (each
its own transaction, as a view without ``ATOMIC_REQUESTS`` makes it); with
DBOS ``DBOSClient.enqueue()`` of the workflow ``call`` on the partitioned
queue of the workload's slots, the account as its partition key. Then it
prints one line of JSON: when the first call began and the last returned
(the wall clock, which the provider's log uses too), and its CPU seconds. It
exits when its stdin closes.
"""

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any


def keyjobs_sender(task_name: str, census: str | None) -> Callable[[str, str], Any]:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo_project.settings")
    if census:
        from bench import census as counting

        counting.install("client", census)
    import django

    django.setup()
    from django.db import connection

    from bench import tasks

    task = getattr(tasks, task_name)
    connection.ensure_connection()
    return lambda account, op: task.delay(account, op)


def dbos_sender(slots: int) -> Callable[[str, str], Any]:
    from dbos import DBOSClient

    from bench.peers import dbos_app

    client = DBOSClient(system_database_url=dbos_app.DSN, application_name=dbos_app.APP)
    queue = dbos_app.KEYED[slots]

    def send(account: str, op: str) -> Any:
        return client.enqueue({"workflow_name": "call", "queue_name": queue, "queue_partition_key": account},
                              account, op, slots)

    return send


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.client", description=__doc__.split("\n\n")[0])
    parser.add_argument("task", help="A task of bench.tasks, e.g. call (keyjobs only).")
    parser.add_argument("workload", help="A workload of bench.workloads, by name.")
    parser.add_argument("order", help="grouped or interleaved.")
    parser.add_argument("--system", choices=["keyjobs", "dbos"], default="keyjobs")
    parser.add_argument("--census", default=None, help="Count the statements sent into this file (bench.census).")
    args = parser.parse_args(argv)
    from bench.workloads import named

    workload = named(args.workload)
    send = keyjobs_sender(args.task, args.census) if args.system == "keyjobs" else dbos_sender(workload.slots)
    calls = workload.calls_in(args.order)
    print("ready", flush=True)
    if not sys.stdin.readline():
        return 1  # the bench went away
    cpu = time.process_time()
    first = time.time()
    for account, op in calls:
        send(account, op)
    last = time.time()
    print(json.dumps({"first": first, "last": last, "calls": len(calls), "cpu": time.process_time() - cpu}),
          flush=True)
    sys.stdin.read()  # stay connected until the bench has read this process's backend (it closes stdin)
    return 0


if __name__ == "__main__":
    sys.exit(main())
