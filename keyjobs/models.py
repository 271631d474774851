"""Invocations, their history, and the runners that execute them.

The two partial unique constraints on Invocation are the final arbiter of the
per-key rules: whatever the application code does, the database refuses a
second owned invocation of a running key, and a second waiting invocation of a
registration key.
"""

from datetime import timedelta
from typing import Any

from django.db import connections, models
from django.db.models import Q
from django.db.models.functions import Now
from django.utils.translation import gettext_lazy as _

from .concurrency import key_label
from .conf import conf
from .exceptions import InvocationCancelled, InvocationDropped, InvocationFailed, InvocationNotFinished
from .status import FINAL, OWNED, WAITING, Status


class InvocationQuerySet(models.QuerySet["Invocation"]):
    def locked(self, *, skip_locked: bool = False) -> "InvocationQuerySet":
        """Lock the rows for the current transaction: FOR NO KEY UPDATE where the database has it.

        Status changes never touch the primary key, so the weaker lock lets
        Event rows be inserted against a locked invocation meanwhile.
        """
        no_key = connections[self.db].features.has_select_for_no_key_update
        return self.select_for_update(skip_locked=skip_locked, of=("self",), no_key=no_key)

    def waiting(self) -> "InvocationQuerySet":
        return self.filter(status__in=WAITING)

    def owned(self) -> "InvocationQuerySet":
        return self.filter(status__in=OWNED)

    def finished(self) -> "InvocationQuerySet":
        return self.filter(status__in=FINAL)

    def due(self) -> "InvocationQuerySet":
        return self.filter(Q(run_after__isnull=True) | Q(run_after__lte=Now()))


