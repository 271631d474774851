"""Fault injection for the fault matrix (tests/test_fault_matrix.py): one error, at one statement of one step.

An ``Injector`` is a ``connection.execute_wrapper`` put on every connection of
the process, those that real worker threads open included (``installed()``,
through Django's ``connection_created`` signal). A *step* is what runs while
one of its functions is on the executing thread's stack (``Step``); its
statements are numbered in the order they run, over the step's first
``occurrences`` calls, so that a clean run of a scenario says how many there
are (``Injector(step)`` records them) and a faulted run raises at the n-th
(``Injector(step, Fault(n, ...))``). Nothing is numbered by hand: when a step
gains or loses a statement, the matrix follows.

A fault is raised once, either before the statement reaches the database, or
after its commit with the reply lost: inside a transaction the statement runs
and the error is raised by an ``on_commit`` hook (the commit succeeded, the
caller hears of an error); in autocommit, at once after the statement ran.
The error is transient (``keyjobs.faults.is_transient``: a lost connection, and
on PostgreSQL the connection is really closed under Django) or a refusal (an
error a retry cannot fix).

Transaction control (BEGIN, savepoints) is Django's machinery, not a step's
own statement: it is run, never numbered.
"""

import itertools
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

from django.db import DatabaseError, DataError, OperationalError, connection, connections, transaction
from django.db.backends.signals import connection_created

from keyjobs import current
from keyjobs.models import Event, Invocation, RateToken, Runner, Schedule, Value
from keyjobs.status import FINAL, OWNED
from keyjobs.worker import Worker

_TRANSACTION_CONTROL = re.compile(r"\s*(BEGIN|SAVEPOINT|RELEASE\s+SAVEPOINT|ROLLBACK\s+TO\s+SAVEPOINT)\b", re.I)


@dataclass(frozen=True)
class Step:
    """A step of an invocation's life: the statements run while one of ``functions`` is on the stack."""

    name: str
    functions: tuple[Callable[..., Any], ...]
    #: How many calls of the step are numbered: the first ones, in the order they begin.
    occurrences: int = 1

    @property
    def codes(self) -> frozenset[CodeType]:
        return frozenset(_code_of(function) for function in self.functions)


def _code_of(function: Callable[..., Any]) -> CodeType:
    while hasattr(function, "__wrapped__"):
        function = function.__wrapped__
    return function.__code__  # type: ignore[attr-defined, no-any-return]


@dataclass(frozen=True)
class Fault:
    """Raise at statement ``statement`` (from 1) of the step: before it, or after its commit; transient or not."""

    statement: int
    after: bool
    transient: bool

    def __str__(self) -> str:
        return (f"statement {self.statement}, {'after its commit' if self.after else 'before it'}, "
                f"{'transient' if self.transient else 'refused'}")

    def error(self) -> Exception:
        if self.transient:
            return OperationalError("injected: the connection to the database was lost")
        return DataError("injected: the database refused the statement")


@dataclass(frozen=True)
class Statement:
    """A statement a step ran, as the recording saw it."""

    number: int
    sql: str
    #: The transaction it ran in, numbered from 1 in the order they began (its "after" fault is raised once that
    #: commits); None in autocommit.
    transaction: int | None
    thread: str


