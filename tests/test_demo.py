"""The demo: its tasks, its four scenarios on real workers, and its two commands.

The scenarios run on a real ``runworker`` process of 8 threads against an
in-process provider, as ``manage.py demo`` runs them, with a shorter hold.
"""

import io
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import django
import httpx
import pytest
from django.core.management import call_command, execute_from_command_line
from django.core.management.base import CommandError
from django.db import connection
from django.test import override_settings

from demo_project import scenarios, tasks
from demo_project.provider import Provider
from demo_project.scenarios import SCENARIOS, Load, ProviderClient, Summary
from keyjobs import Status
from keyjobs.admission import Rate
from keyjobs.models import Runner

ROOT = Path(__file__).resolve().parent.parent
# Long enough that unsafe calls released together overlap, and that C's
# runners decide every blocked call while the first of its account still runs.
HOLD = 0.25
THREADS = 8

T = TypeVar("T")


@pytest.fixture
def provider() -> Iterator[Provider]:
    with Provider(hold=HOLD, quiet=True) as running:
        yield running


@pytest.fixture
def client(provider: Provider) -> Iterator[ProviderClient]:
    assert provider.url is not None
    with ProviderClient(provider.url) as opened:
        yield opened


@pytest.fixture
def workers(worker_process: Any, provider: Provider) -> None:
    """Start a runworker of 8 threads that calls ``provider``; return once it has registered."""
    process = worker_process("--threads", str(THREADS), env={"PROVIDER_URL": provider.url})
    deadline = time.monotonic() + 30
    while not Runner.objects.active().exists():
        assert process.process.poll() is None, f"runworker exited:\n{process.process.communicate()[0]}"
        assert time.monotonic() < deadline, "runworker did not register within 30s"
        time.sleep(0.05)


def run(letter: str, client: ProviderClient, *, through: str | None = None) -> Summary:
    """Run scenario ``letter`` on the worker; ``through="django"`` enqueues it through django.tasks."""
    scenario = SCENARIOS[letter] if through is None else SCENARIOS[letter].through(through)
    return scenarios.run(scenario, client, hold=HOLD, threads=THREADS, timeout=30)


def assert_keyed_b_ran_all_without_collisions(summary: Summary) -> None:
    """Scenario B's outcome, whichever way it was enqueued: 12 calls, none colliding, 4 per account."""
    assert (summary.calls, summary.collisions, summary.unfinished) == (12, 0, 0)
    assert summary.statuses == {Status.SUCCESS: 12}
    assert [(account.name, account.calls) for account in summary.accounts] == [("acme", 4), ("globex", 4), ("initech", 4)]


# -- the scenarios on a real worker ---------------------------------------------


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_unsafe_calls_collide(workers: None, client: ProviderClient) -> None:
    summary = run("A", client)

    assert (summary.enqueued, summary.calls, summary.unfinished) == (12, 12, 0)
    assert summary.collisions > 0
    # A collision is a 429, which fails the invocation that met it.
    assert summary.statuses.get(Status.FAILED) == summary.collisions
    assert summary.ok


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_b_keyed_calls_never_collide_and_all_run(workers: None, client: ProviderClient) -> None:
    summary = run("B", client)

    assert_keyed_b_ran_all_without_collisions(summary)
    assert summary.seconds is not None and summary.seconds >= summary.limit == pytest.approx(4 * HOLD)
    assert summary.ok


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
@pytest.mark.django_tasks
def test_b_through_django_tasks_never_collides_and_all_run(workers: None, client: ProviderClient) -> None:
    summary = run("B", client, through="django")

    assert summary.scenario.title == "B. keyed (through django.tasks) — running_concurrency=KEYS, reroute=True"
    assert_keyed_b_ran_all_without_collisions(summary)
    assert summary.ok


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
@pytest.mark.django_tasks
def test_d_through_django_tasks_tells_merged_enqueues_apart(workers: None, client: ProviderClient) -> None:
    summary = run("D", client, through="django")

    assert (summary.enqueued, summary.calls, summary.collisions, summary.deduplicated) == (24, 3, 0, 21)


