"""The timeline in a real headless browser: after the demo's four scenarios ran on a real worker, its lanes,
bars and markers must match what the database says, and A, B, C and D must be told apart.

Debian's ``chromium`` and ``chromium-driver`` packages provide the browser and its driver; Selenium is told
where they are, so that it downloads nothing. Screenshots go to ``test-artifacts/``.
"""

import itertools
import json
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse
from django.utils import timezone

from keyjobs.models import Event, Invocation, Runner
from keyjobs.status import Status
from tests.browser import requires_chromium
from tests.factories import InvocationFactory, RunnerFactory, give_run
from tests.waiting import wait_for

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
    requires_chromium,
]

# As the demo's own tests run the scenarios: a short hold, one worker of eight threads.
HOLD = 0.25
THREADS = 8
PASSWORD = "correct horse"


@pytest.fixture
def logged_in(browser: WebDriver, live_server: Any, django_user_model: type) -> WebDriver:
    """The browser, logged in through the admin's login form as staff who may view invocations."""
    user = django_user_model.objects.create_user("watcher", password=PASSWORD, is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=["view_invocation", "view_runner"]))
    browser.delete_all_cookies()
    browser.get(live_server.url + reverse("admin:login"))
    browser.find_element(By.NAME, "username").send_keys("watcher")
    browser.find_element(By.NAME, "password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    WebDriverWait(browser, 10).until(lambda driver: "login" not in driver.current_url)
    return browser


def open_timeline(browser: WebDriver, live_server: Any, **query: str) -> None:
    browser.get(f"{live_server.url}{reverse('admin:keyjobs_invocation_timeline')}?"
                + "&".join(f"{name}={value}" for name, value in query.items()))
    WebDriverWait(browser, 10).until(
        lambda driver: driver.execute_script("return document.body.dataset.timelineReady === 'true'")
    )
    assert_no_script_errors(browser)


def assert_no_script_errors(browser: WebDriver) -> None:
    errors = [entry for entry in browser.get_log("browser")
              if entry["level"] == "SEVERE" and "favicon.ico" not in entry["message"]]
    assert not errors, errors


def bars(browser: WebDriver) -> list[dict[str, str]]:
    """Every bar drawn, as its data attributes."""
    return browser.execute_script(
        "return Array.from(document.querySelectorAll('#kj-timeline rect.kj-bar'))"
        ".map(b => Object.assign({}, b.dataset))"
    )


def markers(browser: WebDriver) -> list[dict[str, str]]:
    return browser.execute_script(
        "return Array.from(document.querySelectorAll('#kj-timeline .kj-marker')).map(m => Object.assign({}, m.dataset))"
    )


def lane_labels(browser: WebDriver) -> list[str]:
    """The full label of every lane, top to bottom (a long one is shortened on screen, whole in its tooltip)."""
    return browser.execute_script(
        "return Array.from(document.querySelectorAll('#kj-timeline .kj-lane-name > title')).map(t => t.textContent)"
    )


def screenshot(browser: WebDriver, name: str) -> Path:
    """Save the whole page as ``test-artifacts/<name>.png``; return the path."""
    ARTIFACTS.mkdir(exist_ok=True)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1400, max(1000, height + 40))
    path = ARTIFACTS / f"{name}.png"
    browser.save_screenshot(str(path))
    browser.set_window_size(1400, 1000)
    return path


def overlaps(spans: list[tuple[int, int]]) -> bool:
    spans = sorted(spans)
    return any(start < previous_end for (_, previous_end), (start, _) in itertools.pairwise(spans))


# -- the demo on a real worker ------------------------------------------------------------


@pytest.fixture
def demo_ran(worker_process: Any) -> dict[str, str]:
    """Run scenarios A to D as the demo runs them, on a real runworker and an in-process provider.

    Return the task name of each scenario, by letter.
    """
    from demo_project import scenarios
    from demo_project.provider import Provider

    with Provider(hold=HOLD, quiet=True) as provider:
        process = worker_process("--threads", str(THREADS), env={"PROVIDER_URL": provider.url})
        wait_for(lambda: Runner.objects.active().exists() or process.process.poll() is not None, timeout=30)
        assert process.process.poll() is None, process.process.communicate()[0]
        with scenarios.ProviderClient(provider.url) as client:
            for letter in "ABCD":
                summary = scenarios.run(scenarios.SCENARIOS[letter], client, hold=HOLD, threads=THREADS, timeout=30)
                assert not summary.unfinished, summary.report()
        process.signal()
        process.wait(timeout=30)
    return {letter: scenario.task.name for letter, scenario in scenarios.SCENARIOS.items()}


