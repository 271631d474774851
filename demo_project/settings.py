"""Settings of the demo site, from the environment (django-environ).

DATABASE_URL picks the database: a SQLite file beside manage.py by default,
or e.g. postgres://postgres@127.0.0.1:5432/keyjobs.
"""

from pathlib import Path

import django
import environ

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env(DEBUG=(bool, True))
environ.Env.read_env(BASE_DIR / ".env")

SECRET_KEY = env("SECRET_KEY", default="django-insecure-keyjobs-demo-only")
DEBUG = env("DEBUG")
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost"])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "keyjobs",
    "demo_project",
    "demo_project.accounts",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "demo_project.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "demo_project.wsgi.application"


def sqlite_for_workers(database: dict) -> dict:
    """Return SQLite settings that let several runner processes share the file safely."""
    if database["ENGINE"].endswith("sqlite3"):
        database.setdefault("OPTIONS", {}).update(
            {
                # Take the write lock at BEGIN, so that two transactions never deadlock upgrading to it.
                "transaction_mode": "IMMEDIATE",
                # WAL: readers never block the writer; NORMAL is durable across application crashes.
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
                "timeout": 20,
            }
        )
    return database


DATABASES = {
    "default": sqlite_for_workers(env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'demo.sqlite3'}")),
}

# Django's connection pool on PostgreSQL, which a runner's threads share: DATABASE_POOL=min,max (e.g. 1,4).
if env("DATABASE_POOL", default="") and DATABASES["default"]["ENGINE"].endswith("postgresql"):
    _low, _high = (int(size) for size in env("DATABASE_POOL").split(","))
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {"min_size": _low, "max_size": _high}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"

# The site's pages are for logged-in users; `manage.py site` creates one and prints its password.
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "accounts:list"
LOGOUT_REDIRECT_URL = "login"

# keyjobs: how often runners heartbeat, and how long a silent one keeps its work.
KEYJOBS_HEARTBEAT_INTERVAL = env.float("KEYJOBS_HEARTBEAT_INTERVAL", default=5.0)
KEYJOBS_LEASE = env.float("KEYJOBS_LEASE", default=6 * KEYJOBS_HEARTBEAT_INTERVAL)
# keyjobs: task options changed at deploy time, as JSON by task name, e.g.
# KEYJOBS_TASK_OPTIONS='{"demo_project.tasks.call_keyed": {"running_limit": 2, "rate_limit": "5/s"}}'.
KEYJOBS_TASK_OPTIONS = env.json("KEYJOBS_TASK_OPTIONS", default={})

# Django's tasks framework (Django 6.1) runs on keyjobs too: `manage.py demo B --api django`.
if django.VERSION >= (6, 1):
    TASKS = {"default": {"BACKEND": "keyjobs.backend.KeyjobsBackend", "QUEUES": ["default"]}}

# Where the demo's tasks reach the provider.
PROVIDER_URL = env("PROVIDER_URL", default="http://127.0.0.1:8765")

# Seconds between a request for an account's refresh (a save, a press of "refresh") and the refresh:
# the window in which further requests merge into the one waiting.
ACCOUNT_REFRESH_AFTER = env.float("ACCOUNT_REFRESH_AFTER", default=2.0)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "keyjobs": {"handlers": ["console"], "level": env("KEYJOBS_LOG_LEVEL", default="INFO")},
        # django.tasks logs every start and end at INFO: the demo's summaries say it better.
        "django.tasks": {"level": "WARNING"},
    },
}