class Invocation(models.Model):
    """One call of a task, from delay() to its final status."""

    task_name = models.CharField(_("task"), max_length=200)
    queue = models.CharField(max_length=100)
    priority = models.IntegerField(default=0, help_text=_("Higher runs first."))
    args = models.JSONField(default=list)
    kwargs = models.JSONField(default=dict)
    running_key = models.CharField(
        max_length=255, null=True, blank=True, help_text=_("Owned invocations of one running key are limited.")
    )
    registration_key = models.CharField(
        max_length=255, null=True, blank=True, help_text=_("Waiting invocations of one registration key are merged.")
    )
    #: Which of the key's slots an owned invocation holds (0 to its running_limit - 1).
    slot = models.PositiveSmallIntegerField(default=0)
    running_limit = models.PositiveSmallIntegerField(
        default=1, help_text=_("Runs of its running key at once, as its task said when it was created.")
    )
    status = models.CharField(max_length=32, choices=Status.choices, default=Status.REGISTERED)
    runner = models.ForeignKey(
        "Runner", null=True, blank=True, on_delete=models.SET_NULL, related_name="invocations",
        help_text=_("The runner that owns it, or last owned it."),
    )
    runner_thread = models.PositiveSmallIntegerField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    return_value = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    #: The dotted class path of the exception that failed the run, e.g. ``httpx.ConnectTimeout``.
    error_type = models.CharField(_("error type"), max_length=255, blank=True)
    traceback = models.TextField(blank=True)
    created_at = models.DateTimeField(db_default=Now())
    registered_at = models.DateTimeField(
        db_default=Now(),
        help_text=_("When it last entered the queue: runners take the queue in this order within a priority."),
    )
    run_after = models.DateTimeField(null=True, blank=True, help_text=_("Not claimed before this time."))
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    cancel_requested = models.BooleanField(
        default=False, help_text=_("cancel() was asked while it was owned: the task reads it, an async one is stopped."),
    )
    # What created it, when not a plain delay(): a schedule's tick, an emitted event, or another
    # invocation's outcome (``keyjobs.schedules``, ``keyjobs.triggers``).
    cause_schedule = models.ForeignKey(
        "Schedule", null=True, blank=True, on_delete=models.SET_NULL, related_name="invocations",
        verbose_name=_("schedule"), help_text=_("The schedule whose tick created it."),
    )
    cause_tick = models.DateTimeField(_("tick"), null=True, blank=True, help_text=_("The tick it runs for."))
    cause_event = models.CharField(
        _("event"), max_length=200, blank=True, help_text=_("The event whose emit() created it."),
    )
    cause_invocation = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="triggered",
        verbose_name=_("triggered by"), help_text=_("The invocation whose outcome triggered it."),
    )
    cause_status = models.CharField(
        _("triggering status"), max_length=32, choices=Status.choices, blank=True,
        help_text=_("The outcome of the triggering invocation that triggered it."),
    )
    # Not indexed as foreign keys are: most invocations have neither (see the partial indexes in Meta).
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="children", db_index=False,
        help_text=_("The invocation whose run called delay() to create this one."),
    )
    waiting_on = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="waited_on_by", db_index=False,
        help_text=_("While PAUSED: the invocation its run waits for."),
    )

    objects = InvocationQuerySet.as_manager()

    #: Set on the instance delay() returns: True when registration concurrency
    #: returned an existing waiting invocation instead of creating one.
    reused = False

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["task_name", "running_key", "slot"],
                condition=Q(status__in=sorted(map(str, OWNED))) & Q(running_key__isnull=False),
                name="keyjobs_one_owner_per_running_key",
            ),
            # With the unique slots above, no more owners of a key than its limit: the slots are 0 to limit - 1.
            models.CheckConstraint(
                condition=Q(running_limit__gte=1) & Q(slot__lt=models.F("running_limit")),
                name="keyjobs_slot_within_limit",
            ),
            models.UniqueConstraint(
                fields=["task_name", "registration_key"],
                condition=Q(status__in=sorted(map(str, WAITING))) & Q(registration_key__isnull=False),
                name="keyjobs_one_waiting_per_registration_key",
            ),
            # A schedule's tick creates one invocation, whichever runners race to create it.
            models.UniqueConstraint(
                fields=["cause_schedule", "cause_tick"], condition=Q(cause_schedule__isnull=False),
                name="keyjobs_one_run_per_tick",
            ),
            # An outcome triggers a subscribed task once, however often its recording is retried.
            models.UniqueConstraint(
                fields=["cause_invocation", "cause_status", "task_name"], condition=Q(cause_invocation__isnull=False),
                name="keyjobs_one_trigger_per_outcome",
            ),
        ]
        indexes = [
            # The claim: registered work in order, for a worker of every queue and for one of
            # some. Not partial: SQLite can use a partial index only for a query whose terms
            # match its condition literally, and Django binds the status as a parameter.
            models.Index("status", models.F("priority").desc(), "registered_at", "id", name="keyjobs_claim"),
            models.Index("queue", "status", models.F("priority").desc(), "registered_at", "id",
                         name="keyjobs_claim_by_queue"),
            # Who is ahead of a candidate in its key, and whom a freed key wakes.
            models.Index(
                "task_name", "running_key", models.F("priority").desc(), "id",
                condition=Q(status__in=sorted(map(str, WAITING))) & Q(running_key__isnull=False),
                name="keyjobs_waiting_by_key",
            ),
            # Everything of one key, whatever its status: the monitor's key view.
            models.Index(fields=["task_name", "running_key"], name="keyjobs_by_key"),
            models.Index(fields=["status", "finished_at"], name="keyjobs_status_finished"),
            models.Index(fields=["created_at"], name="keyjobs_created"),
            # The timeline's tick marks: the scheduled invocations of a window.
            models.Index(fields=["cause_tick"], condition=Q(cause_tick__isnull=False), name="keyjobs_by_tick"),
            # A run's children, and who waits on an invocation: only invocations that have one are indexed,
            # so that work delayed outside a run (most of it) costs no index entry.
            models.Index(fields=["parent"], condition=Q(parent__isnull=False), name="keyjobs_children"),
            models.Index(fields=["waiting_on"], condition=Q(waiting_on__isnull=False), name="keyjobs_waited_on"),
        ]

    def __str__(self) -> str:
        return f"#{self.pk} {self.task_name}({self.key or ''}) {self.status}"

    @property
    def key(self) -> str:
        """The key a person reads: the running key, else the registration key."""
        return key_label(self.running_key or self.registration_key)

    @property
    def is_final(self) -> bool:
        return self.status in FINAL

    @property
    def result(self) -> Any:
        """Return what the function returned; raise if it failed, was dropped or has not finished.

        Read inside a running task, an invocation not final yet is waited for first, pausing the
        task (see ``wait()``).
        """
        if not self.is_final:
            from .waits import in_a_run

            if in_a_run():
                self.wait()
        return self.finished_result()

    def get_result(self, timeout: float | None = None) -> Any:
        """Wait until the invocation is final (at most ``timeout`` seconds), then return its result (see ``result``)."""
        self.wait(timeout)
        return self.finished_result()

    def finished_result(self) -> Any:
        """Return the result of a final invocation; raise if it failed, was dropped or has not finished."""
        if self.status == Status.SUCCESS:
            return self.return_value
        if self.status == Status.FAILED:
            raise InvocationFailed(
                f"invocation #{self.pk} of {self.task_name} failed: {self.error}",
                error=self.error,
                traceback=self.traceback,
            )
        if self.status == Status.CONCURRENCY_CONTROLLED_FINAL:
            raise InvocationDropped(
                f"invocation #{self.pk} of {self.task_name} was dropped by concurrency control and never ran"
            )
        if self.status == Status.CANCELLED:
            raise InvocationCancelled(f"invocation #{self.pk} of {self.task_name} was cancelled: {self.error}")
        raise InvocationNotFinished(f"invocation #{self.pk} of {self.task_name} is {self.status}, not finished")

    def cancel(self, *, by: str = "") -> bool:
        """Cancel it: a waiting invocation ends CANCELLED; a running one is asked to stop. Return whether either applied.

        A running task reads the request as ``keyjobs.current().cancel_requested``;
        an ``async def`` task is stopped outright. The key's next invocation is woken.
        """
        from .control import cancel

        done = bool(cancel([self], by=by, using=self._state.db))
        self.refresh_from_db(fields=["status", "cancel_requested", "error", "finished_at"])
        return done

    def wait(self, timeout: float | None = None) -> str:
        """Block until the invocation is final and return its status; TimeoutError past ``timeout`` seconds.

        Inside a running task the task is PAUSED meanwhile and its runner thread lent to other work
        (``keyjobs.waits``); elsewhere (a shell, a test, a view) this polls.
        """
        from .waits import wait

        return wait(self, timeout)


