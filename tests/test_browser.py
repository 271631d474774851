"""The timeline in a real headless browser: after the demo's four scenarios ran on a real worker, its lanes,
bars and markers must match what the database says, and A, B, C and D must be told apart.

Debian's ``chromium`` and ``chromium-driver`` packages provide the browser and its driver; Selenium is told
where they are, so that it downloads nothing. Screenshots go to ``test-artifacts/``.
"""

import itertools
import json
import re
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
    screenshot(logged_in, "dashboard")
    logged_in.find_element(By.LINK_TEXT, "acme").click()
    WebDriverWait(logged_in, 10).until(lambda driver: "/key/" in driver.current_url)
    assert "Waiting, in the order the key will take them" in logged_in.page_source
    assert_no_script_errors(logged_in)



# -- the admin's breadcrumb bar on every monitor page ------------------------------------------


def breadcrumb_style(browser: WebDriver, url: str) -> dict[str, Any]:
    """The breadcrumb bar of the page at ``url`` as drawn: its tag, background, height and links."""
    browser.get(url)
    return browser.execute_script(
        "const bar = document.querySelector('.breadcrumbs'); if (!bar) return null;"
        "const style = getComputedStyle(bar), box = bar.getBoundingClientRect();"
        "return {tag: bar.tagName, background: style.backgroundColor, height: box.height, left: box.left,"
        " paddingLeft: parseFloat(style.paddingLeft), links: Array.from(bar.querySelectorAll('a')).map(a => a.textContent)}"
    )


@pytest.mark.parametrize("name", ["dashboard", "timeline", "schedules", "key", "tasks", "keys", "logs"])
def test_every_monitor_page_has_the_admins_breadcrumb_bar(logged_in: WebDriver, live_server: Any, name: str) -> None:
    admins = breadcrumb_style(logged_in, live_server.url + reverse("admin:keyjobs_invocation_changelist"))
    url = live_server.url + reverse(f"admin:keyjobs_invocation_{name}")
    if name == "key":
        url += '?task=tests.jobs.keyed&key={"account_id":"acme"}'

    bar = breadcrumb_style(logged_in, url)

    # Drawn as the admin draws its own (Django 6.1: <ol>, 5.2: <div>): the same band of colour, not a bare line.
    assert bar is not None and admins is not None
    assert (bar["tag"], bar["background"]) == (admins["tag"], admins["background"])
    assert bar["background"] not in ("rgba(0, 0, 0, 0)", "transparent")
    assert bar["height"] >= 30 and bar["paddingLeft"] >= 20
    assert bar["links"][:2] == ["Home", "keyjobs"]
    assert_no_script_errors(logged_in)


def visible_bars(browser: WebDriver) -> list[str]:
    """The ids of the bars drawn inside the chart's current view."""
    return browser.execute_script(
        "const s = document.querySelector('#kj-timeline svg'), start = +s.dataset.start, end = +s.dataset.end;"
        "return Array.from(s.querySelectorAll('rect.kj-bar')).filter(b => +b.dataset.start <= end &&"
        " (b.dataset.end === '' || +b.dataset.end >= start)).map(b => b.dataset.id)"
    )


def test_zooming_in_keeps_the_data_in_view_when_the_centre_is_empty(logged_in: WebDriver, live_server: Any) -> None:
    runner, now = RunnerFactory(), timezone.now()
    # Two bursts a minute apart: the middle of the fitted view holds nothing.
    for seconds in (70, 69.5, 10, 9.5):
        start = now - timedelta(seconds=seconds)
        give_run(InvocationFactory(), runner=runner, thread=0, start=start, end=start + timedelta(milliseconds=300))
    open_timeline(logged_in, live_server, minutes="5")

    for _ in range(4):
        logged_in.find_element(By.ID, "kj-zoom-in").click()
        assert visible_bars(logged_in), "zoomed in on nothing"


