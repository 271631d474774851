"""Invocations, their history, and the runners that execute them.

The two partial unique constraints on Invocation are the final arbiter of the
per-key rules: whatever the application code does, the database refuses a
second owned invocation of a running key, and a second waiting invocation of a
registration key.
"""

import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from django.db import connections, models
from django.db.models import Q
from django.db.models.functions import Now
from django.utils.translation import gettext_lazy as _

from .concurrency import key_label
from .conf import conf
from .exceptions import InvocationCancelled, InvocationDropped, InvocationFailed, InvocationNotFinished, ValueMissing
from .status import FINAL, OWNED, WAITING, Status
from .values import restore_arguments


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


class ValueQuerySet(models.QuerySet["Value"]):
    def unreferenced(self) -> "ValueQuerySet":
        """Return the values no invocation refers to: those ``prunejobs`` deletes."""
        return self.filter(~models.Exists(Invocation.objects.filter(arguments_value=models.OuterRef("pk"))),
                           ~models.Exists(Invocation.objects.filter(result_value=models.OuterRef("pk"))))


class Value(models.Model):
    """A large argument or result, stored once by the digest of its JSON, out of the queue's rows (``keyjobs.values``).

    Invocations refer to it by foreign keys that protect it: the database
    refuses to delete a value an invocation still refers to. ``prunejobs``
    deletes those no invocation refers to any more.
    """

    #: The SHA-256 of ``data`` (UTF-8), in hex: the same value passed to many calls is one row.
    digest = models.CharField(max_length=64, primary_key=True)
    #: The value as JSON text, exactly as written: key order included.
    data = models.TextField()
    #: Bytes of ``data`` in UTF-8.
    size = models.PositiveBigIntegerField()
    created_at = models.DateTimeField(db_default=Now())

    objects = ValueQuerySet.as_manager()

    def __str__(self) -> str:
        return f"value {self.digest[:12]} ({self.size:,} bytes)"

    def load(self) -> Any:
        """Return the value, read from its JSON."""
        return json.loads(self.data)


