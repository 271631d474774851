"""Test settings: the demo site on the database named by KEYJOBS_TEST_DB (sqlite or postgres).

Worker processes started by the tests get KEYJOBS_TEST_DB_NAME, the name of
the test database the test run created, so that they open that one.
"""

import os
import tempfile

import django

from demo_project.settings import *  # noqa: F403
from demo_project.settings import env, sqlite_for_workers

TEST_DB = os.environ.get("KEYJOBS_TEST_DB", "sqlite")
if TEST_DB not in ("sqlite", "postgres"):
    raise RuntimeError(f"KEYJOBS_TEST_DB={TEST_DB!r}: use sqlite or postgres")

if TEST_DB == "postgres":
    default = env.db_url_config(os.environ.get("KEYJOBS_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/keyjobs"))
else:
    # A file, not :memory:, so that worker processes can open it too.
    path = os.environ.get("KEYJOBS_TEST_SQLITE", os.path.join(tempfile.gettempdir(), f"keyjobs-{os.getuid()}.sqlite3"))
    default = sqlite_for_workers({"ENGINE": "django.db.backends.sqlite3", "NAME": path})
    default["TEST"] = {"NAME": path}

if "KEYJOBS_TEST_DB_NAME" in os.environ:
    default["NAME"] = os.environ["KEYJOBS_TEST_DB_NAME"]

DATABASES = {"default": default}

# What a worker process of a connection test is given (tests/test_connections.py): a name that
# tells its connections apart in pg_stat_activity, Django's pool, or a pooler (PgBouncer in
# transaction mode) with LISTEN on a direct connection.
if "KEYJOBS_TEST_APPLICATION_NAME" in os.environ:
    default.setdefault("OPTIONS", {})["application_name"] = os.environ["KEYJOBS_TEST_APPLICATION_NAME"]
if "KEYJOBS_TEST_POOL" in os.environ:  # "min_size,max_size"
    low, high = (int(size) for size in os.environ["KEYJOBS_TEST_POOL"].split(","))
    default.setdefault("OPTIONS", {})["pool"] = {"min_size": low, "max_size": high}
if "KEYJOBS_TEST_LISTEN_URL" in os.environ:
    listen = env.db_url_config(os.environ["KEYJOBS_TEST_LISTEN_URL"])
    listen["NAME"] = default["NAME"]
    listen["OPTIONS"] = {key: value for key, value in default.get("OPTIONS", {}).items() if key != "pool"}
    listen["TEST"] = {"MIRROR": "default"}
    DATABASES["listen"] = listen
    KEYJOBS_LISTEN_DATABASE = "listen"
    # PgBouncer before 1.21 keeps no prepared statement across transactions, nor a cursor.
    KEYJOBS_PREPARE_STATEMENTS = False
    default["DISABLE_SERVER_SIDE_CURSORS"] = True

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
# Short, so that crash tests recover in seconds; worker processes may be given their own.
KEYJOBS_HEARTBEAT_INTERVAL = float(os.environ.get("KEYJOBS_HEARTBEAT_INTERVAL", 1.0))
KEYJOBS_LEASE = float(os.environ.get("KEYJOBS_LEASE", 6 * KEYJOBS_HEARTBEAT_INTERVAL))

if django.VERSION >= (6, 1):
    TASKS = {
        "default": {"BACKEND": "keyjobs.backend.KeyjobsBackend", "QUEUES": ["default", "reports"]},
        # Another backend, for tests that keyjobs' options are refused there.
        "immediate": {"BACKEND": "django.tasks.backends.immediate.ImmediateBackend", "QUEUES": []},
    }
