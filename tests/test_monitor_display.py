"""How the admin and the monitor show values: badges, labels, durations, links and times."""

from datetime import UTC, datetime, timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from keyjobs.models import Event, Invocation, Runner
from keyjobs.monitor.display import (
    MARKER_COLOURS,
    RUNNER_COLOURS,
    STATUS_COLOURS,
    attempts,
    call_of,
    change_label,
    chart,
    durations,
    epoch_ms,
    format_duration,
    invocation_row,
    key_url,
    label_of,
    moment,
    monitor_links,
    natural,
    nice_ceiling,
    runner_badge,
    short_task,
    slots_in_use,
    status_badge,
    throughput_bars,
)
from keyjobs.status import Status
from tests.factories import InvocationFactory, RunnerFactory

ACME = '{"account_id":"acme"}'
XSS = '<script>alert("x")</script>'


def test_every_status_every_marker_and_every_runner_state_has_a_colour() -> None:
    assert set(STATUS_COLOURS) == set(Status.values)
    assert set(MARKER_COLOURS) == {"rerouted", "dropped", "reused", "debounced", "cancelled", "tick"}
    assert set(RUNNER_COLOURS) == set(Runner.State.values)


def test_a_status_badge_is_its_label_on_its_colour() -> None:
    colour = STATUS_COLOURS[Status.FAILED]
    assert status_badge(Status.FAILED) == f'<span class="kj-badge" style="background:{colour}">Failed</span>'


def test_a_status_that_is_not_one_is_shown_as_text() -> None:
    assert status_badge(XSS) == (
        '<span class="kj-badge" style="background:#444">&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;</span>'
    )


def test_a_gone_runners_badge_says_how_long_it_has_been_silent() -> None:
    badge = runner_badge(Runner.State.GONE, timezone.now() - timedelta(hours=1))
    assert badge.endswith(">gone</span> no heartbeat for 1\xa0hour")


def test_a_lost_runners_badge_says_its_work_was_recovered() -> None:
    assert runner_badge(Runner.State.LOST, timezone.now()).endswith(">lost</span> its work was recovered")


def test_a_runners_stop_reason_follows_its_badge_as_text() -> None:
    badge = runner_badge(Runner.State.STOPPED, timezone.now(), f"thread 2 could not go on: {XSS}")
    assert badge.endswith('>stopped</span> <span class="kj-error">thread 2 could not go on: &lt;script&gt;alert('
                          '&quot;x&quot;)&lt;/script&gt;</span>')


@pytest.mark.parametrize("seconds, expected", [
    (0.4123, "412 ms"), (2.5, "2.500 s"), (59.994, "59.994 s"), (184, "3 min 04 s"), (3900, "1 h 05 min"),
])
def test_durations_read_in_seconds_minutes_or_hours(seconds: float, expected: str) -> None:
    assert format_duration(timedelta(seconds=seconds)) == expected


def test_times_are_handed_to_page_scripts_in_epoch_milliseconds() -> None:
    assert epoch_ms(datetime(2030, 1, 1, tzinfo=UTC) + timedelta(milliseconds=1.6)) == 1893456000002
    assert epoch_ms(None) is None


def test_a_stored_key_reads_as_its_label_and_anything_else_as_itself() -> None:
    assert label_of(ACME) == "acme"
    assert label_of("typed by hand") == "typed by hand"


def test_a_task_is_named_by_the_last_part_of_its_path() -> None:
    assert short_task("demo_project.tasks.call_keyed") == "call_keyed"
    assert short_task("plain") == "plain"


def test_the_key_url_carries_the_task_and_the_stored_key() -> None:
    assert key_url("tests.jobs.keyed", ACME) == (
        f"{reverse('admin:keyjobs_invocation_key')}?task=tests.jobs.keyed&key=%7B%22account_id%22%3A%22acme%22%7D"
    )


def test_the_monitor_links_its_pages_and_the_admin_lists() -> None:
    assert [title for title, _ in monitor_links()] == ["Dashboard", "Timeline", "Invocations", "Runners", "Schedules",
                                                    "Tasks", "Keys", "Logs"]
    assert dict(monitor_links())["Runners"] == reverse("admin:keyjobs_runner_changelist")


def test_throughput_bars_are_scaled_to_the_busiest_minute() -> None:
    minute = datetime(2030, 1, 1, tzinfo=UTC)
    bars = throughput_bars([(minute, 2), (minute + timedelta(minutes=1), 8), (minute + timedelta(minutes=2), 0)])
    assert [(bar["count"], bar["height"], bar["x"], bar["y"]) for bar in bars] == [
        (2, 16, 2, 50), (8, 64, 22, 2), (0, 0, 42, 66),
    ]


def test_no_throughput_draws_flat_bars() -> None:
    assert [bar["height"] for bar in throughput_bars([(datetime(2030, 1, 1, tzinfo=UTC), 0)])] == [0]


@pytest.mark.django_db
def test_a_key_view_row_shows_arguments_as_json_the_duration_and_the_runner() -> None:
    runner, now = RunnerFactory(host="box", pid=7), timezone.now()
    invocation = InvocationFactory(args=["acme", 3], kwargs={"op": "fetch"}, runner=runner, runner_thread=2,
                                   status=Status.SUCCESS, started_at=now - timedelta(seconds=1.5), finished_at=now)

    row = invocation_row(invocation, "/x/")

    assert (row["arguments"], row["duration"], row["runner"], row["url"]) == (
        '"acme", 3, op="fetch"', "1.500 s", "box:7 · thread 2", "/x/",
    )
    assert row["badge"] == status_badge(Status.SUCCESS)


