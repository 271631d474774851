"""The demo site in a real headless browser, on a real worker process and the provider: what a new user sees.

Debian's ``chromium`` and ``chromium-driver`` drive the pages of the live server; a ``runworker`` process
makes the calls to an in-process provider, whose counters are the witness of collisions. Screenshots go to
``test-artifacts/``.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.urls import reverse

from demo_project import tasks
from demo_project.accounts.models import Account
from demo_project.provider import Provider
from demo_project.scenarios import ProviderClient
from keyjobs import Status
from keyjobs.models import Event, Invocation
from tests.browser import requires_chromium
from tests.test_browser import assert_no_script_errors, overlaps, screenshot

# Fixtures, reused: an in-process provider, and a runworker process calling it. Parameters of that name
# below redefine them, as pytest means them to (F811).
from tests.test_demo import provider, workers  # noqa: F401
from tests.waiting import wait_for

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
    requires_chromium,
]

PASSWORD = "correct horse"


@pytest.fixture
def site(live_server: Any, provider: Provider, workers: None, settings: Any) -> str:  # noqa: F811
    """The site on the live server, with the seeded accounts, its worker running and the provider's counters at zero.

    Return the site's URL.
    """
    settings.PROVIDER_URL = provider.url
    # As the migration seeds them; bulk_create sends no post_save, so that no refresh is asked for.
    Account.objects.bulk_create([Account(name=name) for name in ("acme", "globex", "initech")], ignore_conflicts=True)
    counters(provider, reset=True)
    return str(live_server.url)


def counters(provider: Provider, *, reset: bool = False) -> dict[str, Any]:  # noqa: F811
    """Return the provider's counters and call log, zeroing them first if ``reset``."""
    assert provider.url is not None
    with ProviderClient(provider.url) as client:
        return client.reset() if reset else client.stats()


@pytest.fixture
def logged_in(browser: WebDriver, site: str, django_user_model: type) -> WebDriver:
    """The browser, logged in through the site's login page, as the demo user `make site` creates: a superuser."""
    django_user_model.objects.create_superuser("demo", email="", password=PASSWORD)
    browser.delete_all_cookies()
    browser.get(site + reverse("accounts:list"))
    assert "/login/" in browser.current_url, "an anonymous user is sent to the login page"
    browser.find_element(By.NAME, "username").send_keys("demo")
    browser.find_element(By.NAME, "password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "form.login button[type=submit]").click()
    WebDriverWait(browser, 10).until(lambda driver: driver.find_elements(By.ID, "accounts"))
    assert_no_script_errors(browser)
    return browser


def calls_in_row(browser: WebDriver, account: str) -> list[dict[str, str]]:
    """Every invocation the account's row shows, as its data attributes, oldest first."""
    return browser.execute_script(
        "return Array.from(document.querySelectorAll(`[data-account='${arguments[0]}'] a.call`))"
        ".map(c => Object.assign({}, c.dataset))", account,
    )


#: What a find-and-click may meet while the page swaps its live parts in (every second): the element found is gone
#: by the click ("stale", or "does not belong to the document").
RACING = (StaleElementReferenceException, WebDriverException)


@contextmanager
def new_document(browser: WebDriver) -> Iterator[None]:
    """After the block, wait for the page its submit leads to: a new document, not the old one's live refresh."""
    browser.execute_script("window.keyjobsOldDocument = true;")
    yield
    WebDriverWait(browser, 10, ignored_exceptions=RACING).until(
        lambda driver: driver.execute_script("return window.keyjobsOldDocument === undefined;"))


def press(browser: WebDriver, account: str, action: str) -> None:
    """Press a button of the account's row and wait for the page the view redirects back to."""

    def click(driver: WebDriver) -> bool:
        driver.find_element(By.CSS_SELECTOR, f"#account-{account} button[value='{action}']").click()
        return True

    with new_document(browser):
        WebDriverWait(browser, 10, ignored_exceptions=RACING).until(click)  # found again if a swap took it
    WebDriverWait(browser, 10).until(lambda driver: driver.find_elements(By.ID, "accounts"))


def test_sync_all_four_pressed_twice_runs_eight_calls_one_at_a_time(
        logged_in: WebDriver, provider: Provider) -> None:  # noqa: F811
    browser = logged_in

    press(browser, "acme", "sync-all")
    press(browser, "acme", "sync-all")

    # The row follows the work: never two of acme's calls running at once, and, while they run, one running
    # with the others waiting their turn.
    seen_serial = []

    def row_done() -> bool:
        shown = calls_in_row(browser, "acme")
        running = [call for call in shown if call["phase"] == "running"]
        assert len(running) <= 1, f"two of acme's calls shown running at once: {shown}"
        if running and any(call["phase"] == "waiting" for call in shown):
            seen_serial.append(shown)
            if len(seen_serial) == 1:
                screenshot(browser, "site-accounts-running")
        return len(shown) == 8 and all(call["phase"] == "done" for call in shown)

    wait_for(row_done, timeout=60, what="acme's eight calls shown done", interval=0.1)
    assert seen_serial, "the row showed a call running while the others waited"

    shown = calls_in_row(browser, "acme")
    assert [call["task"] for call in shown] == ["call_keyed"] * 8
    assert not overlaps([(int(call["started"]), int(call["finished"])) for call in shown]), "run one at a time"
    assert_no_script_errors(browser)
    # The provider's own counters: eight calls for acme, never two at once.
    stats = counters(provider)
    assert (stats["calls"], stats["collisions"], stats["accounts"]["acme"]["max_in_flight"]) == (8, 0, 1)
    wait_for(lambda: "8 calls" in browser.find_element(By.CSS_SELECTOR, "[data-live=provider]").text, timeout=10,
             what="the page showing the provider's counters")
    assert "0 collisions" in browser.find_element(By.CSS_SELECTOR, "[data-live=provider]").text
    screenshot(browser, "site-accounts-done")


def test_three_saves_in_the_admin_make_one_refresh(logged_in: WebDriver, site: str, provider: Provider,  # noqa: F811
                                                   settings: Any) -> None:
    browser = logged_in
    # Long enough that three saves, however slow the machine, all come before the refresh is due.
    settings.ACCOUNT_REFRESH_AFTER = 8.0
    acme = Account.objects.get(name="acme")
    browser.get(site + reverse("admin:accounts_account_change", args=[acme.pk]))

    for plan in ("free", "enterprise", "team"):
        browser.find_element(By.CSS_SELECTOR, f"#id_plan option[value='{plan}']").click()
        # The page the admin redirects back to, not the one before the save (which has a message too).
        with new_document(browser):
            browser.find_element(By.NAME, "_continue").click()
        WebDriverWait(browser, 10).until(lambda driver: driver.find_elements(By.CSS_SELECTOR, ".messagelist .success"))

    refresh = Invocation.objects.get(task_name=tasks.refresh_once.name)
    assert Event.objects.filter(invocation=refresh, kind=Event.Kind.REUSED).count() == 2
    refresh.wait(timeout=60)
    refresh.refresh_from_db()
    assert refresh.status == Status.SUCCESS
    assert Invocation.objects.filter(task_name=tasks.refresh_once.name).count() == 1
    stats = counters(provider)
    assert [(call["account"], call["op"]) for call in stats["log"]] == [("acme", "refresh")]
    # The page tells the same: one refresh, two requests merged into it, and the account stamped.
    browser.get(site + reverse("accounts:list"))
    [shown] = calls_in_row(browser, "acme")
    assert (shown["task"], shown["phase"], shown["merged"]) == ("refresh_once", "done", "2")
    assert Account.objects.get(name="acme").last_refreshed_at is not None
