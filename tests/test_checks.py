import pytest
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

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


def error_ids():
    from keyjobs.checks import check_settings

    return sorted(message.id for message in check_settings())


def test_the_default_settings_are_valid():
    assert error_ids() == []


def test_e001_an_unknown_database(settings):
    settings.KEYJOBS_DATABASE = "jobs"
    assert error_ids() == ["keyjobs.E001"]


def test_e002_a_non_positive_interval(settings):
    settings.KEYJOBS_POLL_INTERVAL = -1
    assert error_ids() == ["keyjobs.E002"]
    settings.KEYJOBS_POLL_INTERVAL = None
    settings.KEYJOBS_HEARTBEAT_INTERVAL = "5"
    assert error_ids() == ["keyjobs.E002"]


def test_e003_a_lease_too_short_for_the_heartbeat(settings):
    settings.KEYJOBS_HEARTBEAT_INTERVAL = 5
    settings.KEYJOBS_LEASE = 8
    assert error_ids() == ["keyjobs.E003"]


def test_the_numeric_settings_check_is_registered_and_passes_on_the_test_settings():
    from keyjobs.checks import check_numeric_settings

    assert check_numeric_settings in checks.registry.registry.get_checks(include_deployment_checks=False)
    assert check_numeric_settings() == []


@pytest.mark.parametrize(("name", "value"), [
    ("KEYJOBS_MAX_VALUE_BYTES", 0), ("KEYJOBS_MAX_VALUE_BYTES", "1MB"), ("KEYJOBS_HEARTBEAT_INTERVAL", -1),
    ("KEYJOBS_LEASE", 0), ("KEYJOBS_MAX_VALUE_BYTES", True),
])
def test_e001_a_size_or_duration_that_is_not_above_zero(settings, name, value):
    from keyjobs.checks import check_numeric_settings

    setattr(settings, name, value)
    [message] = check_numeric_settings()
    assert message.id == "keyjobs.E001" and name in message.msg


def test_e002_a_lease_no_longer_than_a_heartbeat(settings):
    from keyjobs.checks import check_numeric_settings

    settings.KEYJOBS_HEARTBEAT_INTERVAL, settings.KEYJOBS_LEASE = 5.0, 5.0
    assert [message.id for message in check_numeric_settings()] == ["keyjobs.E002"]


def test_e004_a_listen_database_that_is_not_a_postgresql_alias(settings):
    settings.KEYJOBS_LISTEN_DATABASE = "direct"
    assert error_ids() == ["keyjobs.E004"]


@pytest.mark.postgres
def test_a_listen_database_naming_a_postgresql_alias_passes(settings):
    settings.KEYJOBS_LISTEN_DATABASE = "default"
    assert error_ids() == []


@pytest.mark.parametrize("pool, warned", [
    (True, False),
    ({"min_size": 1, "max_size": 4}, False),
    ({"min_size": 2}, False),
    ({"min_size": 1}, True),
    ({"min_size": 1, "max_size": 1}, True),
])
def test_w004_a_pool_too_small_for_the_heartbeat(pool, warned):
    from keyjobs.checks import pool_warnings

    assert [message.id for message in pool_warnings("default", pool)] == (["keyjobs.W004"] if warned else [])


def test_the_pool_check_is_registered_and_passes_without_a_pool():
    from keyjobs.checks import check_pool

    assert check_pool in checks.registry.registry.get_checks(include_deployment_checks=False)
    assert check_pool() == []


def test_the_django_tasks_backend_on_an_older_django_is_refused_plainly():
    import django
    from django.test import override_settings

    from keyjobs.checks import check_tasks_backend_version

    assert check_tasks_backend_version in checks.registry.registry.get_checks(include_deployment_checks=False)
    with override_settings(TASKS={"default": {"BACKEND": "keyjobs.backend.KeyjobsBackend"}}):
        messages = check_tasks_backend_version()
    if django.VERSION >= (6, 1):
        assert messages == []
    else:
        (message,) = messages
        assert message.id == "keyjobs.E132" and "needs Django 6.1" in message.msg
        with pytest.raises(ImproperlyConfigured, match=r"needs Django 6\.1 or later"):
            import keyjobs.backend  # noqa: F401
