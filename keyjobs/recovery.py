"""Recovering the work of runners that died: no key is ever held by a dead worker.

A runner whose heartbeat is older than the lease is declared lost by whichever
live runner looks first. In the same transaction, what it owned goes back to
REGISTERED with a history row saying so, and its keys are freed for whoever
waits on them. A slot is tied to its owning invocation and that owner's
liveness, never to a timer alone: a runner that is merely slow keeps
heartbeating and keeps its work.

A PAUSED invocation is owned like a running one (its run, waiting on another
invocation, lived in the lost runner's thread): it goes back to REGISTERED
too and runs again from the start; what it was waiting for goes on by itself.

A run whose runner died while running it (RUNNING: its code was running, not
paused or not yet started) may have killed it: a poison pill (a segfault in a
C extension, an out-of-memory kill). Each such death is counted
(``Invocation.recoveries``) and the run goes again at most its task's
``max_recoveries`` times; the next death ends it FAILED with a reason naming
every death. A death its supervisor caused knowing why (a hard time limit, the
pool stopping) is not counted against the runs it took along.

A lost runner that was only cut off (a network partition, a stalled host)
cannot write over the recovery: every later change it tries is checked
against the owner recorded on the invocation (``transitions.move(owner=...)``),
and its heartbeat, which only renews a runner not yet declared lost, tells it
to stop.
"""

import logging
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import F
from django.db.models.functions import Now

from . import registry
from .claim import wake_next
from .exceptions import RunnerDied, TaskNotFound, dotted_path
from .models import Event, Invocation, Runner
from .options import OPTIONS
from .status import OWNED, Status
from .transitions import move

logger = logging.getLogger(__name__)


def recover_lost_runners(*, using: str, lease: float, by: Runner | None = None) -> list[int]:
    """Declare lost every runner silent for longer than ``lease`` seconds and requeue what it owned; return the ids."""
    silent = Runner.objects.using(using).silent(lease).values_list("pk", flat=True)
    if by is not None:
        silent = silent.exclude(pk=by.pk)
    recovered: list[int] = []
    for runner_id in list(silent):
        recovered += _recover(runner_id, using=using, lease=lease, by=by)
    return recovered


def recover_dead_runner(
    runner_id: int, *, using: str, by: Runner | None, why: str, counted: bool = True
) -> list[int]:
    """Declare lost at once a runner whose process is known to be dead, and requeue what it owned; return the ids.

    Its supervisor calls this once it has reaped the process (``keyjobs.supervisor``):
    nothing can write for the dead runner any more, so its lease need not lapse first.
    ``why`` completes "runner N (host:pid) ...", e.g. "was killed". ``counted``: whether the
    death counts toward the ``max_recoveries`` of the runs it cut short (False where the
    supervisor killed the process itself, for a known reason).
    """
    return _recover(runner_id, using=using, lease=None, by=by, why=why, counted=counted)