class Invocation(models.Model):
    """One call of a task, from delay() to its final status."""

    task_name = models.CharField(_("task"), max_length=200)
    queue = models.CharField(max_length=100)
    priority = models.IntegerField(default=0, help_text=_("Higher runs first."))
    #: How many runs wait on it: paused ones (``child.wait()``) and suspended workflows (``waiting_on``). Kept
    #: by the store where a wait is recorded or ended (``Store.move``), in the same transaction.
    waiters = models.PositiveIntegerField(
        default=0, help_text=_("Paused runs and suspended workflows waiting on it: each raises its priority by one."),
    )
    #: The priority the queue is taken in (``store.portable.QUEUE_ORDER``, ``KEY_ORDER``): its own, raised by one
    #: for each waiter, so that waited-on work goes first. A column, so that the claim reads it from an index.
    effective_priority = models.GeneratedField(
        expression=models.F("priority") + models.F("waiters"), output_field=models.IntegerField(), db_persist=True,
        verbose_name=_("effective priority"),
    )
    args = models.JSONField(default=list)
    kwargs = models.JSONField(default=dict)
    # Arguments too large to keep in the row (``keyjobs.values``): their places in args and kwargs hold None, the
    # outline says which places with each one's size and first characters, the value holds them.
    arguments_value = models.ForeignKey(
        Value, null=True, blank=True, on_delete=models.PROTECT, related_name="+", db_index=False,
        help_text=_("Where its large arguments are stored."),
    )
    arguments_outline = models.JSONField(null=True, blank=True)
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
    recoveries = models.PositiveIntegerField(
        default=0, help_text=_("Times it ran again because its runner died while running it (max_recoveries)."),
    )
    return_value = models.JSONField(null=True, blank=True)
    #: A result too large to keep in the row: ``return_value`` is then None.
    result_value = models.ForeignKey(
        Value, null=True, blank=True, on_delete=models.PROTECT, related_name="+", db_index=False,
        help_text=_("Where its large result is stored."),
    )
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
    # A suspended workflow (``keyjobs.workflows``): PAUSED with no owner, resumed by a runner once this time
    # comes (a sleep's end, an event's deadline, now for an event sent) or what it waits on is final.
    resume_at = models.DateTimeField(
        _("resume at"), null=True, blank=True,
        help_text=_("A suspended workflow is resumed at this time, or once what it waits on is final."),
    )

    objects = InvocationQuerySet.as_manager()

    #: Set on the instance delay() returns: True when registration concurrency
    #: returned an existing waiting invocation instead of creating one.
    reused = False
    #: Set on the children a workflow's delay() returns (``keyjobs.workflows``): what ``result`` raises while
    #: the child is not final, instead of InvocationNotFinished: it suspends the workflow until it is.
    unfinished: "Callable[[Invocation], BaseException] | None" = None
    #: Set on a claim's candidate (``Store.claimable``): an operator's control is in force on its key.
    controlled = False

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
            models.Index("status", models.F("effective_priority").desc(), "registered_at", "id", name="keyjobs_claim"),
            models.Index("queue", "status", models.F("effective_priority").desc(), "registered_at", "id",
                         name="keyjobs_claim_by_queue"),
            # Who is ahead of a candidate in its key, and whom a freed key wakes.
            models.Index(
                "task_name", "running_key", models.F("effective_priority").desc(), "id",
                condition=Q(status__in=sorted(map(str, WAITING))) & Q(running_key__isnull=False),
                name="keyjobs_waiting_by_key",
            ),
            # Everything of one key, whatever its status: the monitor's key view.
            models.Index(fields=["task_name", "running_key"], name="keyjobs_by_key"),
            # The finished, by when: only they are indexed. Over every row, PostgreSQL would at times (its
            # statistics taken when nothing was registered) read the claim's REGISTERED rows through it and sort
            # them all, where keyjobs_claim hands them over in order.
            models.Index(fields=["status", "finished_at"], condition=Q(finished_at__isnull=False),
                         name="keyjobs_status_finished"),
            models.Index(fields=["created_at"], name="keyjobs_created"),
            # The timeline's tick marks: the scheduled invocations of a window.
            models.Index(fields=["cause_tick"], condition=Q(cause_tick__isnull=False), name="keyjobs_by_tick"),
            # A run's children, and who waits on an invocation: only invocations that have one are indexed,
            # so that work delayed outside a run (most of it) costs no index entry.
            models.Index(fields=["parent"], condition=Q(parent__isnull=False), name="keyjobs_children"),
            models.Index(fields=["waiting_on"], condition=Q(waiting_on__isnull=False), name="keyjobs_waited_on"),
            # Suspended workflows, by when they resume: a PAUSED invocation that no runner owns.
            models.Index(fields=["resume_at"], condition=Q(status=Status.PAUSED) & Q(runner__isnull=True),
                         name="keyjobs_suspended"),
            # Which values are still referred to (prunejobs): only invocations with a large value are indexed.
            models.Index(fields=["arguments_value"], condition=Q(arguments_value__isnull=False),
                         name="keyjobs_arguments_value"),
            models.Index(fields=["result_value"], condition=Q(result_value__isnull=False), name="keyjobs_result_value"),
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

    def log_extra(self) -> dict[str, Any]:
        """Return what a log record about it carries (``extra=``): ``invocation_id``, ``task`` and ``key``.

        ``key`` is the running key as stored (canonical JSON, or None), the
        value the guards and the admin's filters compare.
        """
        return {"invocation_id": self.pk, "task": self.task_name, "key": self.running_key}

    @property
    def result(self) -> Any:
        """Return what the function returned, as this instance last read it; it never waits.

        Like ``django.tasks``' ``TaskResult.return_value``: InvocationFailed,
        InvocationDropped or InvocationCancelled for those outcomes, and
        InvocationNotFinished while it is not final. To wait for it, call
        ``get_result()`` (or ``await aget_result()``); to read it again,
        ``refresh_from_db()`` (``arefresh_from_db()``).
        """
        if self.status == Status.SUCCESS:
            return self.stored_result()
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
        if self.unfinished is not None:
            raise self.unfinished(self)
        raise InvocationNotFinished(
            f"invocation #{self.pk} of {self.task_name} is {self.status}, not finished: .result does not wait; "
            "get_result() waits for it (inside a task, pausing the run)"
        )

    def call_arguments(self, using: str | None = None) -> tuple[list[Any], dict[str, Any]]:
        """Return the call's ``args`` and ``kwargs`` as it was made: its out-of-line arguments read back (a query).

        ValueMissing if their stored value is gone.
        """
        if self.arguments_value_id is None:
            return self.args, self.kwargs
        data = (Value.objects.using(using or self._state.db).filter(pk=self.arguments_value_id)
                .values_list("data", flat=True).first())
        if data is None:
            raise ValueMissing(
                f"its arguments' stored value {self.arguments_value_id} is missing: deleted around keyjobs "
                "(prunejobs never deletes a value an invocation refers to)"
            )
        return restore_arguments(self.args, self.kwargs, data)

    def stored_result(self) -> Any:
        """Return the stored return value, read from its out-of-line value if it has one (whatever the status)."""
        if self.result_value_id is None:
            return self.return_value
        try:
            return self.result_value.load()  # type: ignore[union-attr]
        except Value.DoesNotExist:
            raise ValueMissing(f"invocation #{self.pk} of {self.task_name}: its result's stored value "
                               f"{self.result_value_id} is missing") from None

    def get_result(self, timeout: float | None = None) -> Any:
        """Wait until the invocation is final (at most ``timeout`` seconds), then return its result (see ``result``)."""
        self.wait(timeout)
        return self.result

    async def aget_result(self, timeout: float | None = None) -> Any:
        """Return ``get_result()`` from async code: outside a run, no thread is held while it waits."""
        from .waits import await_final

        await await_final(self, timeout)
        return self.result

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
        # Its outcome should have triggered a task (``on_status``) that could not be enqueued: the note says
        # which, and why. The outcome stands.
        TRIGGER_FAILED = "TRIGGER_FAILED", _("A trigger that could not be enqueued")

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
        if self.kind != self.Kind.TRANSITION:
            return f"#{self.invocation_id}: {self.get_kind_display()}"
        return f"#{self.invocation_id}: {self.get_from_status_display() or 'Created'} → {self.get_to_status_display()}"


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