@pytest.mark.django_db
def test_a_key_view_row_of_an_invocation_that_never_ran_has_no_duration_and_no_runner() -> None:
    row = invocation_row(InvocationFactory(), "/x/")
    assert (row["duration"], row["runner"]) == ("–", "–")


def test_slots_in_use_read_as_a_count_of_the_limit():
    assert slots_in_use(2, 3) == "2 of 3 slots in use"
    assert slots_in_use(0, 1) == "0 of 1 slot in use"


T0 = datetime(2030, 1, 1, 5, 8, 3, 412_000, tzinfo=UTC)


def test_times_read_to_the_millisecond_in_the_sites_time_zone(settings) -> None:
    assert moment(T0) == "2030-01-01 05:08:03.412"
    assert moment(None) == "–"


def test_numbers_in_names_sort_by_value() -> None:
    assert sorted(["acme10", "acme2", "Acme3", "acme1"], key=natural) == ["acme1", "acme2", "Acme3", "acme10"]


def test_a_call_reads_with_its_arguments_keyed_or_not() -> None:
    invocation = Invocation(task_name="demo_project.tasks.call_unsafe", args=["acme", 3], kwargs={"op": "x"})
    assert call_of(invocation) == 'call_unsafe("acme", 3, op="x")'
    assert call_of(Invocation(task_name="t.f", args=["x" * 100]), limit=10) == 'f("xxxxxxxx…)'


def test_an_invocation_reads_as_queued_ran_and_total() -> None:
    invocation = Invocation(status="SUCCESS", created_at=T0, started_at=T0 + timedelta(milliseconds=250),
                            finished_at=T0 + timedelta(seconds=1.5))
    assert durations(invocation, T0) == {"queued": "250 ms", "ran": "1.250 s", "total": "1.500 s"}
    waiting = Invocation(status="REGISTERED", created_at=T0)
    assert durations(waiting, T0 + timedelta(seconds=2)) == {"queued": "2.000 s so far", "ran": "–", "total": "–"}


def test_a_history_row_reads_as_words_not_status_names() -> None:
    assert change_label("TRANSITION", "REGISTERED", "CONCURRENCY_CONTROLLED_FINAL") == (
        "Registered → Dropped by concurrency control")
    assert change_label("TRANSITION", "", "REROUTED") == "Created → Rerouted"
    assert change_label("DEBOUNCED", "REGISTERED", "REGISTERED") == "Merged by debounce"


def event(kind: str, came: str, went: str, seconds: float, note: str = "") -> Event:
    return Event(kind=kind, from_status=came, to_status=went, at=T0 + timedelta(seconds=seconds), note=note)


def test_every_attempt_keeps_its_own_error_in_order_and_a_pause_stays_in_its_attempt() -> None:
    invocation = Invocation(status="FAILED", error="KeyError: 'b'", error_type="builtins.KeyError",
                            traceback="Traceback\nKeyError: 'b'")
    history = [
        event("TRANSITION", "PENDING", "RUNNING", 1), event("TRANSITION", "RUNNING", "RETRY", 2),
        event("ERROR", "RETRY", "RETRY", 2, "builtins.ValueError\nTraceback\nValueError: a"),
        event("TRANSITION", "RETRY", "REGISTERED", 3), event("TRANSITION", "PENDING", "RUNNING", 4),
        event("TRANSITION", "RUNNING", "PAUSED", 5), event("TRANSITION", "PAUSED", "RUNNING", 6),
        event("TRANSITION", "RUNNING", "FAILED", 7),
    ]

    first, second = attempts(invocation, history)

    assert (first.number, first.outcome, first.error_type, first.message) == (1, "RETRY", "builtins.ValueError",
                                                                              "ValueError: a")
    assert (second.number, second.outcome, second.message, second.ended) == (2, "FAILED", "KeyError: 'b'",
                                                                             T0 + timedelta(seconds=7))
    assert second.pauses == [(T0 + timedelta(seconds=5), T0 + timedelta(seconds=6))]


def test_a_failure_retried_by_hand_stays_with_its_attempt() -> None:
    # What a retry by hand leaves: the failed attempt's ERROR row, then the new attempt.
    invocation = Invocation(status="SUCCESS")
    history = [
        event("TRANSITION", "PENDING", "RUNNING", 1), event("TRANSITION", "RUNNING", "FAILED", 2),
        event("ERROR", "FAILED", "FAILED", 3, "builtins.ValueError\nValueError: first"),
        event("TRANSITION", "FAILED", "REGISTERED", 3), event("TRANSITION", "PENDING", "RUNNING", 4),
        event("TRANSITION", "RUNNING", "SUCCESS", 5),
    ]
    first, second = attempts(invocation, history)
    assert (first.outcome, first.message, second.outcome, second.error) == ("FAILED", "ValueError: first", "SUCCESS",
                                                                           "")


def test_an_axis_tops_at_the_next_round_number() -> None:
    assert [nice_ceiling(value) for value in (0, 0.3, 7, 12, 20, 4_100)] == [1, 0.5, 10, 20, 20, 5_000]


def test_a_chart_has_labelled_y_ticks_and_leaves_gaps_for_points_not_sampled() -> None:
    points = [(T0 + timedelta(minutes=n), value) for n, value in enumerate([3.0, None, 7.0])]
    drawn = chart(points)
    assert [tick["label"] for tick in drawn["y_ticks"]] == ["0", "5", "10"]
    assert [tick["label"] for tick in chart(points, unit="ms")["y_ticks"]] == ["0 ms", "5 ms", "10 ms"]
    assert [point["label"] for point in drawn["points"]] == ["3", "–", "7"]
    assert drawn["x_ticks"][0]["label"] == "05:08"
    assert len(chart(points, bars=False)["line"].split()) == 2
