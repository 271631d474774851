"""What the monitor's pages read: the timeline's runs, markers and lanes, the dashboard, a key's history."""

from datetime import datetime, timedelta
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from keyjobs.models import Event, Invocation, RateToken, Runner, TaskTotal
from keyjobs.monitor.queries import FINISHED_COUNTERS, Window, dashboard, key_history, timeline, timeline_events
from keyjobs.status import OWNED, WAITING, Status
from tests.factories import EventFactory, InvocationFactory, RunnerFactory, give_dashboard_load, give_run, give_runs

pytestmark = pytest.mark.django_db

ACME = '{"account_id":"acme"}'
GLOBEX = '{"account_id":"globex"}'


def window(minutes: int = 15, now: datetime | None = None) -> Window:
    return Window.last(minutes, now or timezone.now())


def ms(moment: datetime) -> int:
    return round(moment.timestamp() * 1000)


# -- the timeline -------------------------------------------------------------------------


def test_a_run_is_a_bar_from_its_running_event_to_its_next_status_change() -> None:
    runner, now = RunnerFactory(), timezone.now()
    start, end = now - timedelta(seconds=30), now - timedelta(seconds=28)
    invocation = give_run(InvocationFactory(running_key=ACME, task_name="tests.jobs.keyed"),
                          runner=runner, thread=2, start=start, end=end, status=Status.FAILED)

    data = timeline(window(now=now), now=now)

    [run] = data["runs"]
    assert (run["id"], run["start"], run["end"], run["status"]) == (invocation.pk, ms(start), ms(end), "FAILED")
    assert data["lanes"]["thread"][run["thread_lane"]] == {
        "id": f"{runner.pk}/2", "label": f"test-host:{runner.pid} · thread 2", "runner": runner.pk, "thread": 2,
    }
    assert data["lanes"]["key"][run["key_lane"]]["label"] == "keyed · acme"
    assert data["lanes"]["key"][run["key_lane"]]["raw_key"] == ACME


def test_runs_of_one_thread_share_a_lane_and_keys_have_lanes_of_their_own() -> None:
    runner, now = RunnerFactory(), timezone.now()
    for number, key in enumerate([ACME, GLOBEX, ACME]):
        start = now - timedelta(seconds=60 - 10 * number)
        give_run(InvocationFactory(running_key=key), runner=runner, thread=0, start=start,
                 end=start + timedelta(seconds=1))

    data = timeline(window(now=now), now=now)

    assert [lane["label"] for lane in data["lanes"]["thread"]] == [f"test-host:{runner.pid} · thread 0"]
    assert [lane["key"] for lane in data["lanes"]["key"]] == ["acme", "globex"]
    by_key = [data["lanes"]["key"][run["key_lane"]]["key"] for run in data["runs"]]
    assert sorted(by_key) == ["acme", "acme", "globex"]


def test_key_lanes_are_grouped_by_task_the_earliest_task_first() -> None:
    runner, now = RunnerFactory(), timezone.now()
    for seconds, task_name, key in [(50, "tests.jobs.z_first", GLOBEX), (40, "tests.jobs.a_second", ACME),
                                    (30, "tests.jobs.z_first", ACME), (20, "tests.jobs.a_second", None)]:
        start = now - timedelta(seconds=seconds)
        give_run(InvocationFactory(task_name=task_name, running_key=key), runner=runner, thread=0, start=start,
                 end=start + timedelta(seconds=1))

    labels = [lane["label"] for lane in timeline(window(now=now), now=now)["lanes"]["key"]]

    assert labels == ["z_first · acme", "z_first · globex", "a_second · acme", "a_second · no key"]


def test_key_lanes_sort_the_numbers_in_keys_by_value() -> None:
    runner, now = RunnerFactory(), timezone.now()
    for number, account in enumerate(["acme10", "acme2", "Acme3", "acme1"]):
        start = now - timedelta(seconds=50 - number)
        give_run(InvocationFactory(running_key=f'{{"account_id":"{account}"}}'), runner=runner, thread=0,
                 start=start, end=start + timedelta(milliseconds=500))

    keys = [lane["key"] for lane in timeline(window(now=now), now=now)["lanes"]["key"]]

    assert keys == ["acme1", "acme2", "Acme3", "acme10"]


def test_a_run_still_going_has_no_end_and_the_data_says_work_is_active() -> None:
    now = timezone.now()
    give_run(InvocationFactory(running_key=ACME), runner=RunnerFactory(), thread=0,
             start=now - timedelta(seconds=5))

    data = timeline(window(now=now), now=now)

    assert [(run["status"], run["end"]) for run in data["runs"]] == [("RUNNING", None)]
    assert data["active"] is True