def test_api_django_refuses_a_scenario_without_a_django_tasks_task() -> None:
    message = "scenario A has no django.tasks task" if django.VERSION >= (6, 1) else "--api django needs Django 6.1"
    with pytest.raises(CommandError, match=message):
        call_command("enqueue", "A", "--api", "django")


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_c_keyed_dropping_runs_one_call_per_account_and_drops_the_rest(workers: None, client: ProviderClient) -> None:
    summary = run("C", client)

    assert (summary.calls, summary.collisions, summary.dropped) == (3, 0, 9)
    assert summary.statuses == {Status.SUCCESS: 3, Status.CONCURRENCY_CONTROLLED_FINAL: 9}
    assert {(account.name, account.calls, account.dropped) for account in summary.accounts} == {
        ("acme", 1, 3), ("globex", 1, 3), ("initech", 1, 3),
    }


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_d_refresh_once_makes_exactly_one_call_per_account(workers: None, client: ProviderClient) -> None:
    summary = run("D", client)

    assert (summary.enqueued, summary.calls, summary.collisions, summary.deduplicated) == (24, 3, 0, 21)
    assert summary.statuses == {Status.SUCCESS: 3}
    assert {(account.name, account.calls, account.deduplicated) for account in summary.accounts} == {
        ("acme", 1, 7), ("globex", 1, 7), ("initech", 1, 7),
    }


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_f_rate_limited_calls_never_start_more_than_the_rate_in_a_window(workers: None, client: ProviderClient) -> None:
    summary = run("F", client)

    assert (summary.enqueued, summary.calls, summary.collisions) == (24, 24, 0)
    assert summary.statuses == {Status.SUCCESS: 24}
    assert {(account.name, account.calls) for account in summary.accounts} == {
        ("acme", 8), ("globex", 8), ("initech", 8)}
    assert all(account.busiest_window == 2 for account in summary.accounts), summary.report()
    # 8 calls of an account at 2 a second: its last starts 3 windows after its first.
    assert summary.seconds is not None and summary.seconds >= 3.0


def test_limit_of_rate_limited_calls_counts_the_windows_a_key_needs() -> None:
    rows = [made('{"account_id":"acme"}', pk) for pk in range(8)]

    assert scenarios.limit(rows, hold=0.25, threads=8, rate=Rate(2, 1.0)) == pytest.approx(3.25)


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_e_tiered_slots_fill_each_accounts_limit_and_never_pass_it(workers: None, client: ProviderClient) -> None:
    summary = run("E", client)

    assert (summary.calls, summary.collisions, summary.unfinished) == (12, 0, 0)
    assert [(account.name, account.peak, account.slots) for account in summary.accounts] == [
        ("acme", 3, 3), ("globex", 2, 2), ("initech", 1, 1),
    ]
    # Four calls each: acme's take two rounds of its three slots, globex's two of two, initech's four of one.
    assert summary.limit == pytest.approx(4 * HOLD)
    assert summary.ok


def test_an_account_of_e_short_of_its_limit_is_a_problem() -> None:
    summary = summary_of("E", accounts=[scenarios.Account("acme", 4, 0, 0, 0, peak=2, slots=3)])

    assert summary.problems() == ["E: acme peaked at 2 in flight, its limit is 3"]
    assert "  OK acme     calls=4  collisions=0  in flight at most 2 of 3" in summary.report().splitlines()


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_run_counts_only_its_own_calls_and_invocations(workers: None, client: ProviderClient) -> None:
    run("D", client)

    again = run("D", client)

    assert (again.enqueued, again.calls, again.deduplicated) == (24, 3, 21)
    assert sorted((entry["account"], entry["op"]) for entry in again.log) == [
        ("acme", "refresh"), ("globex", "refresh"), ("initech", "refresh"),
    ]


# -- the report ---------------------------------------------------------------


def test_titles_are_read_off_the_tasks_declarations() -> None:
    assert [scenario.title for scenario in SCENARIOS.values()] == [
        "A. unsafe — no concurrency control",
        "B. keyed — running_concurrency=KEYS, reroute=True",
        "C. keyed, dropping — running_concurrency=KEYS, reroute=False",
        "D. refresh once — running_concurrency=KEYS, registration_concurrency=KEYS, reroute=True",
        "E. tiered slots — running_concurrency=KEYS, running_limit=tier_slots, reroute=True",
        "F. rate-limited — running_concurrency=KEYS, rate_limit=2/s, reroute=True",
    ]