def test_a_range_of_seconds_reads_to_the_millisecond(logged_in: WebDriver, live_server: Any) -> None:
    now = timezone.now().replace(microsecond=0)
    start = now - timedelta(seconds=10)
    give_run(InvocationFactory(), runner=RunnerFactory(), thread=0, start=start + timedelta(seconds=1),
             end=start + timedelta(seconds=2))
    local = timezone.localtime

    open_timeline(logged_in, live_server, **{"from": local(start).strftime("%Y-%m-%dT%H:%M:%S"),
                                             "to": local(start + timedelta(seconds=3)).strftime("%Y-%m-%dT%H:%M:%S")})

    label = logged_in.find_element(By.ID, "kj-range").text
    first, last = label.split(" → ")
    assert first.split()[-1] != last.split()[0], label
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} → \d\d:\d\d:\d\d\.\d{3} \(\d\.\d\d s\)", label), label
    assert logged_in.find_element(By.NAME, "from").get_attribute("value").endswith(
        local(start).strftime("%H:%M:%S"))


# -- the list and the detail page ------------------------------------------------------------------------


def test_the_list_fits_1600_pixels_with_long_arguments_and_errors(logged_in: WebDriver, live_server: Any) -> None:
    runner, now = RunnerFactory(host="a-rather-long-host-name.example"), timezone.now()
    for number in range(5):
        # Ids of seven digits, as a table of a million has.
        give_run(InvocationFactory(id=9_000_000 + number, task_name="demo_project.tasks.call_with_a_long_name",
                                   args=["x" * 200, number],
                                   running_key=json.dumps({"account_id": f"account-{number}" * 3})),
                 runner=runner, thread=number, start=now - timedelta(seconds=3), end=now, status=Status.FAILED)
    Invocation.objects.update(error="ValueError: " + "a long message " * 20)
    logged_in.set_window_size(1600, 1000)
    try:
        logged_in.get(live_server.url + reverse("admin:keyjobs_invocation_changelist"))
        width = logged_in.execute_script(
            "return [document.documentElement.scrollWidth, document.documentElement.clientWidth,"
            " document.querySelector('#changelist .results').scrollWidth,"
            " document.querySelector('#changelist .results').clientWidth,"
            " Array.from(document.querySelectorAll('#result_list thead th')).map(th => th.className + ':' + th.offsetWidth)]")
    finally:
        logged_in.set_window_size(1400, 1000)
    assert width[0] <= width[1] and width[2] <= width[3], width


def live_region(browser: WebDriver) -> tuple[str, str]:
    """The text and data-active of the page's #kj-live, read in one script: a refresh replaces the element, so
    a WebElement found before it goes stale between two reads."""
    text, active = browser.execute_script(
        "var live = document.getElementById('kj-live'); return [live.innerText, live.dataset.active];")
    return str(text), str(active)


def test_the_list_and_the_detail_page_follow_an_invocation_that_ends(logged_in: WebDriver, live_server: Any) -> None:
    runner = RunnerFactory()
    invocation = give_run(InvocationFactory(), runner=runner, thread=0, start=timezone.now())

    for url in (reverse("admin:keyjobs_invocation_changelist"),
                reverse("admin:keyjobs_invocation_change", args=[invocation.pk])):
        logged_in.get(live_server.url + url)
        assert "Running" in live_region(logged_in)[0]
    # The run ends, as a worker records it; the detail page (open last) shows it without a reload.
    Invocation.objects.filter(pk=invocation.pk).update(status=Status.SUCCESS, finished_at=timezone.now())
    Event.objects.create(invocation=invocation, from_status=Status.RUNNING, to_status=Status.SUCCESS, runner=runner)
    wait_for(lambda: "Running → Success" in live_region(logged_in)[0], timeout=8)
    assert live_region(logged_in)[1] == "false"
    logged_in.get(live_server.url + reverse("admin:keyjobs_invocation_changelist"))
    assert live_region(logged_in)[1] == "false"
    assert_no_script_errors(logged_in)


# -- the statistics pages ------------------------------------------------------------------------------------