class Event(models.Model):
    """A line of an invocation's history, written in the same transaction as the change it records."""

    class Kind(models.TextChoices):
        # The invocation's status changed from from_status to to_status.
        TRANSITION = "TRANSITION", _("Status change")
        # A duplicate delay() was given this waiting invocation instead of a new one.
        REUSED = "REUSED", _("Reused by a duplicate delay()")
        # It ran past its time limit; its key stays held until the run really stops.
        OVERDUE = "OVERDUE", _("Past its time limit")
        # Its key's rate window was full when it came up: its start waits until the window has room.
        DEFERRED = "DEFERRED", _("Deferred by its rate limit")
        # A later delay() of its key merged into it (debounce): it takes that call's arguments, its start moves.
        DEBOUNCED = "DEBOUNCED", _("Merged by debounce")
        # cancel() was asked while it was owned: the running task is asked to stop.
        CANCEL_REQUESTED = "CANCEL_REQUESTED", _("Cancel requested")
        # An attempt failed and will be retried: the note is the exception's class path, a newline, its
        # traceback (the invocation's row keeps only the last failure's).
        ERROR = "ERROR", _("A failed attempt's error")

    invocation = models.ForeignKey(Invocation, on_delete=models.CASCADE, related_name="events")
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.TRANSITION)
    from_status = models.CharField(max_length=32, choices=Status.choices, blank=True)
    to_status = models.CharField(max_length=32, choices=Status.choices)
    at = models.DateTimeField(db_default=Now())
    runner = models.ForeignKey("Runner", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    runner_thread = models.PositiveSmallIntegerField(null=True, blank=True)
    note = models.TextField(blank=True)

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["at"], name="keyjobs_event_at")]

    def __str__(self) -> str:
        return f"#{self.invocation_id}: {self.from_status or '-'} -> {self.to_status}"