def test_the_busiest_window_counts_moments_within_one_window_of_the_rate() -> None:
    rate = Rate(2, 1.0)
    assert scenarios.busiest_window([0.0, 0.4, 1.0, 1.4, 2.0], rate) == 2
    assert scenarios.busiest_window([0.0, 0.4, 0.99], rate) == 3
    assert scenarios.busiest_window([0.0, 0.4], None) == 0


def test_a_rate_limited_scenario_fails_when_a_window_saw_more_starts_than_its_rate() -> None:
    within = summary_of("F", accounts=[scenarios.Account("acme", 8, 0, 0, 0, busiest_window=2, busiest_at_provider=3)])
    over = summary_of("F", accounts=[scenarios.Account("acme", 8, 0, 0, 0, busiest_window=3)])
    assert within.ok
    assert over.problems() == ["F: acme started 3 calls within 1s, its rate is 2/s"]


def summary_of(letter: str, **figures: object) -> Summary:
    defaults: dict[str, object] = {
        "enqueued": 12, "statuses": {Status.SUCCESS: 12}, "calls": 12, "collisions": 0, "dropped": 0,
        "deduplicated": 0, "unfinished": 0, "seconds": 1.634, "limit": 1.6, "timeout": 30.0,
        "accounts": [scenarios.Account("acme", 4, 0, 0, 0)],
        "log": [{"account": "acme", "op": "fetch_profile", "collision": False, "started": 100.0, "ended": 100.4}],
    }
    return Summary(scenario=SCENARIOS[letter], **{**defaults, **figures})  # type: ignore[arg-type]


def test_report_prints_the_summary_then_the_call_log() -> None:
    assert summary_of("B").report().splitlines() == [
        "=== B. keyed — running_concurrency=KEYS, reroute=True ===",
        "  12 enqueued -> 12 calls, 0 collisions, 1.63s (limit 1.60s)",
        "  invocations: 12 SUCCESS",
        "  OK acme     calls=4  collisions=0",
        "  call log, in seconds from the first call:",
        "     0.00- 0.40  [ok       ] acme     fetch_profile",
    ]


def test_report_of_c_tells_how_many_were_dropped() -> None:
    summary = summary_of("C", calls=3, dropped=9, accounts=[scenarios.Account("acme", 1, 0, 3, 0)])

    lines = summary.report(log=False).splitlines()

    assert lines[1] == "  12 enqueued -> 3 calls, 0 collisions, 9 dropped, 1.63s (limit 1.60s)"
    assert lines[3] == "  OK acme     calls=1  collisions=0  dropped=3"


def test_report_of_d_tells_how_many_were_deduplicated() -> None:
    summary = summary_of("D", enqueued=24, calls=3, deduplicated=21, accounts=[scenarios.Account("acme", 1, 0, 0, 7)])

    lines = summary.report(log=False).splitlines()

    assert lines[1] == "  24 enqueued -> 3 calls, 0 collisions, 21 deduplicated, 1.63s (limit 1.60s)"
    assert lines[3] == "  OK acme     calls=1  collisions=0  deduplicated=7"


def test_report_marks_an_account_that_saw_a_collision() -> None:
    summary = summary_of("A", collisions=2, accounts=[scenarios.Account("acme", 4, 2, 0, 0)])

    assert "  !! acme     calls=4  collisions=2" in summary.report().splitlines()


def test_report_says_when_invocations_did_not_end() -> None:
    summary = summary_of("B", unfinished=5, seconds=None)

    assert summary.report().splitlines()[1] == "  12 enqueued -> 12 calls, 0 collisions, 5 did not end within 30s"


def test_a_collision_in_a_keyed_scenario_is_a_problem_but_not_in_the_unsafe_one() -> None:
    assert summary_of("A", collisions=3).problems() == []
    assert summary_of("B", collisions=3).problems() == ["B saw 3 collision(s)"]


def test_invocations_left_unfinished_are_a_problem() -> None:
    assert summary_of("D", unfinished=2, seconds=None).problems() == ["D left 2 invocation(s) unfinished"]


def made(running_key: str | None, pk: int) -> dict[str, object]:
    return {"pk": pk, "running_key": running_key, "started_at": "then"}