def test_the_data_says_no_work_is_active_when_everything_is_final() -> None:
    now = timezone.now()
    give_run(InvocationFactory(), runner=RunnerFactory(), thread=0, start=now - timedelta(seconds=5), end=now)
    assert timeline(window(now=now), now=now)["active"] is False


def test_a_run_that_began_before_the_window_starts_at_its_started_at() -> None:
    now = timezone.now()
    start, end = now - timedelta(minutes=20), now - timedelta(minutes=10)
    give_run(InvocationFactory(), runner=RunnerFactory(), thread=0, start=start, end=end)

    [run] = timeline(window(15, now), now=now)["runs"]

    assert (run["start"], run["end"]) == (ms(start), ms(end))


def test_a_run_still_going_that_began_before_the_window_is_shown() -> None:
    now = timezone.now()
    invocation = give_run(InvocationFactory(), runner=RunnerFactory(), thread=1, start=now - timedelta(hours=1))

    [run] = timeline(window(15, now), now=now)["runs"]

    assert (run["id"], run["end"], run["status"]) == (invocation.pk, None, "RUNNING")


def test_a_run_of_a_past_window_that_ended_after_it_gets_its_end() -> None:
    now = timezone.now()
    start, end = now - timedelta(minutes=30), now - timedelta(minutes=5)
    give_run(InvocationFactory(), runner=RunnerFactory(), thread=0, start=start, end=end)
    past = Window(now - timedelta(minutes=40), now - timedelta(minutes=20))

    [run] = timeline(past, now=now)["runs"]

    assert (run["start"], run["end"], run["status"]) == (ms(start), ms(end), "SUCCESS")


def test_an_invocation_run_twice_shows_two_bars() -> None:
    runner, now = RunnerFactory(), timezone.now()
    invocation = InvocationFactory()
    give_run(invocation, runner=runner, thread=0, start=now - timedelta(seconds=50),
             end=now - timedelta(seconds=49), status=Status.RETRY)
    EventFactory(invocation=invocation, from_status=Status.RETRY, to_status=Status.REGISTERED,
                 at=now - timedelta(seconds=45))
    invocation.status = Status.REGISTERED
    give_run(invocation, runner=runner, thread=3, start=now - timedelta(seconds=40),
             end=now - timedelta(seconds=39))

    runs = timeline(window(now=now), now=now)["runs"]

    assert [(run["id"], run["status"]) for run in runs] == [(invocation.pk, "RETRY"), (invocation.pk, "SUCCESS")]


def test_rerouted_dropped_and_deduplicated_invocations_are_markers() -> None:
    now = timezone.now()
    parked, dropped, merged = (InvocationFactory(running_key=ACME) for _ in range(3))
    EventFactory(invocation=parked, from_status=Status.REGISTERED, to_status=Status.REROUTED,
                 at=now - timedelta(seconds=3))
    EventFactory(invocation=dropped, from_status=Status.REGISTERED, to_status=Status.CONCURRENCY_CONTROLLED_FINAL,
                 at=now - timedelta(seconds=2))
    EventFactory(invocation=merged, kind=Event.Kind.REUSED, from_status=Status.REGISTERED,
                 to_status=Status.REGISTERED, at=now - timedelta(seconds=1))

    data = timeline(window(now=now), now=now)

    assert [(marker["id"], marker["kind"]) for marker in data["markers"]] == [
        (parked.pk, "rerouted"), (dropped.pk, "dropped"), (merged.pk, "reused"),
    ]
    assert {data["lanes"]["key"][marker["key_lane"]]["key"] for marker in data["markers"]} == {"acme"}
    assert data["runs"] == []


def test_debounced_merges_and_cancellations_before_a_run_are_markers() -> None:
    now = timezone.now()
    debounced, cancelled = (InvocationFactory(running_key=ACME) for _ in range(2))
    EventFactory(invocation=debounced, kind=Event.Kind.DEBOUNCED, from_status=Status.REGISTERED,
                 to_status=Status.REGISTERED, at=now - timedelta(seconds=2))
    EventFactory(invocation=cancelled, from_status=Status.REROUTED, to_status=Status.CANCELLED,
                 at=now - timedelta(seconds=1))

    data = timeline(window(now=now), now=now)

    assert [(marker["id"], marker["kind"]) for marker in data["markers"]] == [
        (debounced.pk, "debounced"), (cancelled.pk, "cancelled"),
    ]


