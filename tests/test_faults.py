"""keyjobs.faults: errors raised by the real databases, classified as a retry can fix them or not."""

import sqlite3
import time

import pytest
from django.db import DatabaseError, IntegrityError, connection, transaction

from keyjobs import faults
from keyjobs.models import Runner
from tests.factories import RunnerFactory


def raised_by(sql, params=()):
    """Return the error the test database raises for ``sql``, in a savepoint so that the test goes on."""
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(sql, params)
    except DatabaseError as exc:
        return exc
    raise AssertionError(f"{sql} did not fail")


@pytest.mark.django_db
@pytest.mark.postgres
@pytest.mark.parametrize(
    ("sqlstate", "transient"),
    [
        ("40001", True),  # serialization_failure
        ("40P01", True),  # deadlock_detected
        ("55P03", True),  # lock_not_available
        ("57P01", True),  # admin_shutdown
        ("57P03", True),  # cannot_connect_now
        ("08006", True),  # connection_failure
        ("22P05", False),  # untranslatable_character
        ("23505", False),  # unique_violation
        ("42703", False),  # undefined_column
    ],
)
def test_postgresql_errors_are_retried_by_their_sqlstate(sqlstate, transient):
    exc = raised_by(f"DO $$ BEGIN RAISE EXCEPTION 'raised' USING ERRCODE = '{sqlstate}'; END $$")
    assert faults.sqlstate(exc) == sqlstate
    assert faults.is_transient(exc) is transient


@pytest.mark.django_db
@pytest.mark.postgres
def test_a_nul_in_json_is_refused_for_good_with_a_reason_a_person_reads():
    exc = raised_by("SELECT %s::jsonb", ['"before\\u0000after"'])
    assert not faults.is_transient(exc)
    assert faults.reason(exc, what="the result").startswith(
        "the result contains a NUL character, which PostgreSQL cannot store in JSON")


@pytest.mark.django_db
@pytest.mark.postgres
def test_a_nul_in_text_is_refused_for_good():
    with pytest.raises(DatabaseError) as caught:
        Runner.objects.create(host="a\x00b", pid=1, threads=1)
    assert not faults.is_transient(caught.value)
    assert "NUL character" in faults.reason(caught.value)


@pytest.mark.django_db(transaction=True)
@pytest.mark.postgres
def test_a_connection_the_server_terminated_is_transient():
    from django.db import connections

    victim = connections.create_connection("default")
    try:
        victim.ensure_connection()
        pid = victim.connection.info.backend_pid
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
        with pytest.raises(DatabaseError) as caught, victim.cursor() as cursor:
            cursor.execute("SELECT 1")
        assert faults.is_transient(caught.value)
    finally:
        victim.close()


def test_a_refused_connection_is_transient():
    import psycopg

    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(host="127.0.0.1", port=1, connect_timeout=2)
    assert faults.sqlstate(caught.value) is None
    assert faults.is_transient(caught.value)


@pytest.mark.django_db(transaction=True)
def test_a_broken_constraint_is_refused_for_good():
    runner = RunnerFactory()
    with pytest.raises(IntegrityError) as caught:
        Runner.objects.create(pk=runner.pk, host="h", pid=1, threads=1)
    assert not faults.is_transient(caught.value)


def sqlite_errors(path):
    """Return a real "database is locked" and a real "no such table" from sqlite3."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN IMMEDIATE")
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        with pytest.raises(sqlite3.OperationalError) as busy:
            other.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(sqlite3.OperationalError) as missing:
            other.execute("SELECT * FROM nowhere")
    finally:
        holder.close()
        other.close()
    return busy.value, missing.value


def test_sqlite_busy_is_transient_and_a_missing_table_is_not(tmp_path):
    busy, missing = sqlite_errors(tmp_path / "db.sqlite3")
    assert faults.is_transient(busy)
    assert not faults.is_transient(missing)


@pytest.mark.sqlite
def test_sqlite_errors_as_django_raises_them_are_classified_by_their_cause(tmp_path):
    from django.db.utils import DatabaseErrorWrapper

    busy, missing = sqlite_errors(tmp_path / "db.sqlite3")
    for error, transient in [(busy, True), (missing, False)]:
        with pytest.raises(DatabaseError) as wrapped, DatabaseErrorWrapper(connection):
            raise error
        assert wrapped.value.__cause__ is error and faults.is_transient(wrapped.value) is transient


def test_what_is_not_a_database_error_is_not_transient():
    assert not faults.is_transient(ValueError("Exceeds the limit (4300 digits) for integer string conversion"))
    assert not faults.is_transient(UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"))


def test_retrying_retries_what_a_retry_can_fix_and_raises_the_rest_at_once(tmp_path):
    busy, missing = sqlite_errors(tmp_path / "db.sqlite3")
    calls = []

    def step(error):
        calls.append(error)
        if len(calls) == 1:
            raise error
        return "landed"

    assert faults.retrying("test", lambda: step(busy), using="default", wait=lambda pause: None) == "landed"
    calls.clear()
    with pytest.raises(sqlite3.OperationalError):
        faults.retrying("test", lambda: step(missing), using="default", wait=lambda pause: None)
    assert calls == [missing]


def test_retrying_gives_up_when_told_to_or_past_its_patience(tmp_path, caplog):
    busy, _ = sqlite_errors(tmp_path / "db.sqlite3")
    pauses = []

    def never():
        raise busy

    tries = iter([True, True, False])
    assert faults.retrying("stop when told", never, using="default", keep_trying=lambda: next(tries),
                           wait=pauses.append) is None
    assert pauses == [0.1, 0.2]  # growing pauses, then it was told to stop
    pauses.clear()
    assert faults.retrying("wait a little", never, using="default", patience=0.25,
                           wait=lambda pause: (pauses.append(pause), time.sleep(pause))) is None
    assert pauses == [0.1]  # 0.1 s slept; another 0.2 s would pass its patience
    assert "gave up trying to wait a little" in caplog.text