def _recover(
    runner_id: int, *, using: str, lease: float | None, by: Runner | None, why: str = "", counted: bool = True
) -> list[int]:
    recovered: list[int] = []
    with transaction.atomic(using=using):
        # Locked and checked again: two runners may look at once, and the silent one may have come back.
        # A runner known dead (no lease) is taken unless it marked itself stopped or was recovered already.
        runners = Runner.objects.using(using).select_for_update(skip_locked=lease is not None)
        lost = (runners.silent(lease) if lease is not None else runners.active()).filter(pk=runner_id).first()
        if lost is None:
            return []
        why = why or f"stopped heartbeating for over {lease:g}s"
        Runner.objects.using(using).filter(pk=lost.pk).update(stopped_at=Now(), lost=True)
        owned = list(
            Invocation.objects.using(using)
            .locked()
            .filter(runner=lost, status__in=OWNED)
            .order_by("pk")
        )
        for invocation in owned:
            note = f"recovered: {lost} {why} " + _doing(invocation)
            if invocation.cancel_requested:
                # Its cancel was asked for: it is not run again.
                reason = f"cancelled: its runner {lost} died after its cancel was requested"
                move([invocation.pk], Status.CANCELLED, using=using, runner=by, note=f"recovered: {reason}",
                     values={"error": reason.capitalize(), "waiting_on": None})
                wake_next(invocation.task_name, invocation.running_key, using=using, runner=by)
                recovered.append(invocation.pk)
                continue
            died_in_it = counted and invocation.status == Status.RUNNING
            limit = _max_recoveries(invocation.task_name) if died_in_it else 0
            if died_in_it and invocation.recoveries >= limit:
                # A poison pill, most likely: it is not run again.
                reason = _deaths(invocation, f"{lost} {why}", limit, using=using)
                move([invocation.pk], Status.FAILED, using=using, runner=by, note=f"recovered: {reason}",
                     values={"error": reason[0].upper() + reason[1:], "error_type": dotted_path(RunnerDied),
                             "traceback": "", "waiting_on": None})
                wake_next(invocation.task_name, invocation.running_key, using=using, runner=by)
                recovered.append(invocation.pk)
                continue
            values: dict[str, Any] = {"slot": 0, "run_after": None, "waiting_on": None}
            if died_in_it:
                values["recoveries"] = F("recoveries") + 1
                note = note.replace(RAN, f"{RAN} ({DEATH} {invocation.recoveries + 1})", 1)
            try:
                with transaction.atomic(using=using):  # a savepoint: the registration guard may refuse
                    move([invocation.pk], Status.REGISTERED, using=using, runner=by, note=note, values=values)
            except IntegrityError:
                # A duplicate is already waiting to make the same call: it takes this one's place.
                move([invocation.pk], Status.FAILED, using=using, runner=by,
                     note=note.replace("it runs again", "a waiting duplicate runs instead"),
                     values={"error": f"its runner {lost} died while it ran; a waiting duplicate runs instead",
                             "waiting_on": None})
            wake_next(invocation.task_name, invocation.running_key, using=using, runner=by)
            recovered.append(invocation.pk)
    logger.warning("%s %s; recovered %d invocation(s)", lost, why, len(recovered),
                   extra={"runner_id": lost.pk, "invocation_ids": recovered})
    return recovered


#: How a recovery's history row says that the runner died while the run's code ran, and that the death counted.
RAN, DEATH = "while running it", "death"


def _max_recoveries(task_name: str) -> int:
    """Return the ``max_recoveries`` of a task as it runs here; the default where this process cannot load it."""
    try:
        return registry.get(task_name).max_recoveries
    except TaskNotFound:
        return int(OPTIONS["max_recoveries"].default)


def _deaths(invocation: Invocation, last: str, limit: int, *, using: str) -> str:
    """Say why ``invocation`` is not run again: how many times its runner died while running it, which and when."""
    earlier = [
        (at, note.removeprefix("recovered: ").partition(f" {RAN}")[0])
        for at, note in reversed(
            Event.objects.using(using)
            .filter(invocation_id=invocation.pk, kind=Event.Kind.TRANSITION, from_status=Status.RUNNING,
                    to_status=Status.REGISTERED, note__contains=f"{RAN} ({DEATH} ")
            .order_by("-pk").values_list("at", "note")[: invocation.recoveries]
        )
    ]
    deaths = [f"{at:%Y-%m-%d %H:%M:%S} UTC {what}" for at, what in earlier] + [f"now {last}"]
    return (f"its runner died {len(deaths)} times while running it, past its max_recoveries of {limit}: "
            f"{'; '.join(deaths)}; it is not run again")


def _doing(invocation: Invocation) -> str:
    """Say what the lost runner was doing with ``invocation``, for the recovery's history row."""
    if invocation.status == Status.PENDING:
        return "before starting it"
    if invocation.status == Status.PAUSED:
        # Its run is gone with its runner: it starts again from the beginning, and delays its children anew.
        return f"while it was paused, waiting for #{invocation.waiting_on_id}; it runs again"
    return f"{RAN}; it runs again"
