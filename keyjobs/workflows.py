"""Durable workflows: a workflow's steps are recorded, and its run is replayed from them wherever it resumes.

A workflow (``@workflow``) is an invocation whose function runs again from
the top every time it resumes: after a crash, a sleep, a wait, a retry. Each
call that leaves the function's own memory is a **step**, recorded as a
``Step`` row at its position in the run: a child invocation (``delay()``),
an inline step (``step()``), a value taken once (``now()``, ``uuid4()``,
``random()``), a sleep, a wait for an event, a version marker. A replay
matches each call to the record at its position and reads it back instead of
doing it again; a call that does not match is a divergence (``WorkflowDiverged``).

Each step is recorded in a transaction that holds the workflow's row lock and
checks that this run still owns it; the unique (workflow, position)
constraint is the final arbiter against a step recorded twice. A step whose
reply was lost after its commit finds its record on the retry and takes it.

Where the workflow must wait (a child not final, a sleep not over, an event
not received), its run ends: ``Suspended`` leaves the function, and the
invocation is recorded PAUSED with no owner, holding its key, with
``resume_at`` (when to look again) and ``waiting_on`` (the child). Nothing
holds a thread or a connection meanwhile. A runner thread looking for work
takes a due one (``resume()``) and runs it again.
"""

import logging
import random as _random
import time
import traceback
import uuid as _uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar, cast

from asgiref.sync import sync_to_async
from django.db import IntegrityError, connections, transaction
from django.db.models import DateTimeField, Exists, ExpressionWrapper, OuterRef, Q, Value
from django.db.models.functions import Now
from django.utils import timezone
from django.utils.module_loading import import_string

from . import faults, registry, values
from .conf import conf
from .current import Run, this_run
from .enqueue import enqueue
from .exceptions import (
    Cancelled,
    InvocationCancelled,
    InvocationDropped,
    InvocationFailed,
    NotOwner,
    StepFailed,
    TaskNotFound,
    WaitRefused,
    WorkflowDiverged,
    WorkflowError,
    WorkflowLimitExceeded,
    dotted_path,
)
from .models import Invocation, InvocationQuerySet, Message, Runner, Step
from .status import FINAL, Status, change
from .store import LockedRow, store
from .transitions import apply_locked
from .waits import REFRESHED, cycle

if TYPE_CHECKING:
    from .spec import Options

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: A child's outcomes that end a workflow's run when read (``.result`` raises): a retry creates the child again.
_CHILD_FAILURES = (InvocationFailed, InvocationCancelled, InvocationDropped)


class Suspended(BaseException):
    """Raised inside a workflow's run where it must wait: its run ends, and it is recorded suspended.

    A ``BaseException``, so that ``except Exception`` in the workflow's code
    does not swallow it.
    """

    def __init__(self, why: str, *, waiting_on: int | None = None, resume_at: datetime | None = None,
                 event: str | None = None) -> None:
        super().__init__(why)
        self.why, self.waiting_on, self.resume_at, self.event = why, waiting_on, resume_at, event


# -- the replay of one run ----------------------------------------------------------------