def test_limit_of_keyed_calls_is_the_longest_chain_of_one_key() -> None:
    rows = [made(f"{{'account_id': {account!r}}}", pk) for pk, account in enumerate(["acme", "globex", "initech"] * 4)]

    assert scenarios.limit(rows, hold=0.4, threads=8) == pytest.approx(1.6)


def test_limit_of_calls_without_a_key_is_the_width_of_the_pool() -> None:
    rows = [made(None, pk) for pk in range(12)]

    assert scenarios.limit(rows, hold=0.4, threads=8) == pytest.approx(0.6)


def test_limit_counts_only_invocations_that_ran() -> None:
    rows = [made('{"account_id":"acme"}', 1), {**made('{"account_id":"acme"}', 2), "started_at": None}]

    assert scenarios.limit(rows, hold=0.4, threads=8) == pytest.approx(0.4)


def test_load_scales_past_the_named_accounts_and_ops() -> None:
    load = Load.scaled(accounts=4, ops=5)

    assert load.accounts == ("acme", "globex", "initech", "acme2")
    assert load.ops == ("fetch_profile", "list_invoices", "refresh_usage", "update_metadata", "fetch_profile_2")
    assert len(SCENARIOS["B"].calls(load)) == 20
    assert len(SCENARIOS["D"].calls(load)) == 4 * 2 * 5


# -- the tasks ------------------------------------------------------------------


@pytest.fixture
def inline(provider: Provider) -> Iterator[None]:
    """Let tasks called in this thread reach ``provider``; close this thread's client afterwards."""
    with override_settings(PROVIDER_URL=provider.url):
        yield
    tasks.close_provider()


def closing_client(function: Callable[[], T]) -> Callable[[], T]:
    """Return ``function``, made to close its thread's client when it returns."""

    def call_and_close() -> T:
        try:
            return function()
        finally:
            tasks.close_provider()

    return call_and_close


def test_a_thread_reuses_its_client_and_other_threads_get_their_own(inline: None) -> None:
    mine = tasks.provider()

    with ThreadPoolExecutor(max_workers=1) as pool:
        theirs = pool.submit(closing_client(tasks.provider)).result(timeout=10)

    assert tasks.provider() is mine
    assert theirs is not mine


def test_a_task_calls_the_provider_for_its_account(inline: None) -> None:
    answer = tasks.call_keyed("acme", "fetch_profile")

    assert (answer["account"], answer["op"], answer["collision"]) == ("acme", "fetch_profile", False)


def test_a_task_that_meets_a_collision_raises(inline: None, client: ProviderClient) -> None:
    with ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(closing_client(lambda: tasks.call_unsafe("acme", "fetch_profile")))
        while not client.stats()["in_flight"]:
            time.sleep(0.01)

        with pytest.raises(httpx.HTTPStatusError, match="429"):
            tasks.call_unsafe("acme", "list_invoices")
        first.result(timeout=10)


# -- the commands -------------------------------------------------------------


def manage(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[object, str]:
    """Run ``manage.py args`` as from the command line, in this process; return the exit status and stderr."""
    with pytest.raises(SystemExit) as exited:
        execute_from_command_line(["manage.py", *args])
    return exited.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["demo", "Z"], "argument A|B|C|D|E|F|all: unknown scenario 'Z'; choose A, B, C, D, E, F or all"),
        (["demo", "--hold", "-1"], "argument --hold: must be a number of seconds from 0 to 60, not '-1'"),
        (["demo", "--threads", "0"], "argument --threads: must be at least 1, not 0"),
        (["demo", "--workers", "two"], "argument --workers: 'two' is not a whole number"),
        (["demo", "--port", "70000"], "argument --port: must be from 0 to 65535, not 70000"),
        (["demo", "--timeout", "nan"], "argument --timeout: must be more than 0 seconds, not nan"),
        (["enqueue", "all", "--ops", "-3"], "argument --ops: must be at least 1, not -3"),
        (["enqueue"], "the following arguments are required: A|B|C|D|E|F|all"),
    ],
)
def test_bad_input_gets_one_line_and_a_non_zero_exit(
    capsys: pytest.CaptureFixture[str], args: list[str], complaint: str
) -> None:
    status, stderr = manage(capsys, *args)

    assert status != 0
    assert stderr == f"manage.py {args[0]}: error: {complaint}\n"


