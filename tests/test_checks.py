from django.core import checks

from keyjobs.checks import check_sqlite_for_workers, sqlite_warnings

GOOD = {"transaction_mode": "IMMEDIATE", "init_command": "PRAGMA journal_mode=WAL;", "timeout": 20}


def ids(options):
    return sorted(message.id for message in sqlite_warnings("default", options))


def test_the_check_is_registered_and_passes_on_the_test_settings():
    assert check_sqlite_for_workers in checks.registry.registry.get_checks(include_deployment_checks=False)
    assert check_sqlite_for_workers() == []


def test_the_recommended_sqlite_settings_pass():
    assert ids(GOOD) == []


def test_w001_without_immediate_transactions():
    assert ids({**GOOD, "transaction_mode": None}) == ["keyjobs.W001"]


def test_w002_without_wal():
    assert ids({**GOOD, "init_command": "PRAGMA synchronous=NORMAL"}) == ["keyjobs.W002"]


def test_wal_is_recognised_with_spaces_and_any_case():
    assert ids({**GOOD, "init_command": "pragma JOURNAL_MODE = wal"}) == []


def test_w003_with_a_short_lock_timeout():
    assert ids({**GOOD, "timeout": 5}) == ["keyjobs.W003"]
    assert ids({k: v for k, v in GOOD.items() if k != "timeout"}) == ["keyjobs.W003"]