def test_the_tasks_and_keys_pages_draw_charts_with_axes(logged_in: WebDriver, live_server: Any) -> None:
    from keyjobs import rollup

    runner, now = RunnerFactory(), timezone.now()
    for number in range(40):
        start = now - timedelta(seconds=600 - 14 * number)
        give_run(InvocationFactory(task_name="demo_project.tasks.call_keyed",
                                   running_key=json.dumps({"account_id": f"acme{number % 4}"})),
                 runner=runner, thread=number % 4, start=start, end=start + timedelta(milliseconds=150 + 40 * number),
                 status=Status.FAILED if number % 9 == 0 else Status.SUCCESS)
    rollup.roll_up(using="default")
    rollup.sample_depth(using="default")

    logged_in.get(live_server.url + reverse("admin:keyjobs_invocation_tasks") + "?minutes=15")
    charts = logged_in.find_elements(By.CSS_SELECTOR, "svg.kj-chart")
    assert len(charts) == 4
    for drawn in charts:
        box = drawn.rect
        assert box["width"] > 200 and box["height"] > 40
        assert len(drawn.find_elements(By.CSS_SELECTOR, ".kj-chart-y")) == 3
        assert drawn.find_elements(By.CSS_SELECTOR, ".kj-chart-x")
    assert logged_in.find_elements(By.CSS_SELECTOR, "svg.kj-chart rect.kj-chart-bar")
    assert "call_keyed" in logged_in.find_element(By.ID, "kj-tasks").text
    screenshot(logged_in, "tasks")

    logged_in.find_element(By.LINK_TEXT, "The busiest keys").click()
    WebDriverWait(logged_in, 10).until(lambda driver: "/keys/" in driver.current_url)
    keys = logged_in.find_element(By.ID, "kj-keys").text
    assert all(f"acme{number}" in keys for number in range(4))
    assert_no_script_errors(logged_in)


# -- the timeline at scale, and its tooltip --------------------------------------------------------------------


def test_a_busy_window_is_drawn_as_bands_and_zooming_in_brings_each_run(logged_in: WebDriver, live_server: Any) -> None:
    from tests.factories import give_busy_window

    give_busy_window(20_000, now=timezone.now())

    open_timeline(logged_in, live_server, minutes="15", lanes="thread")

    size = logged_in.execute_script("return document.getElementById('kj-timeline-data').textContent.length")
    assert size < 500_000, size
    assert logged_in.find_elements(By.CSS_SELECTOR, "#kj-timeline rect.kj-band")
    assert not bars(logged_in)
    kinds = {marker["kind"] for marker in markers(logged_in)}
    assert kinds == {"dropped", "rerouted"}, "aggregated, not dropped"
    assert "too busy to draw run by run" in logged_in.find_element(By.ID, "kj-refresh-status").text
    screenshot(logged_in, "timeline-under-load")

    for _ in range(6):  # 15 minutes to about 14 seconds
        logged_in.find_element(By.ID, "kj-zoom-in").click()
    wait_for(lambda: len(bars(logged_in)) > 0, timeout=15)
    assert not logged_in.find_elements(By.CSS_SELECTOR, "#kj-timeline rect.kj-band")
    assert_no_script_errors(logged_in)


def test_the_tooltip_shows_the_call_and_how_long_it_waited(logged_in: WebDriver, live_server: Any) -> None:
    now = timezone.now()
    invocation = InvocationFactory(task_name="tests.jobs.add", args=[40, 2], kwargs={"note": "x"})
    Invocation.objects.filter(pk=invocation.pk).update(created_at=now - timedelta(seconds=5))
    give_run(Invocation.objects.get(pk=invocation.pk), runner=RunnerFactory(), thread=0,
             start=now - timedelta(seconds=3.5), end=now - timedelta(seconds=3))
    open_timeline(logged_in, live_server)

    ActionChains(logged_in).move_to_element(logged_in.find_element(By.CSS_SELECTOR, "#kj-timeline rect.kj-bar")).perform()
    tooltip = logged_in.find_element(By.ID, "kj-tooltip")
    wait_for(lambda: 'add(40, 2, note="x")' in tooltip.text, timeout=5)
    assert "waited 1.500 s before it started" in tooltip.text