class RateToken(models.Model):
    """One of the ``N`` starts a rate-limited key may make in any window: when it was last used.

    A start takes a token whose last use is at least a window ago, with a
    conditional UPDATE: two runners racing for one token are serialized by its
    row, and the loser's UPDATE matches nothing. ``N`` tokens per key are thus
    at most ``N`` starts in any window, whichever runner makes them.
    """

    task_name = models.CharField(max_length=200)
    running_key = models.CharField(max_length=255)
    #: 0 to N - 1; tokens of a larger number (a limit since lowered) are never taken.
    number = models.PositiveIntegerField()
    #: When a start last took it (the start's ``started_at``); never used yet when NULL.
    used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["task_name", "running_key", "number"], name="keyjobs_one_token_per_number"),
        ]

    def __str__(self) -> str:
        return f"{self.task_name}({key_label(self.running_key)}) token {self.number}"


class RunnerQuerySet(models.QuerySet["Runner"]):
    """Whether a runner lives, judged on the database's clock: recovery, the admin and the monitor ask here.

    A runner is alive while it has not stopped and its last heartbeat is at
    most one lease (``KEYJOBS_LEASE``) old. The heartbeat is stamped with the
    database's ``NOW()``, so it is compared with the same clock: a host whose
    own clock drifts neither loses its runners nor keeps a dead one.
    """

    def active(self) -> "RunnerQuerySet":
        """Return the runners that have not stopped, silent or not."""
        return self.filter(stopped_at__isnull=True)

    def alive(self, lease: float | None = None) -> "RunnerQuerySet":
        """Return the runners that have not stopped and heartbeat within ``lease`` seconds (default: the lease)."""
        return self.active().filter(heartbeat_at__gte=self._lease_start(lease))

    def silent(self, lease: float | None = None) -> "RunnerQuerySet":
        """Return the runners that have not stopped yet sent no heartbeat for longer than ``lease`` seconds.

        These are the runners recovery declares lost; ``lease`` defaults to
        ``KEYJOBS_LEASE``.
        """
        return self.active().filter(heartbeat_at__lt=self._lease_start(lease))

    def with_state(self, lease: float | None = None) -> "RunnerQuerySet":
        """Annotate each runner with ``state``, a ``Runner.State`` the database computes."""
        return self.annotate(state=models.Case(
            models.When(lost=True, then=models.Value(Runner.State.LOST)),
            models.When(stopped_at__isnull=False, then=models.Value(Runner.State.STOPPED)),
            models.When(heartbeat_at__gte=self._lease_start(lease), then=models.Value(Runner.State.ALIVE)),
            default=models.Value(Runner.State.GONE),
            output_field=models.CharField(),
        ))

    @staticmethod
    def _lease_start(lease: float | None) -> Any:
        return Now() - timedelta(seconds=conf.LEASE if lease is None else lease)


