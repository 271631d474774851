"""How long the server takes to answer the timeline's data endpoint for 10,000 invocations.

    .venv/bin/python -m bench.timeline                      # SQLite, a scratch file
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/keyjobs .venv/bin/python -m bench.timeline

It creates a scratch database (Django's test database of DATABASE_URL, so
the database named there is left alone), fills it with invocations and
their histories as two runners with eight threads each would have written
them over ten minutes (runs, parked and dropped invocations, deduplicated
delay()s), then asks for the last fifteen minutes through Django's test
client as a staff user, and prints the median time of several requests:
the whole request, authentication and JSON included, without a network.
"""

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from typing import Any


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.timeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--invocations", type=int, default=10_000, help="How many (default %(default)s).")
    parser.add_argument("--requests", type=int, default=7, help="Requests to time (default %(default)s).")
    parser.add_argument("--seed", type=int, default=4, help="Random seed of the history (default %(default)s).")
    options = parser.parse_args(argv)

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo_project.settings")
    import django
    from django.conf import settings

    django.setup()
    from django.db import connection
    from django.test.utils import setup_test_environment

    database = settings.DATABASES["default"]
    scratch = None
    if database["ENGINE"].endswith("sqlite3"):
        # A file like the demo's, not the in-memory database Django tests default to.
        with tempfile.NamedTemporaryFile(prefix="keyjobs-bench-timeline-", suffix=".sqlite3", delete=False) as file:
            scratch = file.name
        database["TEST"]["NAME"] = scratch
    setup_test_environment()
    # Nothing to serialize for later tests; Django 6.1 no longer serializes unless asked, and deprecates the flag.
    serialize = {"serialize": False} if django.VERSION < (6, 1) else {}
    name = connection.creation.create_test_db(verbosity=0, autoclobber=True, **serialize)
    try:
        return run(options, name)
    finally:
        connection.creation.destroy_test_db(name, verbosity=0)
        if scratch and os.path.exists(scratch):
            os.unlink(scratch)


def fill(count: int, seed: int) -> dict[str, int]:
    """Write ``count`` invocations with the events a real run would have left; return counts by kind."""
    from django.utils import timezone

    from keyjobs.models import Event, Invocation, Runner
    from keyjobs.status import Status

    rng = random.Random(seed)
    now = timezone.now()
    start = now - timedelta(minutes=10)
    runners = [Runner.objects.create(host="bench", pid=1000 + n, threads=8) for n in range(2)]
    lanes = [(runner, thread) for runner in runners for thread in range(8)]
    free_at = dict.fromkeys(lanes, start)
    accounts = [f'{{"account_id":"account-{n}"}}' for n in range(60)]
    invocations: list[Invocation] = []
    plans: list[list[tuple[str, str, str, Any, Any, Any]]] = []
    made = {"runs": 0, "rerouted": 0, "dropped": 0, "reused": 0}
    for number in range(count):
        key = accounts[number % len(accounts)]
        created = start + timedelta(seconds=600 * number / count)
        kind = rng.random()
        history: list[tuple[str, str, str, Any, Any, Any]] = []
        if kind < 0.05:
            history.append((Event.Kind.TRANSITION, Status.REGISTERED, Status.CONCURRENCY_CONTROLLED_FINAL,
                            created + timedelta(milliseconds=5), runners[0], None))
            status, began, ended, lane = Status.CONCURRENCY_CONTROLLED_FINAL, None, created, None
            made["dropped"] += 1
        else:
            lane = min(lanes, key=lambda candidate: free_at[candidate])
            began = max(created, free_at[lane]) + timedelta(milliseconds=3)
            ended = began + timedelta(milliseconds=rng.randint(100, 1500))
            free_at[lane] = ended
            if kind < 0.15:
                history.append((Event.Kind.TRANSITION, Status.REGISTERED, Status.REROUTED,
                                created + timedelta(milliseconds=2), lane[0], None))
                history.append((Event.Kind.TRANSITION, Status.REROUTED, Status.REGISTERED,
                                began - timedelta(milliseconds=2), lane[0], None))
                made["rerouted"] += 1
            if kind > 0.95:
                history.append((Event.Kind.REUSED, Status.REGISTERED, Status.REGISTERED,
                                created + timedelta(milliseconds=1), None, None))
                made["reused"] += 1
            status = Status.FAILED if rng.random() < 0.03 else Status.SUCCESS
            history += [
                (Event.Kind.TRANSITION, Status.REGISTERED, Status.PENDING, began - timedelta(milliseconds=1),
                 lane[0], lane[1]),
                (Event.Kind.TRANSITION, Status.PENDING, Status.RUNNING, began, lane[0], lane[1]),
                (Event.Kind.TRANSITION, Status.RUNNING, status, ended, lane[0], lane[1]),
            ]
            made["runs"] += 1
        invocations.append(Invocation(
            task_name="bench.call", queue="default", args=[], kwargs={"account_id": key}, running_key=key,
            status=status, runner=lane[0] if lane else None, runner_thread=lane[1] if lane else None,
            created_at=created, started_at=began, finished_at=ended, attempts=1 if began else 0,
            error="boom" if status == Status.FAILED else "",
        ))
        plans.append(history)
    Invocation.objects.bulk_create(invocations, batch_size=2000)
    events = [
        Event(invocation=invocation, kind=kind, from_status=before, to_status=after, at=at, runner=runner,
              runner_thread=thread)
        for invocation, history in zip(invocations, plans, strict=True)
        for kind, before, after, at, runner, thread in history
    ]
    Event.objects.bulk_create(events, batch_size=5000)
    made["events"] = len(events)
    return made


def run(options: argparse.Namespace, name: str) -> int:
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client
    from django.urls import reverse

    began = time.perf_counter()
    made = fill(options.invocations, options.seed)
    print(f"database: {connection.vendor} {name}")
    print(f"wrote {options.invocations} invocations, {made['events']} events ({made['runs']} runs, "
          f"{made['rerouted']} parked, {made['dropped']} dropped, {made['reused']} deduplicated) "
          f"in {time.perf_counter() - began:.1f}s")
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    staff = get_user_model().objects.create_superuser("bench", "bench@example.com", "bench")
    client = Client()
    client.force_login(staff)

    def timed(url: str) -> tuple[list[float], Any]:
        client.get(url)  # warm: imports, caches, the session
        times, response = [], None
        for _ in range(options.requests):
            start = time.perf_counter()
            response = client.get(url)
            times.append((time.perf_counter() - start) * 1000)
            assert response.status_code == 200, response.status_code
        return times, response

    times, response = timed(reverse("admin:keyjobs_invocation_timeline_data") + "?minutes=15")
    data = response.json()
    print(f"timeline data, last 15 minutes: {len(data['runs'])} runs, {len(data['markers'])} markers, "
          f"{len(data['lanes']['thread'])} thread lanes, {len(data['lanes']['key'])} key lanes, "
          f"{len(response.content) / 1e6:.1f} MB, truncated={data['truncated']}")
    print(f"  server time: median {statistics.median(times):.0f} ms (min {min(times):.0f}, max {max(times):.0f}, "
          f"{options.requests} requests)")
    page_times, _ = timed(reverse("admin:keyjobs_invocation_timeline") + "?minutes=15")
    print(f"timeline page (the same data, bootstrapped): median {statistics.median(page_times):.0f} ms")
    for title, url in (("dashboard", reverse("admin:keyjobs_invocation_dashboard")),
                       ("invocation list", reverse("admin:keyjobs_invocation_changelist"))):
        other, _ = timed(url)
        print(f"{title}: median {statistics.median(other):.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
