from datetime import timedelta

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


@pytest.mark.parametrize(("name", "value"), [
    ("KEYJOBS_POLL_INTERVAL", -1), ("KEYJOBS_HEARTBEAT_INTERVAL", "5"), ("KEYJOBS_MAX_VALUE_BYTES", 0),
    ("KEYJOBS_MAX_VALUE_BYTES", "1MB"), ("KEYJOBS_HEARTBEAT_INTERVAL", -1), ("KEYJOBS_LEASE", 0),
    ("KEYJOBS_MAX_VALUE_BYTES", True), ("KEYJOBS_WORKFLOW_MAX_STEPS", 0),
])
def test_e002_a_size_or_duration_that_is_not_above_zero(settings, name, value):
    from keyjobs.checks import check_settings

    setattr(settings, name, value)
    [message] = check_settings()
    assert message.id == "keyjobs.E002" and name in message.msg


def test_e002_not_a_poll_interval_of_none(settings):
    settings.KEYJOBS_POLL_INTERVAL = None
    assert error_ids() == []


@pytest.mark.parametrize(("name", "value"), [
    ("KEYJOBS_ROLLUP_KEEP", 8), ("KEYJOBS_KEY_ROLLUP_KEEP", timedelta(0)), ("KEYJOBS_ROLLUP_KEEP", "8 days"),
])
def test_e009_a_statistics_keep_that_is_not_a_timedelta_above_zero(settings, name, value):
    setattr(settings, name, value)
    assert error_ids() == ["keyjobs.E009"]


@pytest.mark.parametrize("value", [-1, 2.5, "200", True])
def test_e010_a_run_log_limit_that_is_not_a_whole_number(settings, value):
    settings.KEYJOBS_RUN_LOG_LIMIT = value
    assert error_ids() == ["keyjobs.E010"]


def test_e009_e010_not_for_the_defaults_nor_a_run_log_limit_of_zero(settings):
    settings.KEYJOBS_RUN_LOG_LIMIT = 0
    settings.KEYJOBS_ROLLUP_KEEP = timedelta(hours=1)
    assert error_ids() == []


@pytest.mark.parametrize(("heartbeat", "lease"), [(5, 8), (5.0, 5.0)])
def test_e003_a_lease_too_short_for_the_heartbeat(settings, heartbeat, lease):
    settings.KEYJOBS_HEARTBEAT_INTERVAL, settings.KEYJOBS_LEASE = heartbeat, lease
    assert error_ids() == ["keyjobs.E003"]


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


def task_option_ids():
    from keyjobs.checks import check_task_options

    return [message.id for message in check_task_options()]


def test_the_task_options_check_is_registered_and_passes_on_the_test_settings():
    from keyjobs.checks import check_task_options

    assert check_task_options in checks.registry.registry.get_checks(include_deployment_checks=False)
    assert check_task_options() == []


def test_task_options_that_apply_pass(settings):
    settings.KEYJOBS_TASK_OPTIONS = {"tests.jobs.keyed": {"running_limit": 4, "rate_limit": "10/s", "timeout": 30}}
    assert task_option_ids() == []


@pytest.mark.parametrize("value", [["tests.jobs.keyed"], {1: {}}, "running_limit=5"])
def test_e005_task_options_that_are_not_a_dict_by_task_name(settings, value):
    settings.KEYJOBS_TASK_OPTIONS = value
    assert task_option_ids() == ["keyjobs.E005"]


def test_e006_task_options_of_an_unknown_task(settings):
    settings.KEYJOBS_TASK_OPTIONS = {"tests.jobs.no_such_task": {"timeout": 5}, "nowhere.task": {}}
    assert task_option_ids() == ["keyjobs.E006", "keyjobs.E006"]


@pytest.mark.parametrize("changes", [{"runing_limit": 2}, {"key_arguments": ["op"]}, {"retry_for": ValueError}])
def test_e007_an_option_that_is_unknown_or_that_settings_may_not_change(settings, changes):
    settings.KEYJOBS_TASK_OPTIONS = {"tests.jobs.keyed": changes}
    from keyjobs.checks import check_task_options

    (message,) = check_task_options()
    assert message.id == "keyjobs.E007" and next(iter(changes)) in message.msg


@pytest.mark.parametrize("changes", [{"running_limit": 0}, {"rate_limit": "fast"}, {"timeout": -1},
                                     {"debounce": 1.0}, "running_limit=2"])
def test_e008_a_value_that_task_would_refuse(settings, changes):
    settings.KEYJOBS_TASK_OPTIONS = {"tests.jobs.keyed": changes}
    from keyjobs.checks import check_task_options

    (message,) = check_task_options()
    assert message.id == "keyjobs.E008" and message.msg.startswith("KEYJOBS_TASK_OPTIONS['tests.jobs.keyed']")