def test_a_run_cancelled_while_it_ran_is_a_bar_of_its_status() -> None:
    now = timezone.now()
    invocation = give_run(InvocationFactory(), runner=RunnerFactory(), thread=0, start=now - timedelta(seconds=9))
    EventFactory(invocation=invocation, from_status=Status.RUNNING, to_status=Status.CANCELLED,
                 at=now - timedelta(seconds=1))

    data = timeline(window(now=now), now=now)

    assert [(run["id"], run["status"]) for run in data["runs"]] == [(invocation.pk, "CANCELLED")]
    assert data["markers"] == []


def test_the_key_history_counts_the_starts_in_its_rate_window_and_lists_what_waits_for_later() -> None:
    rated = '{"account_id":"acme"}'
    now = timezone.now()
    RateToken.objects.bulk_create([
        RateToken(task_name="tests.jobs.rated", running_key=rated, number=0, used_at=now - timedelta(seconds=0.2)),
        RateToken(task_name="tests.jobs.rated", running_key=rated, number=1, used_at=now - timedelta(seconds=5)),
        RateToken(task_name="tests.jobs.rated", running_key=rated, number=2, used_at=None),
    ])
    later, sooner = (InvocationFactory(task_name="tests.jobs.rated", running_key=rated, status=Status.REGISTERED,
                                       run_after=now + timedelta(seconds=seconds)) for seconds in (60, 30))
    InvocationFactory(task_name="tests.jobs.rated", running_key=rated, status=Status.REGISTERED)

    history = key_history("tests.jobs.rated", rated)

    assert history.rate is not None
    assert (history.rate.limit, history.rate.starts, history.rate.count) == ("3/s", 1, 3)
    assert [invocation.pk for invocation in history.deferred] == [sooner.pk, later.pk]
    assert key_history("tests.jobs.keyed", ACME).rate is None


def test_events_that_change_no_status_are_neither_runs_nor_markers() -> None:
    now = timezone.now()
    invocation = give_run(InvocationFactory(), runner=RunnerFactory(), thread=0, start=now - timedelta(seconds=9),
                          end=now - timedelta(seconds=1))
    EventFactory(invocation=invocation, kind="OVERDUE", from_status=Status.RUNNING, to_status=Status.RUNNING,
                 at=now - timedelta(seconds=5))

    data = timeline(window(now=now), now=now)

    assert [(run["start"], run["end"]) for run in data["runs"]] == [
        (ms(now - timedelta(seconds=9)), ms(now - timedelta(seconds=1)))
    ]
    assert data["markers"] == []


def test_nothing_outside_the_window_is_read() -> None:
    now = timezone.now()
    give_run(InvocationFactory(), runner=RunnerFactory(), thread=0, start=now - timedelta(hours=2),
             end=now - timedelta(hours=2) + timedelta(seconds=1))
    assert timeline(window(15, now), now=now)["runs"] == []


def test_a_busy_window_is_cut_to_its_most_recent_events_and_says_so() -> None:
    runner, now = RunnerFactory(), timezone.now()
    for number in range(4):
        start = now - timedelta(seconds=50 - 10 * number)
        give_run(InvocationFactory(), runner=runner, thread=0, start=start, end=start + timedelta(seconds=1))

    data = timeline(window(now=now), now=now, limit=4)

    assert data["truncated"] is True
    assert [run["start"] for run in data["runs"]] == [ms(now - timedelta(seconds=30)), ms(now - timedelta(seconds=20))]


def test_the_timeline_can_show_one_task_and_key() -> None:
    runner, now = RunnerFactory(), timezone.now()
    mine = give_run(InvocationFactory(task_name="tests.jobs.keyed", running_key=ACME), runner=runner, thread=0,
                    start=now - timedelta(seconds=9), end=now - timedelta(seconds=8))
    for task_name, key in [("tests.jobs.keyed", GLOBEX), ("tests.jobs.other", ACME)]:
        give_run(InvocationFactory(task_name=task_name, running_key=key), runner=runner, thread=1,
                 start=now - timedelta(seconds=7), end=now - timedelta(seconds=6))

    data = timeline(window(now=now), now=now, task="tests.jobs.keyed", key=ACME)

    assert [run["id"] for run in data["runs"]] == [mine.pk]


@pytest.mark.sqlite
def test_the_timeline_reads_its_events_through_the_index_on_at() -> None:
    explained = timeline_events(window()).explain()
    assert "keyjobs_event_at" in explained, explained


@pytest.mark.postgres
def test_the_timeline_query_uses_the_index_on_postgresql_even_when_a_scan_looks_cheap() -> None:
    # On a tiny table the planner prefers a scan; forbid it to see that the index can serve the query.
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
    explained = timeline_events(window()).explain()
    assert "keyjobs_event_at" in explained, explained