def test_the_timeline_refreshes_only_what_changed(logged_in: WebDriver, live_server: Any) -> None:
    runner, now = RunnerFactory(), timezone.now()
    give_run(InvocationFactory(), runner=runner, thread=0, start=now - timedelta(seconds=1))
    open_timeline(logged_in, live_server)

    give_run(InvocationFactory(), runner=runner, thread=1, start=timezone.now())
    wait_for(lambda: len(bars(logged_in)) == 2, timeout=8)

    asked = logged_in.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name).filter(n => n.includes('/timeline/data/'))")
    assert asked and all("from=" in url for url in asked), asked


def test_a_waited_invocations_page_names_what_it_waited_behind(logged_in: WebDriver, live_server: Any) -> None:
    from keyjobs.worker import Worker
    from tests import jobs

    first = jobs.keyed.delay("acme", "first", hold=0.4)
    second = jobs.keyed.delay("acme", "second")
    Worker(threads=2, burst=True, poll_interval=0.01).run()

    logged_in.get(live_server.url + reverse("admin:keyjobs_invocation_change", args=[second.pk]))

    waited = logged_in.find_element(By.CSS_SELECTOR, ".kj-waits")
    assert "key busy" in waited.text and f"#{first.pk}" in waited.text
    link = waited.find_element(By.LINK_TEXT, f"#{first.pk}")
    assert link.get_attribute("href").endswith(reverse("admin:keyjobs_invocation_change", args=[first.pk]))
    screenshot(logged_in, "invocation-waited")
    assert_no_script_errors(logged_in)


def test_the_tasks_page_follows_the_rollup_while_work_waits(logged_in: WebDriver, live_server: Any) -> None:
    from keyjobs.models import TaskMinute

    waiting = InvocationFactory(task_name="tests.jobs.keyed", status=Status.REGISTERED)
    logged_in.get(live_server.url + reverse("admin:keyjobs_invocation_tasks") + "?minutes=15")
    assert live_region(logged_in)[1] == "true" and "record_span_three" not in live_region(logged_in)[0]
    # The rollup duty adds a minute of a task's work, as runners do every heartbeat: the page shows it unasked.
    TaskMinute.objects.create(task_name="tests.jobs.record_span_three", minute=timezone.now().replace(second=0, microsecond=0),
                              enqueued=3, started=3, succeeded=3, runs=3, duration_ms=30, d_10=3)
    wait_for(lambda: "record_span_three" in live_region(logged_in)[0], timeout=8)
    Invocation.objects.filter(pk=waiting.pk).update(status=Status.CANCELLED)
    wait_for(lambda: live_region(logged_in)[1] == "false", timeout=8)


def test_a_workflows_suspended_stretch_is_drawn_on_its_bar(logged_in: WebDriver, live_server: Any,
                                                            tmp_path: Path) -> None:
    """A workflow that slept was suspended (PAUSED, no thread held) between two stretches of running: the timeline
    draws one bar for its run, with the suspended stretch on it, as it draws a task's wait on a child."""
    from tests import flows
    from tests.waiting import thread_worker

    flow = flows.nap.delay(str(tmp_path / "log"), 2.0)
    with thread_worker(threads=1):
        wait_for(lambda: Invocation.objects.get(pk=flow.pk).status == Status.SUCCESS, timeout=30,
                 what="the workflow to sleep and end")

    open_timeline(logged_in, live_server, minutes="5", lanes="key")
    assert [bar["status"] for bar in bars(logged_in) if bar["id"] == str(flow.pk)] == [Status.SUCCESS]
    paused = logged_in.execute_script(
        "return Array.from(document.querySelectorAll('#kj-timeline rect.kj-paused'))"
        ".map(p => [p.dataset.id, p.getAttribute('width')])"
    )
    assert [pk for pk, _ in paused] == [str(flow.pk)]
    assert float(paused[0][1]) > 2  # two seconds of a five-minute window: a few pixels, not a sliver
    screenshot(logged_in, "timeline-workflow-suspended")