class KeyControlQuerySet(models.QuerySet["KeyControl"]):
    def in_force(self) -> "KeyControlQuerySet":
        """Return the controls that change anything now: a pause, or an override whose time has not come (database clock)."""
        return self.filter(Q(paused=True) | Q(until__gt=Now()))


class KeyControl(models.Model):
    """An operator's hold on one key of a task: paused, or its running limit or rate overridden until a time.

    Read by admission on every path that would start the key's work
    (``admission.Control``); a key without a row (nearly all) costs no
    statement. A paused key's work waits, parked, and is woken on resume; an
    override applies until ``until`` (the database's clock), then the
    declared limit and rate return by themselves.
    """

    task_name = models.CharField(_("task"), max_length=200)
    running_key = models.CharField(max_length=255)
    paused = models.BooleanField(default=False, help_text=_("No new starts; its work waits, parked, until resumed."))
    running_limit = models.PositiveSmallIntegerField(
        null=True, blank=True, help_text=_("Runs of the key at once until the override ends, instead of the declared."))
    rate_count = models.PositiveIntegerField(null=True, blank=True)
    rate_window = models.FloatField(null=True, blank=True, help_text=_("Seconds: at most rate_count starts in any."))
    until = models.DateTimeField(null=True, blank=True, help_text=_("When the overrides end."))
    changed_at = models.DateTimeField(db_default=Now())
    changed_by = models.CharField(max_length=150, blank=True)

    objects = KeyControlQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["task_name", "running_key"], name="keyjobs_one_control_per_key"),
            models.CheckConstraint(
                condition=Q(running_limit__isnull=True) | Q(running_limit__gte=1, running_limit__lte=32767),
                name="keyjobs_control_limit_positive",
            ),
            # A rate is a count of starts in a window: both, or neither.
            models.CheckConstraint(
                condition=Q(rate_count__isnull=True, rate_window__isnull=True)
                | Q(rate_count__gte=1, rate_window__gt=0, rate_window__isnull=False),  # a NULL compares to nothing
                name="keyjobs_control_rate_whole",
            ),
            # An override without an end would outlive the reason for it.
            models.CheckConstraint(
                condition=Q(running_limit__isnull=True, rate_count__isnull=True) | Q(until__isnull=False),
                name="keyjobs_control_override_ends",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.task_name}({key_label(self.running_key)})"