def test_the_timelines_events_are_read_without_their_invocations_table() -> None:
    # Joined, PostgreSQL hashed every invocation to meet a window's events (0.5 s of a million).
    sql = str(timeline_events(window()).query)
    assert "keyjobs_invocation" not in sql, sql
    assert "keyjobs_invocation" in str(timeline_events(window(), task="tests.jobs.keyed").query)


def test_the_timeline_reads_its_events_invocations_in_one_query_by_id(django_assert_num_queries) -> None:
    runner, now = RunnerFactory(), timezone.now()
    for number in range(40):
        give_run(InvocationFactory(running_key=ACME if number % 2 else GLOBEX, task_name="tests.jobs.keyed"),
                 runner=runner, thread=number % 4, start=now - timedelta(seconds=60 - number),
                 end=now - timedelta(seconds=59 - number))
    with CaptureQueriesContext(connection) as captured:
        data = timeline(window(now=now), now=now)
    by_id = [query["sql"] for query in captured.captured_queries
             if 'FROM "keyjobs_invocation" WHERE "id"' in query["sql"]]
    assert len(by_id) == 1, by_id
    assert sorted(data["lanes"]["key"][run["key_lane"]]["key"] for run in data["runs"]) == ["acme"] * 20 + ["globex"] * 20


@pytest.mark.postgres
def test_on_postgresql_the_timeline_passes_the_ids_of_its_invocations_as_one_array() -> None:
    now = timezone.now()
    give_runs(now)
    with CaptureQueriesContext(connection) as captured:
        timeline(window(now=now), now=now)
    [by_id] = [query["sql"] for query in captured.captured_queries
               if 'FROM "keyjobs_invocation" WHERE "id"' in query["sql"]]
    assert '"id" = ANY(' in by_id, by_id


def test_the_timeline_takes_the_same_queries_however_many_runs(django_assert_num_queries) -> None:
    now = timezone.now()
    give_runs(now)  # 30 finished, one still running
    # Events; their invocations; the schedules' ticks; runs still going; runners; whether any work is left.
    with django_assert_num_queries(6):
        data = timeline(window(now=now), now=now)
    assert len(data["runs"]) == 31


def test_a_past_window_reads_where_its_runs_began_and_ended_in_two_more_queries(django_assert_num_queries) -> None:
    runner, now = RunnerFactory(), timezone.now()
    for number in range(5):
        # Begun before the window and ended in it; begun in it and ended after it.
        give_run(InvocationFactory(), runner=runner, thread=0, start=now - timedelta(minutes=50 + number),
                 end=now - timedelta(minutes=35))
        give_run(InvocationFactory(), runner=runner, thread=1, start=now - timedelta(minutes=25 + number),
                 end=now - timedelta(minutes=5))
    past = Window(now - timedelta(minutes=40), now - timedelta(minutes=20))
    # Events; their invocations; the schedules' ticks; when the clipped runs began; when the open runs ended;
    # runners; whether any work is left.
    with django_assert_num_queries(7):
        runs = timeline(past, now=now)["runs"]
    assert all(run["start"] is not None and run["end"] is not None for run in runs) and len(runs) == 10


def test_window_reads_a_wall_clock_time_in_the_sites_time_zone() -> None:
    now = timezone.now()
    chosen = Window.from_query({"from": "2030-01-01T10:00", "to": "2030-01-01T11:00"}, now)
    assert chosen.start == datetime(2030, 1, 1, 10, tzinfo=timezone.get_current_timezone())
    assert not chosen.follows_now