class Injector:
    """Number the statements of ``step`` in every thread; raise ``fault`` at its statement, once."""

    def __init__(self, step: Step, fault: Fault | None = None) -> None:
        self.step = step
        self.fault = fault
        self.codes = step.codes
        self.recorded: list[Statement] = []
        #: Where the fault was raised, once it was (for the case's report).
        self.fired: str = ""
        #: The numbered statements that failed of themselves (a busy SQLite database under load): the step was
        #: retried, so the run numbered more statements than a run without them (``clean_recording``).
        self.failed: list[Statement] = []
        self._lock = threading.Lock()
        self._occurrence = 0
        self._numbered = 0
        #: Each thread's current call of the step, by its outermost frame (kept, so that its id is never reused).
        self._calls: dict[int, FrameType] = {}
        #: The outermost atomic blocks of the numbered statements, in order (kept, so that no id is reused).
        self._transactions: list[Any] = []

    def __call__(self, execute: Callable[..., Any], sql: str, params: Any, many: bool, context: dict[str, Any]) -> Any:
        number = self._number(sql)
        if number is None:
            return execute(sql, params, many, context)
        connection = context["connection"]
        statement = Statement(number, sql, self._transaction(connection), threading.current_thread().name)
        self.recorded.append(statement)
        fault = self.fault
        if fault is None or fault.statement != number:
            try:
                return execute(sql, params, many, context)
            except Exception:
                self.failed.append(statement)
                raise
        self.fired = f"{fault} on {threading.current_thread().name}: {_short(sql)}"
        if not fault.after:
            self._lose(connection, fault)
            raise fault.error()
        result = execute(sql, params, many, context)
        if connection.in_atomic_block:
            connection.on_commit(lambda: self._raise_after_commit(connection, fault))
        else:
            self._raise_after_commit(connection, fault)
        return result

    def _number(self, sql: str) -> int | None:
        """Return the statement's number within the step, or None if it is not one of the numbered statements."""
        call = self._outermost_call()
        if call is None or _TRANSACTION_CONTROL.match(sql):
            return None
        thread = threading.get_ident()
        with self._lock:
            if self._calls.get(thread) is not call:
                self._calls[thread] = call
                self._occurrence += 1
            if self._occurrence > self.step.occurrences:
                return None
            self._numbered += 1
            return self._numbered

    def _transaction(self, connection: Any) -> int | None:
        if not connection.in_atomic_block:
            return None
        outermost = connection.atomic_blocks[0]
        with self._lock:
            for number, block in enumerate(self._transactions, 1):
                if block is outermost:
                    return number
            self._transactions.append(outermost)
            return len(self._transactions)

    def _outermost_call(self) -> FrameType | None:
        found = None
        frame: FrameType | None = sys._getframe(2)
        while frame is not None:
            if frame.f_code in self.codes:
                found = frame
            frame = frame.f_back
        return found

    def _raise_after_commit(self, connection: Any, fault: Fault) -> None:
        self._lose(connection, fault)
        raise fault.error()

    @staticmethod
    def _lose(connection: Any, fault: Fault) -> None:
        # A lost connection on PostgreSQL is lost for good: Django finds it closed at its next use, and, as after
        # any error of the driver, closes it at the next close_old_connections(). SQLite's transient errors (a busy
        # database) leave the connection as it was.
        if fault.transient and connection.vendor == "postgresql" and connection.connection is not None:
            connection.connection.close()
            connection.errors_occurred = True

    def forget_calls(self) -> None:
        with self._lock:
            self._calls.clear()
            self._transactions.clear()


def commits(statements: list[Statement]) -> list[Statement]:
    """Return the statements whose "after its commit" faults differ: each one in autocommit, and the last of each
    transaction (a fault after any statement of a transaction is raised at its one commit)."""
    last: dict[int, Statement] = {}
    for statement in statements:
        if statement.transaction is not None:
            last[statement.transaction] = statement
    return [statement for statement in statements
            if statement.transaction is None or last[statement.transaction] is statement]


@contextmanager
def failing_once(pattern: str, *, using: str = "default") -> Iterator[list[str]]:
    """Refuse the first statement of this thread matching ``pattern`` (a regular expression) before it runs.

    Yield the list of statements refused (one at most), for the test to check that the fault was reached.
    """
    refused: list[str] = []

    def refuse(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: dict[str, Any]) -> Any:
        if not refused and re.search(pattern, sql):
            refused.append(sql)
            raise DataError(f"injected: refused {_short(sql)}")
        return execute(sql, params, many, context)

    with connections[using].execute_wrapper(refuse):
        yield refused


def while_the_database_is_away(step: Callable[[], Any], *, within: float, using: str = "default") -> tuple[str, Any]:
    """Run ``step`` in a thread of its own whose every statement fails as a lost connection; return how it ended.

    ("returned", value) or ("raised", exception) if it ended within
    ``within`` seconds; else ("still trying", None), once the database came
    back for it (so that the thread ends).
    """
    back, ended = threading.Event(), []

    def away(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: dict[str, Any]) -> Any:
        if not back.is_set():
            raise OperationalError("injected: the database is away")
        return execute(sql, params, many, context)

    def run() -> None:
        try:
            with connections[using].execute_wrapper(away):
                ended.append(("returned", step()))
        except Exception as exc:
            ended.append(("raised", exc))
        finally:
            connections.close_all()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(within)
    if thread.is_alive():
        back.set()
        thread.join(30)
        return "still trying", None
    return ended[0]


def _short(sql: str, length: int = 90) -> str:
    sql = " ".join(sql.split())
    return sql if len(sql) <= length else sql[: length - 3] + "..."