class KeyAction(models.Model):
    """What an operator did to a key (``keyjobs.control``): its history, naming who did it."""

    class Kind(models.TextChoices):
        # Its new starts stopped; its work waits.
        PAUSED = "paused", _("paused")
        # Starts again; the work that waited is woken.
        RESUMED = "resumed", _("resumed")
        # Its running limit or rate replaced until a time.
        OVERRIDDEN = "overridden", _("overridden")
        # The override ended by hand before its time.
        RESTORED = "restored", _("restored")
        # Everything waiting for it was cancelled.
        CANCELLED = "cancelled", _("waiting work cancelled")

    task_name = models.CharField(_("task"), max_length=200)
    running_key = models.CharField(max_length=255)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    at = models.DateTimeField(db_default=Now())
    by = models.CharField(max_length=150, help_text=_("The user who did it."))
    note = models.TextField(blank=True)

    class Meta:
        ordering = ["-id"]
        indexes = [models.Index(fields=["task_name", "running_key"], name="keyjobs_key_action_by_key")]

    def __str__(self) -> str:
        return f"{self.task_name}({key_label(self.running_key)}) {self.kind} by {self.by}"


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


# -- statistics: what the rollup duty keeps (``keyjobs.rollup``) ----------------------------------------------

#: The upper bounds, in milliseconds, of the duration and wait histograms' buckets; a last bucket holds the rest.
#: Prometheus' ``le`` buckets of the metrics endpoint are these, in seconds.
BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 300_000, 900_000)
#: The counters of a rollup row, each the number of history events of its kind: see ``keyjobs.rollup``.
COUNTERS = ("enqueued", "started", "succeeded", "failed", "retried", "cancelled", "dropped", "merged", "parked",
            "deferred")


#: The histogram columns of a rollup row, in bucket order.
DURATION_BUCKETS = tuple(f"d_{bound}" for bound in (*BUCKETS_MS, "inf"))
WAIT_BUCKETS = tuple(f"w_{bound}" for bound in (*BUCKETS_MS, "inf"))