class Replay:
    """One run of a workflow: the steps recorded so far, and the position the run has reached."""

    def __init__(self, invocation: Invocation, runner: Runner, *, using: str, thread: int | None) -> None:
        self.invocation, self.runner, self.using, self.thread = invocation, runner, using, thread
        self.position = 0
        self._recorded: dict[int, Step] | None = None
        #: Inside an inline step's function: a workflow call there could not be placed in the run's order.
        self.inside_step = False
        #: What ended the run that the workflow's code may have caught (a divergence, a suspension, a cancel).
        self.stopped: BaseException | None = None
        #: The exception the last failed step raised in this run, to know whether it ended the run.
        self._failed: tuple[int, BaseException | None] | None = None

    @property
    def name(self) -> str:
        return f"workflow #{self.invocation.pk} of {self.invocation.task_name}"

    # -- running the function

    def run(self, func: Callable[..., T], args: list[Any], kwargs: dict[str, Any]) -> T:
        """Call the workflow's function; re-raise what ended the run even if its code caught it."""
        try:
            value = func(*args, **kwargs)
        except BaseException as exc:
            if self.stopped is not None and exc is not self.stopped:
                raise self.stopped from exc
            if not isinstance(exc, Suspended | WorkflowError | Cancelled | NotOwner):
                self._forget_failed_step(exc)
            raise
        if self.stopped is not None:
            raise self.stopped
        return value

    def _forget_failed_step(self, exc: BaseException) -> None:
        """Mark the step whose failure ended the run as ending it: the run's next attempt runs that step again."""
        if self._failed is None:
            return
        position, raised = self._failed
        if raised is None and not isinstance(exc, _CHILD_FAILURES):
            return
        if raised is not None and raised is not exc and exc.__context__ is not raised:
            return
        try:
            with store(self.using).writing(), transaction.atomic(using=self.using):
                self._lock_owned()
                Step.objects.using(self.using).filter(workflow_id=self.invocation.pk, position=position).update(
                    state=Step.State.ENDED_RUN)
        except Exception:
            # The next attempt then reads the failure again: slower to recover, never a wrong result.
            logger.exception("could not mark step %s of %s as ending its run", position, self.name,
                             extra=self.invocation.log_extra())

    # -- matching a call to its record

    def _steps(self) -> dict[int, Step]:
        if self._recorded is None:
            self._recorded = {step.position: step for step in Step.objects.using(self.using)
                              .filter(workflow_id=self.invocation.pk).select_related("child")}
        return self._recorded

    def _take(self, kind: str, name: str) -> tuple[int, Step | None]:
        """Return the next position and its record (None: not recorded yet, or to run again); check it matches."""
        if self.stopped is not None:
            raise self.stopped
        if self.inside_step:
            raise WorkflowError(f"{self.name}: {kind.lower()} called inside an inline step's function; a step "
                                "cannot hold steps (call it from the workflow's own code)")
        if connections[self.using].in_atomic_block:
            raise WorkflowError(f"{self.name}: a step inside transaction.atomic(): its record would not be durable "
                                "until the block commits; call it outside the block")
        position = self.position
        self._failed = None
        if position >= conf.WORKFLOW_MAX_STEPS:
            raise self._stop(WorkflowLimitExceeded(
                f"{self.name} passed its cap of {conf.WORKFLOW_MAX_STEPS} steps (KEYJOBS_WORKFLOW_MAX_STEPS)"))
        recorded = self._steps().get(position)
        if recorded is not None:
            self._check(recorded, kind, name)
            if recorded.state == Step.State.ENDED_RUN:
                recorded = None
        self.position += 1
        return position, recorded

    def _check(self, recorded: Step, kind: str, name: str) -> None:
        if (recorded.kind, recorded.name) != (kind, name):
            raise self._stop(WorkflowDiverged(
                f"{self.name} diverged at step {recorded.position}: recorded {_label(recorded.kind, recorded.name)}, "
                f"asked for {_label(kind, name)} (its code changed under it: see wf.patched())"))

    def _stop(self, exc: BaseException) -> BaseException:
        self.stopped = exc
        return exc

    # -- recording

    def _lock_owned(self) -> None:
        """Lock the workflow's row; NotOwner unless this run still owns it, Cancelled if its cancel was asked."""
        invocations = Invocation.objects.using(self.using).filter(pk=self.invocation.pk)
        row = invocations.locked().values_list("status", "runner_id", "cancel_requested", "recoveries").first()
        if row is None or row[0] != Status.RUNNING or row[1] != self.runner.pk:
            raise self._stop(NotOwner(f"{self.name} was taken from {self.runner} while it ran"))
        if row[2]:
            raise self._stop(Cancelled(f"{self.name} was cancelled: stopped at its step {self.position}"))
        if row[3]:
            # Deaths count against the step in progress (``max_recoveries``, a poison pill): a step recorded is
            # progress, and a workflow's life may cross many deploys.
            invocations.update(recoveries=0)

    def _write(self, position: int, kind: str, name: str, build: Callable[[], Step]) -> Step:
        """Record the step at ``position`` with ``build()``, once; return the record, this run's or one found there.

        A record found at the position (the unique constraint's arbiter, or
        this run's own write whose reply was lost) is taken as it is, if it matches.
        """
        steps = Step.objects.using(self.using)

        def record() -> Step:
            recorded = steps.filter(workflow_id=self.invocation.pk, position=position).first()
            if recorded is None or recorded.state == Step.State.ENDED_RUN:
                if recorded is not None:
                    recorded.delete()
                recorded = build()
            return recorded

        recorded = self._locked(f"record step {position}", record)
        self._check(recorded, kind, name)
        self._steps()[position] = recorded
        return recorded

    def _locked(self, what: str, work: Callable[[], T]) -> T:
        """Return ``work()`` run in one transaction that holds the workflow's row lock and checks this run owns it.

        Retried (``faults.retrying``) across what a retry can fix, a reply lost after the commit included (the
        work must find what it did), for as long as a lease: past it the runner may be declared lost and the run
        is not its own any more (NotOwner). A lost race at a constraint is looked at again, once.
        """
        raced: list[BaseException] = []

        def attempt() -> T:
            with store(self.using).writing(), transaction.atomic(using=self.using):
                self._lock_owned()
                return work()

        def again(exc: BaseException) -> bool:
            if isinstance(exc, IntegrityError):
                raced.append(exc)  # written meanwhile: the next look finds it
                return len(raced) == 1
            return faults.is_transient(exc)

        done = faults.retrying(f"{what} of {self.name}", attempt, using=self.using, patience=conf.LEASE,
                               retry_for=again)
        if done is None:
            raise self._stop(NotOwner(f"{self.name} could not {what} for a lease: its run is not its own any more"))
        return done

    def _new(self, position: int, kind: str, name: str, **fields: Any) -> Step:
        return Step.objects.using(self.using).create(workflow_id=self.invocation.pk, position=position, kind=kind,
                                                     name=name, **fields)

    # -- the steps

    def child(self, options: "Options", args: tuple[Any, ...], kwargs: dict[str, Any]) -> Invocation:
        """Return the child invocation at this position: created (once) the first time, read back on a replay."""
        name = options.task.name
        position, recorded = self._take(Step.Kind.CHILD, name)
        if recorded is None:
            recorded = self._write(position, Step.Kind.CHILD, name, lambda: self._new(
                position, Step.Kind.CHILD, name, child=enqueue(options, args, kwargs)))
        if recorded.child_id is None:
            raise self._stop(WorkflowError(f"{self.name}: the child of step {position} was deleted"))
        child = recorded.child if recorded.child is not None else (
            Invocation.objects.using(self.using).get(pk=recorded.child_id))
        child.unfinished = self._unfinished
        self._note_child(position, child)
        return child

    def _note_child(self, position: int, child: Invocation) -> None:
        if child.status in FINAL and child.status != Status.SUCCESS:
            self._failed = (position, None)

    def _unfinished(self, invocation: Invocation) -> BaseException:
        """Return what a child's ``.result`` raises while it is not final: the suspension of the run until it is."""
        return self._wait_on(invocation)

    def wait(self, invocation: Invocation, timeout: float | None) -> str:
        """``invocation.wait()`` inside a workflow: its status if final, else the run suspends until it is."""
        if timeout is not None:
            raise WorkflowError(f"{self.name}: a wait with a timeout inside a workflow; a workflow's wait is durable "
                                "and has none (use wf.wait_for_event(..., timeout=...) for a deadline)")
        invocation.refresh_from_db(using=self.using, fields=REFRESHED)
        if invocation.is_final:
            return invocation.status
        raise self._wait_on(invocation)

    def _wait_on(self, invocation: Invocation) -> BaseException:
        if invocation.pk == self.invocation.pk:
            return self._stop(WaitRefused(f"{self.name} waits on itself: it would never end"))
        found = cycle(self.invocation, invocation, using=self.using)
        if found is not None:
            return self._stop(WaitRefused(f"wait cycle: {found}; {self.name} would wait for ever (a child of its "
                                          "own key waits behind it)"))
        return self._stop(Suspended(f"waits for #{invocation.pk}", waiting_on=invocation.pk))

    def step(self, func: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        """Run ``func`` inline once; return its stored value (or raise its stored exception) on every replay."""
        name = _name_of(func)
        position, recorded = self._take(Step.Kind.STEP, name)
        if recorded is None:
            began = time.monotonic()
            self.inside_step = True
            try:
                value = func(*args, **kwargs)
                values.check_result(value, where=f"step {position} ({name}) of {self.name}")
            except Suspended:
                raise
            except BaseException as exc:
                failure = _failure(exc)
                recorded = self._write(position, Step.Kind.STEP, name, lambda: self._new(
                    position, Step.Kind.STEP, name, state=Step.State.RAISED, duration=time.monotonic() - began,
                    finished_at=Now(), **failure))
                rebuilt = _rebuilt(recorded)
                if isinstance(rebuilt, StepFailed) and not isinstance(exc, StepFailed):
                    # A replay could only raise StepFailed here: so does this run, for try/except to behave alike.
                    self._failed = (position, rebuilt)
                    raise rebuilt from exc
                self._failed = (position, exc)
                raise
            finally:
                self.inside_step = False
            recorded = self._write(position, Step.Kind.STEP, name, lambda: self._new(
                position, Step.Kind.STEP, name, value=value, duration=time.monotonic() - began, finished_at=Now()))
        return cast(T, self._outcome(recorded))

    def _outcome(self, recorded: Step) -> Any:
        if recorded.state != Step.State.RAISED:
            return recorded.value
        exc = _rebuilt(recorded)
        self._failed = (recorded.position, exc)
        raise exc

    def value(self, kind: str, make: Callable[[], Any]) -> Any:
        """Return the value recorded at this position; taken with ``make()`` the first time."""
        position, recorded = self._take(kind, "")
        if recorded is None:
            made = make()
            recorded = self._write(position, kind, "", lambda: self._new(position, kind, "", value=made,
                                                                         finished_at=Now()))
        return recorded.value

    def patched(self, marker: str) -> bool:
        """Return whether this run takes the patched code at ``marker`` (see ``patched()``)."""
        if self.stopped is not None:
            raise self.stopped
        recorded = self._steps().get(self.position)
        if recorded is not None and (recorded.kind, recorded.name) != (Step.Kind.VERSION, marker):
            return False  # recorded before the patch: the old code goes on, and takes no position
        position, recorded = self._take(Step.Kind.VERSION, marker)
        if recorded is None:
            self._write(position, Step.Kind.VERSION, marker, lambda: self._new(
                position, Step.Kind.VERSION, marker, finished_at=Now()))
        return True

    def sleep(self, duration: timedelta) -> None:
        """Suspend the run until ``duration`` after the first time this position was reached (the database's clock)."""
        position, recorded = self._take(Step.Kind.SLEEP, "")
        if recorded is None:
            recorded = self._write(position, Step.Kind.SLEEP, "", lambda: self._due(self._new(
                position, Step.Kind.SLEEP, "", state=Step.State.WAITING, due_at=_after(duration))))
        if recorded.state == Step.State.DONE:
            return
        if Step.objects.using(self.using).filter(pk=recorded.pk, due_at__lte=Now()).update(
                state=Step.State.DONE, finished_at=Now()):
            recorded.state = Step.State.DONE
            return
        raise self._stop(Suspended(f"sleeps until {recorded.due_at:%Y-%m-%d %H:%M:%S}", resume_at=recorded.due_at))

    def _due(self, step: Step) -> Step:
        step.refresh_from_db(using=self.using, fields=["due_at"])
        return step

    def wait_for_event(self, name: str, timeout: timedelta | None) -> Any:
        """Return the payload of the first message ``name`` sent to the workflow, or None once ``timeout`` passed."""
        position, recorded = self._take(Step.Kind.EVENT, name)
        if recorded is None:
            def build() -> Step:
                step = self._due(self._new(position, Step.Kind.EVENT, name, state=Step.State.WAITING,
                                           due_at=None if timeout is None else _after(timeout)))
                self._receive(step)
                return step

            recorded = self._write(position, Step.Kind.EVENT, name, build)
        if recorded.state == Step.State.WAITING:
            recorded = self._steps()[position] = self._locked(f"receive step {position}", lambda: self._receive(
                Step.objects.using(self.using).get(workflow_id=self.invocation.pk, position=position)))
        if recorded.state == Step.State.WAITING:
            raise self._stop(Suspended(f"waits for the event {name!r}", resume_at=recorded.due_at, event=name))
        return recorded.value

    def _receive(self, step: Step) -> Step:
        """Give ``step`` its message if one was sent, or None past its deadline; call holding the workflow's lock."""
        if step.state != Step.State.WAITING:
            return step
        message = (Message.objects.using(self.using).filter(workflow_id=self.invocation.pk, name=step.name,
                                                            step__isnull=True).order_by("id").first())
        if message is not None:
            message.step = step
            message.save(update_fields=["step"])
            step.value, step.state = message.payload, Step.State.DONE
        elif step.due_at is not None and Step.objects.using(self.using).filter(pk=step.pk, due_at__lte=Now()).exists():
            step.value, step.state = None, Step.State.DONE
        else:
            return step
        step.finished_at = timezone.now()
        step.save(update_fields=["value", "state", "finished_at"])
        return step

    # -- suspending

    def suspend(self, suspended: Suspended) -> bool:
        """Record the run suspended: PAUSED with no owner, holding its key; False if this runner lost it.

        Read under the row lock: a child final meanwhile, or a message sent
        meanwhile (``send()`` takes the same lock), makes it due at once.
        """
        using = self.using
        with store(using).writing(), transaction.atomic(using=using):
            rows = store(using).lock_rows([self.invocation.pk])
            if rows and rows[0].status == Status.PAUSED and rows[0].runner_id is None:
                # Suspended already: this suspension, whose reply was lost after its commit.
                self.invocation.status = Status.PAUSED
                return True
            resume_at: Any = suspended.resume_at
            if suspended.waiting_on is not None and Invocation.objects.using(using).filter(
                    pk=suspended.waiting_on, status__in=FINAL).exists():
                resume_at = Now()
            if suspended.event is not None and Message.objects.using(using).filter(
                    workflow_id=self.invocation.pk, name=suspended.event, step__isnull=True).exists():
                resume_at = Now()
            made = change(Status.PAUSED, runner_id=self.runner.pk, thread=self.thread,
                          note=f"suspended: {suspended.why}",
                          values={"runner_id": None, "runner_thread": None, "waiting_on": suspended.waiting_on,
                                  "resume_at": resume_at})
            try:
                moved = apply_locked(rows, made, using=using, only_from={Status.RUNNING}, owner=self.runner)
            except NotOwner:
                return False
        if moved:
            self.invocation.status = Status.PAUSED
        return bool(moved)


def replay_for(invocation: Invocation, runner: Runner, *, using: str, thread: int | None) -> Replay | None:
    """Return the replay of a run of ``invocation`` if its task is a workflow, else None."""
    try:
        if not registry.get(invocation.task_name).workflow:
            return None
    except TaskNotFound:
        return None  # its run fails for it (``execute.call``)
    return Replay(invocation, runner, using=using, thread=thread)


# -- resuming -------------------------------------------------------------------------------


def suspended() -> InvocationQuerySet:
    """Return the suspended workflows: PAUSED, owned by no runner."""
    return Invocation.objects.filter(status=Status.PAUSED, runner__isnull=True)


def resume(runner: Runner, *, using: str, queues: list[str], thread: int | None) -> Invocation | None:
    """Take a suspended workflow that is due (its time came, or what it waits on is final): RUNNING, this runner's.

    The run goes on as the same attempt (``change(resumed=True)``). Rows
    another runner is resuming are skipped. Call it from a runner thread that
    runs nothing: if the reply of the resume is lost after its commit, the
    workflow it took is found again as this thread's (RUNNING, owned by
    ``runner`` and ``thread``), and returned to be run.
    """
    try:
        return _resume(runner, using=using, queues=queues, thread=thread)
    except Exception as exc:
        connections[using].close()
        mine = _taken_by(runner, thread, using=using, until=time.monotonic() + conf.LEASE)
        if mine is None:
            raise
        logger.warning("the resume of workflow #%s was recorded though its reply was lost (%s); it runs", mine.pk,
                       exc, extra=mine.log_extra())
        return mine


def _resume(runner: Runner, *, using: str, queues: list[str], thread: int | None) -> Invocation | None:
    due = suspended().using(using).filter(Q(resume_at__lte=Now()) | Q(waiting_on__status__in=sorted(FINAL)))
    if queues:
        due = due.filter(queue__in=queues)
    # A look first, outside a transaction: most looks find nothing, and SQLite's transaction would take its write lock.
    if not due.exists():
        return None
    with store(using).writing(), transaction.atomic(using=using):
        if not store(using).may_claim(runner.pk):
            return None  # declared lost: what it took now, no recovery would find (a claim's rule)
        invocation = due.order_by("-priority", "id").locked(skip_locked=True).first()
        return None if invocation is None else _take(invocation, runner, using=using, thread=thread)


def _take(invocation: Invocation, runner: Runner, *, using: str, thread: int | None) -> Invocation | None:
    """Make a suspended workflow whose row lock the caller holds RUNNING, ``runner``'s ``thread``'s."""
    made = change(Status.RUNNING, resumed=True, owner_id=runner.pk, thread=thread, slot=invocation.slot,
                  values={"waiting_on": None, "resume_at": None}, note="resumed")
    if not apply_locked([LockedRow(invocation.pk, invocation.status, None)], made, using=using,
                        only_from={Status.PAUSED}):
        return None
    invocation.status, invocation.runner_id, invocation.runner_thread = Status.RUNNING, runner.pk, thread
    invocation.waiting_on_id, invocation.resume_at = None, None
    return invocation


def _taken_by(runner: Runner, thread: int | None, *, using: str, until: float) -> Invocation | None:
    """Return the invocation RUNNING as ``runner``'s ``thread``, asked again across outages until ``until``."""
    pause = 0.1
    while True:
        try:
            return (Invocation.objects.using(using)
                    .filter(status=Status.RUNNING, runner=runner, runner_thread=thread).first())
        except Exception as exc:
            if not faults.is_transient(exc) or time.monotonic() + pause > until:
                raise
            connections[using].close()
            time.sleep(pause)
            pause = min(pause * 2, 5.0)


def any_due(*, using: str, queues: list[str]) -> bool:
    """Return whether a suspended workflow is due now."""
    due = suspended().using(using).filter(Q(resume_at__lte=Now()) | Q(waiting_on__status__in=sorted(FINAL)))
    return (due.filter(queue__in=queues) if queues else due).exists()


class Resumes:
    """When a runner's threads look for suspended workflows to resume: only in a process that declares workflows,
    before a claim at most every ``interval`` seconds (so that a busy queue cannot starve them), and whenever a
    claim found nothing or a hint came (a child final, an event sent)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.hinted = True
        self.last = float("-inf")
        self._generation = -1
        self._declared = False

    def hint(self) -> bool:
        """Something a suspended workflow may wait for happened: look at the next chance; False if none is declared."""
        self.hinted = True
        return self.declared()

    def declared(self) -> bool:
        """Return whether this process declares a workflow."""
        if registry.generation() != self._generation:
            self._generation = registry.generation()
            self._declared = any(spec.workflow for spec in registry.all_tasks().values())
        return self._declared

    def due(self, *, idle: bool) -> bool:
        """Return whether to look now; ``idle``: the thread's claim found nothing.

        A process that declares no workflow never looks: a runner imports its
        project's workflows with its tasks (``tasks.py``, autodiscovered).
        """
        if not self.declared():
            return False
        now = time.monotonic()
        looks = idle or self.hinted or now - self.last >= self.interval
        if looks:
            self.hinted, self.last = False, now
        return looks


# -- messages --------------------------------------------------------------------------------


def send(workflow: Invocation | int, name: str, payload: Any = None, *, idempotency_key: str | None = None,
         using: str | None = None) -> Message:
    """Send a message ``name`` to a workflow: its ``wait_for_event(name)`` returns ``payload``, before or after it waits.

    Joins the caller's transaction (the message is sent when it commits).
    Holds the workflow's row lock until then, so that a workflow about to
    suspend sees it. The messages of a name are taken one per wait, oldest first.

    With an ``idempotency_key``, a send asked again (its reply lost, the
    caller retrying) makes no second message: it returns the first one sent
    to this workflow with that key, as it was sent.
    """
    using = using or conf.DATABASE
    pk = workflow if isinstance(workflow, int) else workflow.pk
    if not isinstance(name, str) or not name or len(name) > 200:
        raise WorkflowError(f"send(): the event's name must be a non-empty string of at most 200 characters, "
                            f"not {name!r}")
    if idempotency_key is not None and (not isinstance(idempotency_key, str) or not idempotency_key
                                        or len(idempotency_key) > 200):
        raise WorkflowError(f"send({name!r}): the idempotency_key must be a non-empty string of at most 200 "
                            f"characters (or None), not {idempotency_key!r}")
    values.check(payload, where=f"send({name!r}) to #{pk}", path="payload", kind="payload")
    messages = Message.objects.using(using)
    with transaction.atomic(using=using):
        row = Invocation.objects.using(using).filter(pk=pk).locked().values_list("task_name", "queue").first()
        if row is None:
            raise WorkflowError(f"send({name!r}): there is no invocation #{pk}")
        task_name, queue = row
        if registry.is_registered(task_name) and not registry.get(task_name).workflow:
            raise WorkflowError(f"send({name!r}): #{pk} is an invocation of {task_name}, which is a task, "
                                "not a workflow")
        if idempotency_key is not None:
            sent = messages.filter(workflow_id=pk, idempotency_key=idempotency_key).first()
            if sent is not None:
                return sent
        try:
            with transaction.atomic(using=using):
                message = messages.create(workflow_id=pk, name=name, payload=payload, idempotency_key=idempotency_key)
        except IntegrityError:
            # Sent meanwhile with the same key, where the row lock did not keep the two sends apart.
            sent = messages.filter(workflow_id=pk, idempotency_key=idempotency_key).first()
            if idempotency_key is None or sent is None:
                raise
            return sent
        waiting = Step.objects.using(using).filter(workflow_id=OuterRef("pk"), kind=Step.Kind.EVENT,
                                                   state=Step.State.WAITING, name=name)
        if suspended().using(using).filter(pk=pk).filter(Exists(waiting)).update(resume_at=Now()):
            store(using).notify(queue)
    return message


async def asend(workflow: Invocation | int, name: str, payload: Any = None, *, idempotency_key: str | None = None,
                using: str | None = None) -> Message:
    """Return ``send()`` from async code (an async view): it runs in Django's thread for sync code."""
    return await sync_to_async(send)(workflow, name, payload, idempotency_key=idempotency_key, using=using)


# -- the calls a workflow makes --------------------------------------------------------------


def _replay(call: str) -> Replay | None:
    run: Run | None = this_run()
    if run is None:
        return None
    if run.workflow is None:
        raise WorkflowError(f"wf.{call}() inside {run.invocation.task_name}, a task: only a @workflow records steps")
    return run.workflow


def step(func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run ``func(*args, **kwargs)`` as a step: once; every replay gets its stored return value or exception.

    Outside a workflow's run (the function called directly) it just calls ``func``.
    """
    replay = _replay("step")
    if replay is None:
        return func(*args, **kwargs)
    return replay.step(func, args, kwargs)


def now() -> datetime:
    """Return the time, taken once and the same on every replay (aware, UTC)."""
    replay = _replay("now")
    if replay is None:
        return timezone.now()
    return datetime.fromisoformat(replay.value(Step.Kind.NOW, lambda: timezone.now().isoformat()))


def uuid4() -> _uuid.UUID:
    """Return a random UUID, taken once and the same on every replay."""
    replay = _replay("uuid4")
    if replay is None:
        return _uuid.uuid4()
    return _uuid.UUID(replay.value(Step.Kind.UUID, lambda: str(_uuid.uuid4())))


def random() -> float:
    """Return a random float in [0, 1), taken once and the same on every replay."""
    replay = _replay("random")
    if replay is None:
        return _random.random()
    return float(replay.value(Step.Kind.RANDOM, _random.random))


def sleep(duration: timedelta | float) -> None:
    """Sleep durably: the run suspends (holding no thread) and resumes once ``duration`` has passed.

    Measured from the first time the workflow reached this call, on the
    database's clock: a replay does not sleep again. Only inside a workflow.
    """
    replay = _replay("sleep")
    if replay is None:
        raise WorkflowError("wf.sleep() outside a workflow's run: it suspends a workflow; use time.sleep() elsewhere")
    replay.sleep(_duration(duration, "sleep"))


def wait_for_event(name: str, timeout: timedelta | float | None = None) -> Any:
    """Return the payload of the message ``name`` sent to this workflow (``send()``); None once ``timeout`` passed.

    The run suspends meanwhile, holding no thread. A message sent before the
    workflow reached this call is waiting for it. Only inside a workflow.
    """
    replay = _replay("wait_for_event")
    if replay is None:
        raise WorkflowError("wf.wait_for_event() outside a workflow's run: only a workflow receives events")
    return replay.wait_for_event(name, None if timeout is None else _duration(timeout, "wait_for_event"))


def patched(marker: str) -> bool:
    """Return True where a workflow runs the patched code at ``marker``, False for one that ran past it before.

    Change a workflow in flight like this::

        if wf.patched("send-receipt"):
            wf.step(send_receipt, order_id)     # the new code

    A workflow that reached this point before the change has another step
    recorded here: it gets False and goes on as the old code did. Once no
    such workflow is left, the old branch can go (keep the ``patched()`` call).
    """
    replay = _replay("patched")
    if replay is None:
        return True
    return replay.patched(marker)


def _duration(value: timedelta | float, call: str) -> timedelta:
    if isinstance(value, timedelta):
        duration = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        duration = timedelta(seconds=value)
    else:
        raise WorkflowError(f"wf.{call}(): a duration is a timedelta or seconds, not {value!r}")
    if duration < timedelta(0):
        raise WorkflowError(f"wf.{call}(): a duration cannot be negative ({value!r})")
    return duration


def _after(duration: timedelta) -> Any:
    """Return the database's time ``duration`` from now, as an expression."""
    return ExpressionWrapper(Now() + Value(duration), output_field=DateTimeField())


def _name_of(func: Callable[..., Any]) -> str:
    try:
        name = dotted_path(func)
    except AttributeError:
        name = type(func).__qualname__
    return name[:200]


def _label(kind: str, name: str) -> str:
    return f"{Step.Kind(kind).label.lower()} {name}".rstrip() if kind in Step.Kind.values else kind


def _failure(exc: BaseException) -> dict[str, Any]:
    """Return the fields that store a step's exception, and its arguments where JSON holds them."""
    try:
        message = str(exc)
    except Exception:
        message = "(its message could not be read)"
    args: Any = list(exc.args)
    try:
        values.check(args, where="a step's exception", path="args", kind="exception")
    except Exception:
        args = None
    return {"error": values.storable_text(message), "error_type": values.storable_text(dotted_path(type(exc)), limit=255),
            "error_args": args, "traceback": values.storable_text(traceback.format_exc())}


def _rebuilt(recorded: Step) -> BaseException:
    """Return the stored exception of a step, rebuilt as its own class where it can be, else ``StepFailed``."""
    try:
        cls = import_string(recorded.error_type)
        if isinstance(cls, type) and issubclass(cls, BaseException) and recorded.error_args is not None:
            exc = cls(*recorded.error_args)
            if isinstance(exc, BaseException):
                return exc
    except Exception:
        pass
    return StepFailed(f"{recorded.error_type}: {recorded.error}", error_type=recorded.error_type)