class Runner(models.Model):
    """One ``runworker`` process: a pool of threads claiming and running invocations.

    With ``runworker --processes N``, the supervisor process has a row too (no
    threads of its own), and each of its N worker processes links to it.
    """

    host = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    threads = models.PositiveSmallIntegerField()
    queues = models.CharField(max_length=1000, blank=True, help_text=_("Comma-separated; empty means every queue."))
    started_at = models.DateTimeField(db_default=Now())
    heartbeat_at = models.DateTimeField(db_default=Now())
    stopped_at = models.DateTimeField(null=True, blank=True)
    stop_reason = models.TextField(
        blank=True, help_text=_("Why the runner stopped, when it was not asked to: a thread that could not go on.")
    )
    lost = models.BooleanField(
        default=False, help_text=_("Declared dead by another runner after its heartbeat lapsed; its work was recovered.")
    )
    supervisor = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="children",
        help_text=_("The runner of the supervisor process (runworker --processes) that started this one."),
    )

    objects = RunnerQuerySet.as_manager()

    class State(models.TextChoices):
        # Not stopped, and its last heartbeat is at most one lease old.
        ALIVE = "alive", _("alive")
        # Not stopped, but silent for longer than the lease: recovery will declare it lost.
        GONE = "gone", _("gone")
        # It stopped by itself (see stop_reason when it was not asked to).
        STOPPED = "stopped", _("stopped")
        # Declared dead by another runner, which recovered its work.
        LOST = "lost", _("lost")

    class Meta:
        indexes = [models.Index(fields=["stopped_at", "heartbeat_at"], name="keyjobs_runner_alive")]

    def __str__(self) -> str:
        return f"runner {self.pk} ({self.host}:{self.pid})"


class ScheduleQuerySet(models.QuerySet["Schedule"]):
    def due(self) -> "ScheduleQuerySet":
        """Return the enabled schedules whose next tick has come, on the database's clock."""
        return self.filter(enabled=True, next_run__lte=Now())


class Schedule(models.Model):
    """A task run on a timer: every tick of a cron expression, or every interval (``keyjobs.schedules``)."""

    class Origin(models.TextChoices):
        # Declared with @task(schedule=...); kept in step with the code by every runner, read-only in the admin.
        CODE = "code", _("code")
        # Created in the admin.
        ADMIN = "admin", _("admin")

    name = models.CharField(max_length=200, unique=True, help_text=_("A declared schedule is named after its task."))
    task_name = models.CharField(_("task"), max_length=200)
    kwargs = models.JSONField(_("arguments"), default=dict, blank=True,
                              help_text=_("The keyword arguments of every run, as a JSON object."))
    cron = models.CharField(
        max_length=200, blank=True,
        help_text=_("Five fields: minute hour day-of-month month day-of-week, in the site's time zone."),
    )
    interval = models.DurationField(null=True, blank=True, help_text=_("Or: the time between two runs."))
    catch_up = models.BooleanField(
        _("catch up missed ticks"), default=True,
        help_text=_("Ticks missed while no runner ran: run once for all of them (on), or skip them (off)."),
    )
    enabled = models.BooleanField(default=True, help_text=_("Off: paused from its next tick on."))
    origin = models.CharField(max_length=8, choices=Origin.choices, default=Origin.ADMIN)
    next_run = models.DateTimeField(null=True, blank=True, help_text=_("The next tick; empty while it cannot run."))
    last_run = models.DateTimeField(null=True, blank=True, help_text=_("The last tick that ran."))
    last_invocation = models.ForeignKey(
        Invocation, null=True, blank=True, on_delete=models.SET_NULL, related_name="+",
        help_text=_("The invocation of the last tick (an invocation it merged into, under registration concurrency)."),
    )
    problem = models.TextField(
        blank=True, help_text=_("Why the runners skip it (a task that cannot be found, arguments it cannot take)."),
    )
    created_at = models.DateTimeField(db_default=Now())

    objects = ScheduleQuerySet.as_manager()

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=(Q(cron="") & Q(interval__isnull=False)) | (~Q(cron="") & Q(interval__isnull=True)),
                name="keyjobs_schedule_cron_or_interval",
            ),
        ]
        indexes = [
            # The scheduling duty: the enabled schedules in the order they are due. Not partial, for
            # the reason the claim's index is not: Django binds the flag as a parameter.
            models.Index(fields=["enabled", "next_run"], name="keyjobs_schedule_due"),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def is_declared(self) -> bool:
        return self.origin == self.Origin.CODE