@pytest.mark.django_db(transaction=True)
def test_demo_with_its_port_in_use_says_so_in_one_line(capsys: pytest.CaptureFixture[str], provider: Provider) -> None:
    port = provider.url.rsplit(":", 1)[1]

    status, stderr = manage(capsys, "demo", "--port", port)

    assert status == 1
    assert stderr == (
        f"CommandError: provider: port {port} on 127.0.0.1 is already in use; "
        "stop what uses it, or pass --port 0 for any free port\n"
    )


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_demo_runs_every_scenario_and_stops_what_it_started(monkeypatch: pytest.MonkeyPatch) -> None:
    # What the worker processes it starts need to open the test database.
    monkeypatch.setenv("KEYJOBS_TEST_DB_NAME", connection.settings_dict["NAME"])
    out = io.StringIO()

    call_command("demo", "all", port=0, hold=HOLD, stdout=out)

    titles = [line for line in out.getvalue().splitlines() if line.startswith("===")]
    assert [title[4] for title in titles] == ["A", "B", "C", "D", "E", "F"]
    figures = re.findall(r"^  (\d+) enqueued -> (\d+) calls, (\d+) collisions", out.getvalue(), re.MULTILINE)
    assert figures[1:] == [("12", "12", "0"), ("12", "3", "0"), ("24", "3", "0"), ("12", "12", "0"), ("24", "24", "0")]
    assert not Runner.objects.active().exists()


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_demo_stops_what_it_started_on_ctrl_c() -> None:
    demo = subprocess.Popen(
        [sys.executable, "-W", "error", "manage.py", "demo", "B", "--port", "0", "--hold", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "KEYJOBS_TEST_DB_NAME": connection.settings_dict["NAME"]},
    )
    try:
        assert demo.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(demo.stdout, selectors.EVENT_READ)
            assert selector.select(60), "the demo did not start"
        started = re.match(r"provider at (http://127\.0\.0\.1:(\d+)) ", demo.stdout.readline())
        assert started is not None
        with ProviderClient(started[1]) as demos_provider:
            while not demos_provider.stats()["in_flight"]:
                time.sleep(0.02)

        demo.send_signal(signal.SIGINT)
        _, stderr = demo.communicate(timeout=30)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.communicate()

    assert demo.returncode == 130
    assert stderr.splitlines()[-1] == "CommandError: interrupted; the provider and the workers are stopped"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", int(started[2])), timeout=5).close()
    (worker,) = Runner.objects.values_list("pid", flat=True)
    with pytest.raises(ProcessLookupError):
        os.kill(worker, 0)


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_enqueue_runs_a_scenario_on_the_workers_already_running(workers: None, provider: Provider) -> None:
    out = io.StringIO()

    with override_settings(PROVIDER_URL=provider.url):
        call_command("enqueue", "D", stdout=out)

    assert out.getvalue().splitlines()[1].startswith("  24 enqueued -> 3 calls, 0 collisions, 21 deduplicated, ")


@pytest.mark.django_db
def test_enqueue_without_a_provider_says_how_to_start_one() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{unused.getsockname()[1]}"

    with override_settings(PROVIDER_URL=url), pytest.raises(CommandError, match=r"start it with `python -m demo_project\.provider`"):
        call_command("enqueue", "B", stderr=io.StringIO())


@pytest.mark.sqlite
def test_the_demo_takes_task_options_from_the_environment(tmp_path: Path) -> None:
    # Not about a database: once, in the SQLite half. django-environ reads JSON; the checks refuse what cannot apply.
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "demo_project.settings",
           "DATABASE_URL": f"sqlite:///{tmp_path / 'demo.sqlite3'}"}
    show = "from demo_project.tasks import call_keyed; print(call_keyed.running_limit)"

    def manage(options: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=120, env={**env, "KEYJOBS_TASK_OPTIONS": options})

    shown = manage('{"demo_project.tasks.call_keyed": {"running_limit": 2}}', "shell", "-c", show)
    assert (shown.returncode, shown.stdout.splitlines()[-1]) == (0, "2"), shown.stderr
    refused = manage('{"demo_project.tasks.call_keyed": {"running_limit": 0}}', "check")
    assert refused.returncode == 1 and "keyjobs.E008" in refused.stderr and "call_keyed" in refused.stderr