@contextmanager
def installed(injector: Injector) -> Iterator[Injector]:
    """Put ``injector`` on every connection of this process while the block runs: this thread's and any made later."""
    wrapped: list[Any] = []
    lock = threading.Lock()

    def wrap(connection: Any) -> None:
        with lock:
            if injector not in connection.execute_wrappers:
                connection.execute_wrappers.append(injector)
                wrapped.append(connection)

    def on_created(sender: Any, connection: Any, **kwargs: Any) -> None:
        wrap(connection)

    for existing in connections.all(initialized_only=True):
        wrap(existing)
    wrap(connection)  # this thread's, connected or not
    connection_created.connect(on_created, weak=False, dispatch_uid=id(injector))
    try:
        yield injector
    finally:
        connection_created.disconnect(dispatch_uid=id(injector))
        with lock:
            for each in wrapped:
                while injector in each.execute_wrappers:
                    each.execute_wrappers.remove(injector)
        injector.forget_calls()


# -- real workers in threads ------------------------------------------------------------------------------


#: Seconds before a worker that ended by itself is started again.
RESTART_PAUSE = 0.1


class Workers:
    """Real ``Worker``s, each run in a thread of its own until ``stop()``.

    A worker whose ``run()`` raises, or which stops by itself (declared lost,
    or its threads gave up), is started again, as a process supervisor would
    restart ``runworker``; each such end is noted in ``restarts``.
    """

    def __init__(self, *configs: dict[str, Any]) -> None:
        self.configs = configs
        self.restarts: list[str] = []
        self.current: list[Worker | None] = [None] * len(configs)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._serve, args=(number,), name=f"matrix-worker-{number}",
                                          daemon=True) for number in range(len(configs))]

    def __enter__(self) -> "Workers":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _serve(self, number: int) -> None:
        try:
            while True:
                with self._lock:
                    if self._stopping.is_set():
                        return
                    worker = self.current[number] = Worker(**self.configs[number])
                try:
                    worker.run()
                except Exception as exc:
                    self.restarts.append(f"worker {number} raised {type(exc).__name__}: {exc}")
                else:
                    if self._stopping.is_set():
                        return
                    self.restarts.append(f"worker {number} stopped by itself{' (declared lost)' if worker.lost else ''}"
                                         f"{': ' + worker.stop_reason if worker.stop_reason else ''}")
                # A new process would start with new connections, a moment later.
                connections.close_all()
                self._stopping.wait(RESTART_PAUSE)
        finally:
            connections.close_all()

    def stop(self, timeout: float = 20.0) -> None:
        with self._lock:
            self._stopping.set()
            for worker in self.current:
                if worker is not None:
                    worker.stop()
        deadline = time.monotonic() + timeout
        while any(thread.is_alive() for thread in self._threads) and time.monotonic() < deadline:
            _hang_up_listeners()
            for thread in self._threads:
                thread.join(0.05)
        stuck = [thread.name for thread in self._threads if thread.is_alive()]
        assert not stuck, f"{', '.join(stuck)} did not stop within {timeout:g}s"


def _hang_up_listeners() -> None:
    """Close the LISTEN connections on the test database, so that a stopping runner's listener sees its stop at once.

    It looks at its stop between waits of half a second; the cases of the
    matrix would spend most of their time there.
    """
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                           "AND pid <> pg_backend_pid() AND query LIKE 'LISTEN %%'")


# -- what the tasks of the matrix log, and what is checked after each case ---------------------------------------


@contextmanager
def span(log: str, key: str) -> Iterator[None]:
    """Log the start and the end of what runs inside (its key, the run's invocation), so that overlapping runs show."""
    invocation = current().invocation
    pk = invocation.pk if invocation is not None else 0
    with open(log, "a", buffering=1) as out:
        out.write(f"S {key} {pk} {time.time():.6f}\n")
    try:
        yield
    finally:
        with open(log, "a", buffering=1) as out:
            out.write(f"E {key} {pk} {time.time():.6f}\n")


def log_span(log: str, key: str, hold: float = 0.0) -> None:
    """Log a run that holds its key ``hold`` seconds (``span``)."""
    with span(log, key):
        time.sleep(hold)