class Counts(models.Model):
    """Counters and histograms of runs' durations and of waits (enqueue to first start); see ``keyjobs.rollup``."""

    enqueued = models.PositiveIntegerField(default=0)
    started = models.PositiveIntegerField(default=0)
    succeeded = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    #: Attempts that failed and will be retried.
    retried = models.PositiveIntegerField(default=0)
    cancelled = models.PositiveIntegerField(default=0)
    dropped = models.PositiveIntegerField(default=0)
    #: Calls merged into a waiting invocation: deduplicated (REUSED) or debounced.
    merged = models.PositiveIntegerField(default=0)
    parked = models.PositiveIntegerField(default=0)
    deferred = models.PositiveIntegerField(default=0)
    #: Runs that ended (any outcome) and the sum of their durations; first starts and the sum of their waits since
    #: the enqueue, and the longest.
    runs = models.PositiveIntegerField(default=0)
    duration_ms = models.BigIntegerField(default=0)
    waits = models.PositiveIntegerField(default=0)
    wait_ms = models.BigIntegerField(default=0)
    wait_max_ms = models.BigIntegerField(default=0)
    # The histograms, a column per bucket so that a window's rows add up in SQL: ``d_<bound>`` counts the runs
    # that took at most <bound> ms (and more than the bound before it), ``w_<bound>`` the waits; ``_inf``, the rest.
    for _bound in (*BUCKETS_MS, "inf"):
        locals()[f"d_{_bound}"] = models.PositiveIntegerField(default=0)
        locals()[f"w_{_bound}"] = models.PositiveIntegerField(default=0)
    del _bound

    class Meta:
        abstract = True


class TaskMinute(Counts):
    """What happened to one task in one minute (the minute the history's event was recorded in)."""

    task_name = models.CharField(max_length=200)
    minute = models.DateTimeField()
    #: Waiting and owned invocations of the task, as last sampled in that minute (None: not sampled).
    waiting_now = models.PositiveIntegerField(null=True, blank=True)
    owned_now = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["task_name", "minute"], name="keyjobs_one_row_per_task_minute")]
        indexes = [models.Index(fields=["minute"], name="keyjobs_task_minute_at")]

    def __str__(self) -> str:
        return f"{self.task_name} at {self.minute:%Y-%m-%d %H:%M}"


class KeyMinute(Counts):
    """What happened to one key of a task in one minute."""

    task_name = models.CharField(max_length=200)
    key = models.CharField(max_length=255)
    minute = models.DateTimeField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["task_name", "key", "minute"],
                                               name="keyjobs_one_row_per_key_minute")]
        indexes = [models.Index(fields=["minute"], name="keyjobs_key_minute_at")]

    def __str__(self) -> str:
        return f"{self.task_name}({key_label(self.key)}) at {self.minute:%Y-%m-%d %H:%M}"


class TaskTotal(Counts):
    """Everything counted of one task since the rollup began: the metrics endpoint's counters, never pruned."""

    task_name = models.CharField(max_length=200, unique=True)

    def __str__(self) -> str:
        return self.task_name


class RollupMark(models.Model):
    """How far the rollup has read a table by id, and the ids below it not seen yet (transactions still open)."""

    #: The table read: ``events`` or ``invocations``.
    name = models.CharField(max_length=32, primary_key=True)
    last_id = models.BigIntegerField(default=0)
    #: Ids at or below ``last_id`` not seen yet, each with when it was first missed (epoch seconds).
    gaps = models.JSONField(default=dict)

    def __str__(self) -> str:
        return f"{self.name} read up to #{self.last_id}"


class RunLog(models.Model):
    """A record logged through ``logging`` while an invocation ran (``keyjobs.runlogs``), as it was stored."""

    invocation = models.ForeignKey(Invocation, on_delete=models.CASCADE, related_name="logs")
    #: When the record was made, by the clock of the process that ran the task.
    at = models.DateTimeField()
    #: The record's level number (``logging.INFO`` is 20).
    level = models.PositiveSmallIntegerField()
    logger = models.CharField(max_length=200)
    message = models.TextField()

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["at"], name="keyjobs_runlog_at")]

    def __str__(self) -> str:
        return f"#{self.invocation_id} {self.logger}: {self.message[:60]}"