@pytest.mark.parametrize("query", [
    {"minutes": "abc"}, {"minutes": "0"}, {"minutes": str(7 * 24 * 60 + 1)}, {"from": "yesterday"},
    {"from": "2030-01-02T00:00", "to": "2030-01-01T00:00"},
    {"from": "2020-01-01T00:00", "to": "2030-01-01T00:00"},
])
def test_window_refuses_parameters_that_make_no_window(query: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        Window.from_query(query, timezone.now())


def test_window_names_itself_again_as_query_parameters() -> None:
    now = timezone.now()
    assert Window.from_query({"minutes": "60"}, now).as_query() == {"minutes": "60"}
    since = now - timedelta(hours=2)
    assert Window.from_query({"from": since.isoformat(), "to": now.isoformat()}, now).as_query() == {
        "from": since.isoformat(), "to": now.isoformat(),
    }


# -- the dashboard ----------------------------------------------------------------------


def test_the_dashboard_counts_per_status_and_per_task() -> None:
    # What finished, as the rollup counted it; what waits, as it is now.
    TaskTotal.objects.create(task_name="tests.jobs.a", succeeded=2)
    TaskTotal.objects.create(task_name="tests.jobs.b", failed=1)
    InvocationFactory(status=Status.REGISTERED, task_name="tests.jobs.b")

    data = dashboard(now=timezone.now())

    assert data.per_status == {**dict.fromkeys(Status.values, 0), "SUCCESS": 2, "FAILED": 1, "REGISTERED": 1}
    assert list(data.per_task) == ["tests.jobs.a", "tests.jobs.b"]
    assert data.per_task["tests.jobs.a"]["SUCCESS"] == 2
    assert (data.per_task["tests.jobs.b"]["FAILED"], data.per_task["tests.jobs.b"]["REGISTERED"]) == (1, 1)
    assert data.active is True


def test_the_dashboard_says_nothing_is_active_when_everything_is_final() -> None:
    InvocationFactory(status=Status.SUCCESS)
    InvocationFactory(status=Status.CONCURRENCY_CONTROLLED_FINAL)
    assert dashboard(now=timezone.now()).active is False


def test_the_dashboard_counts_what_finished_in_each_of_the_last_minutes() -> None:
    now = timezone.now()
    InvocationFactory.create_batch(3, status=Status.SUCCESS, finished_at=now)
    InvocationFactory(status=Status.FAILED, finished_at=now - timedelta(minutes=2))
    InvocationFactory(status=Status.SUCCESS, finished_at=now - timedelta(hours=1))

    throughput = dashboard(now=now).throughput

    assert len(throughput) == 15
    assert throughput[-1] == (now.replace(second=0, microsecond=0), 3) and throughput[-3][1] == 1
    assert sum(count for _, count in throughput) == 4


def test_the_dashboard_lists_live_runners_with_what_they_run() -> None:
    alive = RunnerFactory()
    RunnerFactory(stopped_at=timezone.now())
    silent = RunnerFactory()
    Runner.objects.filter(pk=silent.pk).update(heartbeat_at=timezone.now() - timedelta(hours=1))
    give_run(InvocationFactory(), runner=alive, thread=0, start=timezone.now())

    runners = dashboard(now=timezone.now()).runners

    assert [(runner.pk, runner.running) for runner in runners] == [(alive.pk, 1)]


def test_the_dashboard_judges_runners_alive_by_the_databases_clock_not_the_callers() -> None:
    # The caller's clock says an hour has passed since the heartbeat; the database's says it just came.
    alive = RunnerFactory()
    assert [runner.pk for runner in dashboard(now=timezone.now() + timedelta(hours=1)).runners] == [alive.pk]


def test_the_dashboard_counts_a_runner_alive_for_one_lease_after_its_heartbeat(settings) -> None:
    runner = RunnerFactory()
    Runner.objects.filter(pk=runner.pk).update(heartbeat_at=timezone.now() - timedelta(minutes=10))
    settings.KEYJOBS_LEASE = 15 * 60
    assert [live.pk for live in dashboard(now=timezone.now()).runners] == [runner.pk]
    settings.KEYJOBS_LEASE = 5 * 60
    assert dashboard(now=timezone.now()).runners == []


def test_the_dashboard_names_the_busiest_keys_and_the_oldest_waiting_invocation() -> None:
    now = timezone.now()
    oldest = InvocationFactory(running_key=ACME, created_at=now - timedelta(minutes=5))
    InvocationFactory.create_batch(2, running_key=ACME, status=Status.SUCCESS)
    InvocationFactory(running_key=GLOBEX, status=Status.CONCURRENCY_CONTROLLED_FINAL)
    InvocationFactory(status=Status.REGISTERED)  # no key

    data = dashboard(now=now)

    assert [(busy.key, busy.total, busy.waiting, busy.dropped) for busy in data.busiest] == [
        ("acme", 3, 1, 0), ("globex", 1, 0, 1),
    ]
    assert data.oldest_waiting == oldest


def test_the_dashboard_counts_finished_invocations_from_the_rollup_not_from_their_rows() -> None:
    InvocationFactory.create_batch(3, status=Status.SUCCESS, task_name="tests.jobs.a")  # not rolled up yet
    InvocationFactory(status=Status.RUNNING, task_name="tests.jobs.a", runner=RunnerFactory())
    TaskTotal.objects.create(task_name="tests.jobs.a", succeeded=1000, failed=7, cancelled=2, dropped=5)
    TaskTotal.objects.create(task_name="tests.jobs.pruned", succeeded=4)

    data = dashboard(now=timezone.now())

    assert data.per_task["tests.jobs.a"] == {**dict.fromkeys(Status.values, 0), "SUCCESS": 1000, "FAILED": 7,
                                             "CANCELLED": 2, "CONCURRENCY_CONTROLLED_FINAL": 5, "RUNNING": 1}
    assert data.per_status["SUCCESS"] == 1004


def test_every_status_is_counted_on_the_dashboard_either_now_or_by_the_rollup() -> None:
    assert set(WAITING | OWNED) | set(FINISHED_COUNTERS) == set(Status)
    assert not set(WAITING | OWNED) & set(FINISHED_COUNTERS)


def test_no_query_of_the_dashboard_reads_every_invocation() -> None:
    give_dashboard_load()
    with CaptureQueriesContext(connection) as captured:
        dashboard(now=timezone.now())
    # Each one is bounded by status or by time, so that its index spares it the finished millions.
    read = [query["sql"] for query in captured.captured_queries if 'FROM "keyjobs_invocation"' in query["sql"]]
    assert read and all("WHERE" in sql for sql in read), read


def test_the_dashboard_takes_the_same_queries_however_many_invocations(django_assert_num_queries) -> None:
    give_dashboard_load()  # 20 finished over 4 tasks, 7 keys and 3 runners; one waiting
    # Waiting and owned per task and status; finished per task (the rollup); throughput; what runners own; live
    # runners; busiest keys; when the oldest waiting was created, and it; keys at their limit.
    with django_assert_num_queries(9):
        data = dashboard(now=timezone.now())
    assert len(data.runners) == 3 and len(data.busiest) == 10  # the ten busiest of 20 (task, key)


def test_the_dashboard_lists_the_keys_whose_every_slot_is_taken() -> None:
    runner = RunnerFactory()
    owned = {"task_name": "tests.jobs.keyed_two_slots", "status": Status.RUNNING, "runner": runner, "running_limit": 2}
    InvocationFactory(**owned, running_key=ACME, slot=0)
    InvocationFactory(**owned, running_key=ACME, slot=1)
    InvocationFactory(**owned, running_key=GLOBEX, slot=0)  # one slot of two: not at its limit
    InvocationFactory(task_name="tests.jobs.keyed", running_key=GLOBEX, status=Status.RUNNING, runner=runner)

    data = dashboard(now=timezone.now())

    assert [(full.task, full.key, full.in_use, full.limit) for full in data.at_limit] == [
        ("tests.jobs.keyed", "globex", 1, 1), ("tests.jobs.keyed_two_slots", "acme", 2, 2),
    ]


# -- the key view ----------------------------------------------------------------------


def test_the_key_view_knows_the_keys_limit_from_its_invocations() -> None:
    InvocationFactory(task_name="tests.jobs.keyed_two_slots", running_key=ACME, running_limit=2,
                      status=Status.RUNNING, runner=RunnerFactory())
    assert key_history("tests.jobs.keyed_two_slots", ACME).running_limit == 2
    assert key_history("tests.jobs.once_per_key", ACME).running_limit is None


def test_the_key_view_tells_what_ran_runs_waits_and_was_dropped() -> None:
    runner, now = RunnerFactory(), timezone.now()
    ran = give_run(InvocationFactory(task_name="tests.jobs.keyed", running_key=ACME), runner=runner, thread=0,
                   start=now - timedelta(seconds=9), end=now - timedelta(seconds=8))
    running = give_run(InvocationFactory(task_name="tests.jobs.keyed", running_key=ACME), runner=runner, thread=1,
                       start=now - timedelta(seconds=1))
    second = InvocationFactory(task_name="tests.jobs.keyed", running_key=ACME, status=Status.REROUTED)
    first = InvocationFactory(task_name="tests.jobs.keyed", running_key=ACME, status=Status.REGISTERED, priority=5)
    dropped = InvocationFactory(task_name="tests.jobs.keyed", running_key=ACME,
                                status=Status.CONCURRENCY_CONTROLLED_FINAL)
    InvocationFactory(task_name="tests.jobs.keyed", running_key=GLOBEX)
    InvocationFactory(task_name="tests.jobs.other", running_key=ACME)

    history = key_history("tests.jobs.keyed", ACME)

    assert history.ran == [ran] and history.running == [running] and history.dropped == [dropped]
    assert history.waiting == [first, second]


def test_the_key_view_finds_a_registration_key_too() -> None:
    merged = InvocationFactory(task_name="tests.jobs.once_per_key", registration_key=ACME)
    assert key_history("tests.jobs.once_per_key", ACME).waiting == [merged]


def test_invocations_outside_the_key_are_not_in_its_view() -> None:
    InvocationFactory(task_name="tests.jobs.keyed", running_key=GLOBEX, status=Status.SUCCESS)
    history = key_history("tests.jobs.keyed", ACME)
    assert not (history.ran or history.running or history.waiting or history.dropped)
    assert Invocation.objects.count() == 1


def test_the_key_view_reads_each_part_in_one_query_with_its_runners(django_assert_num_queries) -> None:
    runner = RunnerFactory()
    for status in [Status.SUCCESS] * 5 + [Status.REGISTERED, Status.CONCURRENCY_CONTROLLED_FINAL, Status.RUNNING]:
        InvocationFactory(task_name="tests.jobs.keyed", running_key=ACME, status=status, runner=runner)
    # Running, waiting, ran, dropped, deferred (a rate-limited task's window is one more); the key's control and
    # what operators did to it.
    with django_assert_num_queries(7):
        history = key_history("tests.jobs.keyed", ACME)
        assert {invocation.runner.host for invocation in history.ran + history.running} == {runner.host}


def test_the_dashboard_lists_a_supervisors_worker_processes_right_after_it() -> None:
    lone = RunnerFactory()
    supervisor = RunnerFactory(threads=0)
    other = RunnerFactory()
    child = RunnerFactory(supervisor=supervisor)
    runners = dashboard(now=timezone.now()).runners
    assert [runner.pk for runner in runners] == [lone.pk, supervisor.pk, child.pk, other.pk]
    assert runners[1].is_supervisor and runners[2].supervisor == supervisor.pk


def test_a_paused_stretch_stays_on_its_runs_bar_and_the_run_names_its_parent() -> None:
    runner, now = RunnerFactory(), timezone.now()
    start, end = now - timedelta(seconds=30), now - timedelta(seconds=20)
    paused, resumed = now - timedelta(seconds=28), now - timedelta(seconds=24)
    parent = InvocationFactory()
    invocation = give_run(InvocationFactory(parent=parent), runner=runner, thread=0, start=start)
    EventFactory(invocation=invocation, from_status=Status.RUNNING, to_status=Status.PAUSED, at=paused, runner=runner)
    EventFactory(invocation=invocation, from_status=Status.PAUSED, to_status=Status.RUNNING, at=resumed, runner=runner)
    EventFactory(invocation=invocation, from_status=Status.RUNNING, to_status=Status.SUCCESS, at=end, runner=runner)

    [run] = timeline(window(now=now), now=now)["runs"]

    assert (run["start"], run["end"], run["status"]) == (ms(start), ms(end), "SUCCESS")
    assert run["pauses"] == [[ms(paused), ms(resumed)]]
    assert run["parent"] == parent.pk


def test_a_run_paused_now_is_still_going_with_an_open_pause() -> None:
    runner, now = RunnerFactory(), timezone.now()
    start, paused = now - timedelta(seconds=30), now - timedelta(seconds=28)
    invocation = give_run(InvocationFactory(), runner=runner, thread=0, start=start)
    EventFactory(invocation=invocation, from_status=Status.RUNNING, to_status=Status.PAUSED, at=paused, runner=runner)
    Invocation.objects.filter(pk=invocation.pk).update(status=Status.PAUSED)

    data = timeline(window(now=now), now=now)

    [run] = data["runs"]
    assert (run["start"], run["end"], run["pauses"]) == (ms(start), None, [[ms(paused), None]])
    assert data["active"]


def test_a_run_paused_since_before_the_window_is_shown_paused_from_its_start() -> None:
    runner, now = RunnerFactory(), timezone.now()
    invocation = give_run(InvocationFactory(), runner=runner, thread=0, start=now - timedelta(hours=1))
    Invocation.objects.filter(pk=invocation.pk).update(status=Status.PAUSED)

    data = timeline(window(now=now), now=now)

    [run] = data["runs"]
    assert run["end"] is None and run["pauses"] == [[data["start"], None]]


def test_a_quantile_is_read_within_its_bucket_as_prometheus_does() -> None:
    from keyjobs.monitor.queries import quantile

    counts = [0] * 16
    counts[5] = 10  # ten runs of 100 to 250 ms
    assert quantile(counts, 0.5) == 175.0
    assert quantile(counts, 1.0) == 250.0
    counts[15] = 10  # and ten of more than 900 s
    assert quantile(counts, 0.99) == 900_000.0
    assert quantile([0] * 16, 0.5) is None


def test_a_window_of_20000_invocations_is_sent_as_counts_under_500_kb() -> None:
    import json

    from keyjobs.monitor.queries import BAND_CELLS, BAND_STEPS, KEY_LANES
    from tests.factories import give_busy_window

    now = timezone.now()
    give_busy_window(20_000, now=now)

    data = timeline(window(15, now), now=now)
    size = len(json.dumps(data, separators=(",", ":")))

    assert size < 500_000, size
    assert data["aggregated"] and not data["runs"] and not data["truncated"]
    assert len(data["lanes"]["key"]) <= KEY_LANES and data["folded_keys"] > 0
    # Nothing dropped: every marker counted once, and every run in at least one step of its thread's lane.
    kinds = data["band_kinds"]
    counted = {kind: sum(count for _, _, index, count in data["marker_bands"] if kinds[index] == kind)
               for kind in kinds}
    assert counted == {"dropped": 400, "rerouted": 2_000}
    assert sum(count for _, _, _, count in data["bands"]["thread"]) >= 19_600
    assert all(0 <= step < BAND_STEPS for _, step, _, _ in data["bands"]["key"])
    assert len(data["bands"]["thread"]) + len(data["bands"]["key"]) + len(data["marker_bands"]) <= BAND_CELLS


def test_counts_past_their_budget_are_made_over_longer_steps_and_lose_nothing(monkeypatch) -> None:
    from keyjobs.monitor import queries

    # 6,000 one-second runs on 40 threads and 6,000 markers on 300 keys, over 10 minutes.
    start = 1_000_000
    runs = [{"id": n, "start": start + n * 100, "end": start + n * 100 + 1000, "status": "SUCCESS",
             "thread_lane": n % 40, "key_lane": n % 300, "pauses": [], "parent": None} for n in range(6000)]
    markers = [{"id": n, "at": start + n * 100 + 50, "key_lane": n % 300, "kind": "rerouted"} for n in range(6000)]

    def condensed(cells: int) -> dict[str, Any]:
        monkeypatch.setattr(queries, "BAND_CELLS", cells)
        return queries.condense({"start": start, "end": start + 600_000, "now": start + 700_000, "runs": list(runs),
                                 "markers": list(markers)})  # type: ignore[typeddict-item]

    roomy, tight = condensed(10**9), condensed(5_000)
    assert roomy["step_ms"] == 750 and tight["step_ms"] > roomy["step_ms"]
    for data in (roomy, tight):
        assert sum(count for *_, count in data["marker_bands"]) == 6000
        # Every run in at least one step, and in no more steps than it overlaps.
        assert 6000 <= sum(count for *_, count in data["bands"]["thread"]) <= 6000 * (1000 // data["step_ms"] + 2)
    assert len(tight["bands"]["thread"]) + len(tight["bands"]["key"]) + len(tight["marker_bands"]) <= 5_000


def test_a_window_of_more_keys_than_lanes_labels_only_the_lanes_it_sends(monkeypatch) -> None:
    from keyjobs.monitor import queries

    monkeypatch.setattr(queries, "KEY_LANES", 30)  # 10 kept, the others share a lane per task
    labelled: list[str | None] = []
    label = queries.key_label

    def counted(key: str | None) -> str:
        labelled.append(key)
        return label(key)

    monkeypatch.setattr(queries, "key_label", counted)
    runner, now = RunnerFactory(), timezone.now()
    for number in range(50):
        key = f'{{"account_id":"acme{number}"}}'
        for repeat in range(2 if number < 10 else 1):  # the first ten keys busier
            start = now - timedelta(seconds=100 - number, milliseconds=300 * repeat)
            give_run(InvocationFactory(task_name="tests.jobs.keyed", running_key=key), runner=runner, thread=0,
                     start=start, end=start + timedelta(milliseconds=100))

    data = timeline(window(now=now), now=now)

    lanes = data["lanes"]["key"]
    assert data["folded_keys"] == 40 and len(lanes) == 11
    assert len(labelled) == 10  # not 50
    assert [lane["label"] for lane in lanes][-1] == "keyed · other keys"
    assert sum(1 for run in data["runs"] if lanes[run["key_lane"]]["key"] == "") == 40


def test_a_short_window_of_a_busy_period_is_sent_run_by_run() -> None:
    from tests.factories import give_busy_window

    now = timezone.now()
    give_busy_window(20_000, now=now)

    data = timeline(Window(now - timedelta(seconds=20), now), now=now)

    assert not data["aggregated"] and 400 < len(data["runs"]) < 500


def test_the_dashboard_finds_the_oldest_waiting_invocation_stamped_by_the_databases_clock() -> None:
    # Created with the database's own NOW() (SQLite writes three decimals where Django writes six).
    first = Invocation.objects.create(task_name="tests.jobs.add", queue="default")
    Invocation.objects.create(task_name="tests.jobs.add", queue="default")
    assert dashboard(now=timezone.now()).oldest_waiting == first