def test_the_timeline_tells_the_four_scenarios_apart(logged_in: WebDriver, live_server: Any,
                                                    demo_ran: dict[str, str]) -> None:
    browser = logged_in
    # What the database says, read here independently of the monitor's own queries.
    starts = Event.objects.filter(kind=Event.Kind.TRANSITION, to_status=Status.RUNNING)
    expected_bars = Counter((str(event.invocation_id), f"{event.runner_id}/{event.runner_thread}")
                            for event in starts)
    expected_markers = Counter({
        "rerouted": Event.objects.filter(kind=Event.Kind.TRANSITION, to_status=Status.REROUTED).count(),
        "dropped": Event.objects.filter(to_status=Status.CONCURRENCY_CONTROLLED_FINAL).count(),
        "reused": Event.objects.filter(kind=Event.Kind.REUSED).count(),
    })
    assert expected_markers["dropped"] and expected_markers["reused"], "C drops and D merges, as the demo says"

    # Lanes per runner thread: every run is a bar in the lane of the thread that ran it.
    open_timeline(browser, live_server, minutes="15", lanes="thread")
    drawn = bars(browser)
    assert Counter((bar["id"], bar["lane"]) for bar in drawn) == expected_bars
    assert Counter(marker["kind"] for marker in markers(browser)) == +expected_markers
    unsafe_ids = set(map(str, Invocation.objects.filter(task_name=demo_ran["A"]).values_list("pk", flat=True)))
    unsafe = [(int(bar["start"]), int(bar["end"])) for bar in drawn if bar["id"] in unsafe_ids]
    assert len(unsafe) == 12 and overlaps(unsafe), "A's calls ran at the same time"
    screenshot(browser, "timeline-threads")

    # Lanes per key: B is three serial account lanes, A one lane of overlapping bars, C and D their markers.
    browser.find_element(By.ID, "kj-lanes-key").click()
    labels = lane_labels(browser)
    short = {letter: name.rpartition(".")[2] for letter, name in demo_ran.items()}
    assert [label for label in labels if label.startswith(short["B"] + " ·")] == [
        f"{short['B']} · acme", f"{short['B']} · globex", f"{short['B']} · initech",
    ]
    # In the order the scenarios ran: A's lane on top, D's at the bottom.
    firsts = [next(number for number, label in enumerate(labels) if label.startswith(short[letter] + " ·"))
              for letter in "ABCD"]
    assert firsts == sorted(firsts), labels
    by_lane: dict[str, list[dict[str, str]]] = {}
    for bar in bars(browser):
        by_lane.setdefault(bar["lane"], []).append(bar)
    for account in ("acme", "globex", "initech"):
        lane = by_lane[f'{demo_ran["B"]}\n{{"account_id":"{account}"}}']
        assert len(lane) == 4
        assert not overlaps([(int(bar["start"]), int(bar["end"])) for bar in lane]), f"B's {account} ran serially"
        assert len({bar["row"] for bar in lane}) == 1, f"B's {account} bars sit in one row"
    unsafe_lane = by_lane[f'{demo_ran["A"]}\n']
    assert len(unsafe_lane) == 12 and len({bar["row"] for bar in unsafe_lane}) > 1, "A's bars stack up"
    key_markers = markers(browser)
    assert {marker["kind"] for marker in key_markers if marker["lane"].startswith(demo_ran["C"] + "\n")} == {
        "dropped"}
    assert {marker["kind"] for marker in key_markers if marker["lane"].startswith(demo_ran["D"] + "\n")} == {
        "reused"}
    path = screenshot(browser, "timeline-scenarios")
    assert path.stat().st_size > 10_000

    # Hover details, zoom, and a click through to the invocation.
    bar = browser.find_elements(By.CSS_SELECTOR, "#kj-timeline rect.kj-bar")[0]
    ActionChains(browser).move_to_element(bar).perform()
    tooltip = browser.find_element(By.ID, "kj-tooltip")
    WebDriverWait(browser, 5).until(lambda driver: tooltip.is_displayed())
    assert tooltip.text.startswith(f"#{bar.get_attribute('data-id')} ")
    span = lambda: int(browser.execute_script(  # noqa: E731
        "const s = document.querySelector('#kj-timeline svg'); return s.dataset.end - s.dataset.start"))
    before = span()
    browser.find_element(By.ID, "kj-zoom-in").click()
    assert abs(span() - before / 2) <= 1
    browser.find_element(By.ID, "kj-zoom-fit").click()
    bar = browser.find_elements(By.CSS_SELECTOR, "#kj-timeline rect.kj-bar")[0]
    clicked = bar.get_attribute("data-id")
    ActionChains(browser).move_to_element(bar).click().perform()
    WebDriverWait(browser, 10).until(lambda driver: "/change/" in driver.current_url)
    assert browser.current_url.endswith(reverse("admin:keyjobs_invocation_change", args=[clicked]))


