"""System checks for settings that would break keyjobs' guarantees."""

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register
from django.db import connections

from . import registry
from .conf import conf
from .exceptions import TaskDeclarationError, TaskNotFound
from .options import OPTIONS, check_settable, override


@register(Tags.database, Tags.compatibility)
def check_sqlite_for_workers(app_configs: Any = None, databases: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Warn when a SQLite database would make several runner processes unsafe or slow."""
    alias = conf.DATABASE
    if alias not in settings.DATABASES or connections[alias].vendor != "sqlite":
        return []
    return sqlite_warnings(alias, settings.DATABASES[alias].get("OPTIONS", {}))


def sqlite_warnings(alias: str, options: dict[str, Any]) -> list[CheckMessage]:
    """Return the warnings for a SQLite database with these OPTIONS."""
    messages: list[CheckMessage] = []
    if str(options.get("transaction_mode", "")).upper() != "IMMEDIATE":
        messages.append(
            Warning(
                f"DATABASES[{alias!r}] is SQLite without OPTIONS['transaction_mode'] = 'IMMEDIATE'.",
                hint="Runners and delay() then take SQLite's write lock midway through a transaction, "
                "and concurrent ones fail with 'database is locked'. Set 'transaction_mode': 'IMMEDIATE'.",
                id="keyjobs.W001",
            )
        )
    if "journal_mode=wal" not in str(options.get("init_command", "")).lower().replace(" ", ""):
        messages.append(
            Warning(
                f"DATABASES[{alias!r}] is SQLite without WAL journaling.",
                hint="Without WAL, readers (the admin, delay() callers) block runners and the other way round. "
                "Set OPTIONS['init_command'] = 'PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL'.",
                id="keyjobs.W002",
            )
        )
    if float(options.get("timeout", 5)) < 10:
        messages.append(
            Warning(
                f"DATABASES[{alias!r}] is SQLite with a lock timeout under 10 seconds.",
                hint="Several runner processes queue for SQLite's single write lock; set OPTIONS['timeout'] = 20.",
                id="keyjobs.W003",
            )
        )
    return messages


@register(Tags.database, Tags.compatibility)
def check_pool(app_configs: Any = None, databases: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Warn when Django's pool of KEYJOBS_DATABASE is too small for a runner's heartbeat to get a connection."""
    alias = conf.DATABASE
    return pool_warnings(alias, settings.DATABASES.get(alias, {}).get("OPTIONS", {}).get("pool"))


def pool_warnings(alias: str, pool: Any) -> list[CheckMessage]:
    """Return the warnings for a database whose OPTIONS['pool'] is ``pool``."""
    if not pool:
        return []
    options = pool if isinstance(pool, dict) else {}
    # psycopg_pool's defaults: min_size 4, max_size min_size.
    largest = options.get("max_size") or options.get("min_size", 4)
    if largest >= 2:
        return []
    return [Warning(
        f"DATABASES[{alias!r}]['OPTIONS']['pool'] holds at most {largest} connection.",
        hint="A runner's heartbeat then queues for it behind its working threads, and a long task that queries "
             "can hold it past the lease. Set max_size to 2 or more.",
        id="keyjobs.W004",
    )]


#: Settings that must be a number above zero (a size, or a duration in seconds), by the name a project
#: sets; those in ``_MAY_BE_NONE`` may also be None.
_POSITIVE = {
    "KEYJOBS_MAX_VALUE_BYTES": "MAX_VALUE_BYTES",
    "KEYJOBS_INLINE_VALUE_BYTES": "INLINE_VALUE_BYTES",
    "KEYJOBS_POLL_INTERVAL": "POLL_INTERVAL",
    "KEYJOBS_HEARTBEAT_INTERVAL": "HEARTBEAT_INTERVAL",
    "KEYJOBS_LEASE": "LEASE",
    "KEYJOBS_WORKFLOW_MAX_STEPS": "WORKFLOW_MAX_STEPS",
}
_MAY_BE_NONE = frozenset({"POLL_INTERVAL"})
#: Settings that must be a ``timedelta`` above zero: how long the monitor's statistics are kept.
_KEPT_FOR = {"KEYJOBS_ROLLUP_KEEP": "ROLLUP_KEEP", "KEYJOBS_KEY_ROLLUP_KEEP": "KEY_ROLLUP_KEEP"}


@register(Tags.compatibility)
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Refuse keyjobs settings that cannot work: workers would misbehave, not fail."""
    messages: list[CheckMessage] = []
    if conf.DATABASE not in settings.DATABASES:
        messages.append(Error(f"KEYJOBS_DATABASE = {conf.DATABASE!r} is not in DATABASES.", id="keyjobs.E001"))
    listen = conf.LISTEN_DATABASE
    if listen is not None and (listen not in settings.DATABASES or connections[listen].vendor != "postgresql"):
        messages.append(Error(
            f"KEYJOBS_LISTEN_DATABASE = {listen!r} is not a PostgreSQL database in DATABASES.",
            hint="Name the alias of a direct connection to the database that KEYJOBS_DATABASE reaches through "
                 "a pooler: runners LISTEN on it.",
            id="keyjobs.E004",
        ))
    numbers = True
    for name, attribute in _POSITIVE.items():
        value = getattr(conf, attribute)
        if value is None and attribute in _MAY_BE_NONE:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            messages.append(Error(f"{name} = {value!r} must be a number above zero.", id="keyjobs.E002"))
            numbers = False
    for name, attribute in _KEPT_FOR.items():
        value = getattr(conf, attribute)
        if not isinstance(value, timedelta) or value <= timedelta(0):
            messages.append(Error(f"{name} = {value!r} must be a timedelta above zero.",
                                  hint="For example timedelta(days=8): the statistics' minutes older than it are "
                                       "pruned by the rollup duty and prunejobs.", id="keyjobs.E009"))
    limit = conf.RUN_LOG_LIMIT
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        messages.append(Error(f"KEYJOBS_RUN_LOG_LIMIT = {limit!r} must be a whole number, 0 or more.",
                              hint="The most records a run keeps of what it logged; 0 keeps none.",
                              id="keyjobs.E010"))
    if numbers and conf.LEASE < 2 * conf.HEARTBEAT_INTERVAL:
        messages.append(
            Error(
                f"KEYJOBS_LEASE ({conf.LEASE:g}s) must be at least twice KEYJOBS_HEARTBEAT_INTERVAL "
                f"({conf.HEARTBEAT_INTERVAL:g}s).",
                hint="Otherwise one late heartbeat gets a live runner declared lost and its work run twice; "
                     "six heartbeats is the default.",
                id="keyjobs.E003",
            )
        )
    return messages


@register(Tags.compatibility)
def check_task_options(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Refuse KEYJOBS_TASK_OPTIONS that cannot apply: the task would silently run as declared."""
    changed = conf.TASK_OPTIONS
    if not isinstance(changed, Mapping) or not all(isinstance(name, str) for name in changed):
        return [Error(f"KEYJOBS_TASK_OPTIONS = {changed!r} must be a dict of @task options by task name.",
                      hint='For example {"billing.tasks.sync_account": {"running_limit": 5}}.', id="keyjobs.E005")]
    messages: list[CheckMessage] = []
    for name, changes in changed.items():
        try:
            spec = registry.get(name)
        except TaskNotFound as exc:
            messages.append(Error(f"KEYJOBS_TASK_OPTIONS names {name!r}: {exc}.",
                                  hint="Name a task by its name (its dotted path unless it declares name=).",
                                  id="keyjobs.E006"))
            continue
        where = f"KEYJOBS_TASK_OPTIONS[{name!r}]"
        try:
            if isinstance(changes, Mapping):
                check_settable(where, changes)
        except TaskDeclarationError as exc:
            messages.append(Error(f"{exc}.", hint="Settings may change: " + ", ".join(
                option for option, declared in OPTIONS.items() if declared.overridable) + ".", id="keyjobs.E007"))
            continue
        try:
            override(registry.declared(name) or spec, changes)
        except TaskDeclarationError as exc:
            messages.append(Error(f"{exc}.", hint="The task runs as declared until this is fixed.", id="keyjobs.E008"))
    return messages


#: What a project names in TASKS to run django.tasks on keyjobs.
BACKEND_PATH = "keyjobs.backend.KeyjobsBackend"


@register(Tags.compatibility)
def check_tasks_backend_version(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Say plainly that the django.tasks backend needs Django 6.1, where an older Django would ignore TASKS."""
    import django

    if django.VERSION >= (6, 1):
        return []
    tasks = getattr(settings, "TASKS", {})
    aliases = [alias for alias, params in tasks.items() if isinstance(params, dict) and params.get("BACKEND") == BACKEND_PATH]
    return [
        Error(
            f"TASKS[{alias!r}] is {BACKEND_PATH}, which needs Django 6.1 or later; this is Django "
            f"{django.get_version()}, which has no django.tasks and ignores TASKS.",
            hint="Upgrade to Django 6.1, or declare the tasks with @keyjobs.task, which works on this Django too.",
            id="keyjobs.E132",
        )
        for alias in aliases
    ]