@dataclass
class Spans:
    """The runs a case's tasks logged: who started, who ended, and runs of one key that overlapped."""

    started: dict[int, int] = field(default_factory=dict)
    open: set[int] = field(default_factory=set)
    overlaps: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, log: Path) -> "Spans":
        spans = cls()
        running: dict[str, set[int]] = {}
        lines = log.read_text().splitlines() if log.exists() else []
        for line in sorted(lines, key=lambda line: float(line.split()[3])):
            kind, key, pk_text, _ = line.split()
            pk = int(pk_text)
            if kind == "S":
                spans.started[pk] = spans.started.get(pk, 0) + 1
                if running.get(key):
                    spans.overlaps.append(f"a run of #{pk} began while #{', #'.join(map(str, sorted(running[key])))} "
                                          f"of key {key} ran")
                running.setdefault(key, set()).add(pk)
                spans.open.add(pk)
            else:
                running.get(key, set()).discard(pk)
                spans.open.discard(pk)
        return spans


def stranded(log: Path) -> list[str]:
    """Return what is wrong with the invocations now: each one not final, said as what holds it up."""
    spans = Spans.read(log)
    live = set(Runner.objects.alive().values_list("pk", flat=True))
    problems = []
    for invocation in Invocation.objects.exclude(status__in=FINAL).order_by("pk"):
        where = f"#{invocation.pk} ({invocation.task_name.rsplit('.', 1)[-1]} {invocation.running_key or ''})"
        if invocation.status in OWNED:
            if invocation.runner_id in live and invocation.pk not in spans.open:
                problems.append(f"{where} is {invocation.status}, held by live runner {invocation.runner_id} "
                                f"with no run of it in progress")
            else:
                problems.append(f"{where} is still {invocation.status} (runner {invocation.runner_id}"
                                f"{'' if invocation.runner_id in live else ', not alive'})")
        else:
            problems.append(f"{where} is still {invocation.status}")
    return problems


def overlapping(log: Path) -> list[str]:
    return Spans.read(log).overlaps


def reset_database() -> None:
    """Empty keyjobs' tables between the cases of one test (the test's own teardown flushes the rest)."""
    # One transaction: the foreign keys between them are checked at its commit.
    with transaction.atomic(), connection.cursor() as cursor:
        for model in (Event, RateToken, Schedule, Invocation, Runner, Value):
            cursor.execute(f"DELETE FROM {connection.ops.quote_name(model._meta.db_table)}")


def settle(check: Callable[[], list[str]], *, timeout: float, interval: float = 0.05) -> list[str]:
    """Return ``check()`` once it finds nothing wrong, or what it finds after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    for attempt in itertools.count():
        problems = check()
        if not problems or time.monotonic() >= deadline:
            return problems
        time.sleep(interval if attempt else interval / 5)
    raise AssertionError("unreachable")


def clean_recording(step: Step, run: Callable[[Injector], Any], tries: int = 5) -> tuple[Injector, Any]:
    """Return an ``Injector`` that recorded ``run(injector)`` with no statement of ``step`` failing of itself, and
    what the run returned.

    A statement that fails of itself (SQLite busy while the machine is loaded) is retried by the step, so that
    run numbers more statements than a run without the failure: a fault at one of the extra numbers would never
    fire. Such a recording is taken again.
    """
    for _ in range(tries):
        clean = Injector(step)
        returned = run(clean)
        if not clean.failed:
            return clean, returned
    raise AssertionError(f"{step.name}: every clean run had statements fail of themselves: {clean.failed}")


def every_fault(step: Step, setup: Callable[[], Any], act: Callable[[Any], Any]) -> list[Any]:
    """Run ``act`` on a fresh ``setup()`` once for each fault of ``step``'s statements (before each, after each
    commit; transient and refused), then again without a fault, as a caller retries; return what was set up.

    For a step a caller runs in its own thread (a change by hand, a claim): no worker needed.
    """
    def record(clean: Injector) -> None:
        with installed(clean):
            act(setup())

    clean, _ = clean_recording(step, record)
    assert clean.recorded, f"{step.name} ran no statement"
    faults = [Fault(statement.number, after, transient)
              for after, statements in ((False, clean.recorded), (True, commits(clean.recorded)))
              for statement in statements for transient in (True, False)]
    acted = []
    for fault in faults:
        made = setup()
        injector = Injector(step, fault)
        with installed(injector):
            try:
                act(made)
            except DatabaseError:
                pass
            else:
                raise AssertionError(f"{step.name}: {fault} raised nothing")
        assert injector.fired, fault
        connection.close_if_unusable_or_obsolete()
        act(made)
        acted.append(made)
    return acted