# -- data drawn as text, and a page that follows the work -----------------------------------------


def test_task_names_and_keys_with_html_are_drawn_as_text(logged_in: WebDriver, live_server: Any) -> None:
    evil = '<img src=x onerror="alert(1)"><script>alert(2)</script>'
    now = timezone.now()
    runner = RunnerFactory(host=evil)
    give_run(InvocationFactory(task_name=f"tests.{evil}", running_key=json.dumps({"account_id": evil})),
             runner=runner, thread=0, start=now - timedelta(seconds=3), end=now)

    open_timeline(logged_in, live_server, lanes="key")

    with pytest.raises(NoAlertPresentException):
        logged_in.switch_to.alert.text  # noqa: B018
    assert lane_labels(logged_in) == [f"{evil} · {evil}"]
    assert not logged_in.find_elements(By.CSS_SELECTOR, "#kj-timeline img, #kj-timeline script")
    logged_in.find_element(By.ID, "kj-lanes-thread").click()
    assert lane_labels(logged_in) == [f"{evil}:{runner.pid} · thread 0"]


def test_the_timeline_follows_work_while_it_runs(logged_in: WebDriver, live_server: Any) -> None:
    runner, now = RunnerFactory(), timezone.now()
    running = give_run(InvocationFactory(), runner=runner, thread=0, start=now - timedelta(seconds=1))

    open_timeline(logged_in, live_server)
    assert [bar["end"] for bar in bars(logged_in)] == [""]

    # The run ends and another starts, as a worker would record them.
    give_run(InvocationFactory(), runner=runner, thread=1, start=timezone.now())
    Invocation.objects.filter(pk=running.pk).update(status=Status.SUCCESS, finished_at=timezone.now())
    Event.objects.create(invocation=running, from_status=Status.RUNNING, to_status=Status.SUCCESS, runner=runner,
                         runner_thread=0)

    wait_for(lambda: len(bars(logged_in)) == 2, timeout=8)
    assert sorted(bar["status"] for bar in bars(logged_in)) == ["RUNNING", "SUCCESS"]
    assert "refreshing every 2 s" in logged_in.find_element(By.ID, "kj-refresh-status").text


def test_the_dashboard_and_the_key_view_render_in_the_browser(logged_in: WebDriver, live_server: Any) -> None:
    key = '{"account_id":"acme"}'
    InvocationFactory(task_name="tests.jobs.keyed", running_key=key, status=Status.REGISTERED)

    logged_in.get(live_server.url + reverse("admin:keyjobs_invocation_dashboard"))
    assert "Busiest keys" in logged_in.page_source
    logged_in.find_element(By.LINK_TEXT, "acme").click()
    WebDriverWait(logged_in, 10).until(lambda driver: "/key/" in driver.current_url)
    assert "Waiting, in the order the key will take them" in logged_in.page_source
    assert_no_script_errors(logged_in)