class Step(models.Model):
    """A step of a workflow (``keyjobs.workflows``): what its run did at one position, stored so that a replay reads it."""

    class Kind(models.TextChoices):
        # A child invocation: the workflow's delay() of a task (its value is the child's, read off it).
        CHILD = "CHILD", _("Child task")
        # wf.step(fn, ...): a function run inline, its return value (or exception) stored.
        STEP = "STEP", _("Inline step")
        # wf.now(), wf.uuid4(), wf.random(): a value taken once and read back on every replay.
        NOW = "NOW", _("Time")
        UUID = "UUID", _("UUID")
        RANDOM = "RANDOM", _("Random number")
        # wf.sleep(): due at ``due_at``.
        SLEEP = "SLEEP", _("Sleep")
        # wf.wait_for_event(): a message sent with wf.send(), or None once ``due_at`` passed.
        EVENT = "EVENT", _("Event")
        # wf.patched(): the code at this position is the patched one (a version marker).
        VERSION = "VERSION", _("Version marker")

    class State(models.TextChoices):
        # Its value (or error) is stored: a replay reads it.
        DONE = "DONE", _("Done")
        # It raised: its exception is stored and raised again at the same position on every replay.
        RAISED = "RAISED", _("Raised")
        # A sleep not over yet, an event not received yet.
        WAITING = "WAITING", _("Waiting")
        # It failed (raised, or its child failed) and that ended the workflow's run: the next attempt runs it again.
        ENDED_RUN = "ENDED_RUN", _("Failed the run")

    workflow = models.ForeignKey(Invocation, on_delete=models.CASCADE, related_name="steps")
    #: Its place in the workflow's run: a replay matches each call to the step recorded at its position.
    position = models.PositiveIntegerField()
    kind = models.CharField(max_length=16, choices=Kind.choices)
    #: What was asked: the task or function's dotted path, the event's name, the marker's name.
    name = models.CharField(max_length=200, blank=True)
    state = models.CharField(max_length=16, choices=State.choices, default=State.DONE)
    child = models.ForeignKey(Invocation, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    value = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    error_type = models.CharField(max_length=255, blank=True)
    #: The exception's arguments, when JSON holds them: a replay raises it again from them.
    error_args = models.JSONField(null=True, blank=True)
    traceback = models.TextField(blank=True)
    #: A sleep's end; an event's deadline (None: it waits for ever).
    due_at = models.DateTimeField(null=True, blank=True)
    #: Seconds an inline step's function ran.
    duration = models.FloatField(null=True, blank=True)
    created_at = models.DateTimeField(db_default=Now())
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["workflow", "position"]
        constraints = [
            # The final arbiter against recording a step twice, whatever two runs of a workflow do.
            models.UniqueConstraint(fields=["workflow", "position"], name="keyjobs_one_step_per_position"),
        ]

    def __str__(self) -> str:
        return f"#{self.workflow_id} step {self.position}: {self.get_kind_display()} {self.name}".rstrip()


class Message(models.Model):
    """A message sent to a workflow (``wf.send()``), kept until a ``wf.wait_for_event()`` of its name takes it."""

    workflow = models.ForeignKey(Invocation, on_delete=models.CASCADE, related_name="messages")
    name = models.CharField(max_length=200)
    payload = models.JSONField(null=True, blank=True)
    sent_at = models.DateTimeField(db_default=Now())
    #: The step that took it; None while it waits to be taken.
    step = models.OneToOneField(Step, null=True, blank=True, on_delete=models.SET_NULL, related_name="message")
    #: The sender's name for this message (``send(..., idempotency_key=...)``): a send asked again with it finds
    #: this message instead of making a second one. None: every send is a new message.
    idempotency_key = models.CharField(max_length=200, null=True, blank=True)

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["workflow", "name"], name="keyjobs_message_by_name")]
        constraints = [
            # The final arbiter of a send asked again (its reply lost, the caller retrying): one message per key.
            models.UniqueConstraint(fields=["workflow", "idempotency_key"],
                                    condition=Q(idempotency_key__isnull=False),
                                    name="keyjobs_one_message_per_idempotency_key"),
        ]

    def __str__(self) -> str:
        return f"{self.name} to #{self.workflow_id}"
