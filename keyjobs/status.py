"""The invocation lifecycle: every status, which changes between them are legal, and what each writes.

This module describes the lifecycle: ``change()`` is the one definition of
what entering a status writes (its stamps, the attempt count, the owner and
slot, and its history rows), and ``keyjobs.transitions`` is the one place
that applies a change, through the store, refusing anything not listed here.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from django.db import models
from django.db.models import F
from django.db.models.functions import Now
from django.utils.translation import gettext_lazy as _


class Status(models.TextChoices):
    # Created by delay(); waiting to be claimed by a runner.
    REGISTERED = "REGISTERED", _("Registered")
    # Its key was busy when it came up (or delay_many() created it behind an earlier invocation
    # of its key, or an operator paused its key); parked until the key frees, then registered again.
    REROUTED = "REROUTED", _("Rerouted")
    # Claimed by a runner, which now holds the key; about to execute.
    PENDING = "PENDING", _("Pending")
    # Executing in a runner thread; the key stays held until it ends.
    RUNNING = "RUNNING", _("Running")
    # Waiting, and keeping its key. Inside a task's run, for another invocation to end (``child.wait()``,
    # ``child.get_result()``): its runner thread is lent to other work, and it is RUNNING again once that one
    # is final. A workflow suspended (a child, ``wf.sleep()``, ``wf.wait_for_event()``) has no runner at all:
    # a runner takes it up again when what it waits for comes (its ``resume_at``).
    PAUSED = "PAUSED", _("Paused")
    # Ended: the function returned; the result is stored.
    SUCCESS = "SUCCESS", _("Success")
    # Ended: the function raised, its task could not be found, its result could not be stored, its arguments
    # could not be read, or its runner died with it more than max_recoveries times.
    FAILED = "FAILED", _("Failed")
    # Failed, and will be registered again for another attempt.
    RETRY = "RETRY", _("Retry")
    # Ended without running: blocked by concurrency control on a task that drops blocked work.
    CONCURRENCY_CONTROLLED_FINAL = "CONCURRENCY_CONTROLLED_FINAL", _("Dropped by concurrency control")
    # Ended by cancel(): before it started, or while it ran (an async task stopped, or a task that
    # saw keyjobs.current().cancel_requested and raised keyjobs.Cancelled).
    CANCELLED = "CANCELLED", _("Cancelled")


#: Waiting to be picked up: the states the registration guard counts.
WAITING = frozenset({Status.REGISTERED, Status.REROUTED, Status.RETRY})
#: The states the running guard counts: they hold the key. A paused run is still its runner's; a suspended
#: workflow (PAUSED, no runner) holds its key though no runner owns it.
OWNED = frozenset({Status.PENDING, Status.RUNNING, Status.PAUSED})
#: Nothing will change these any more.
FINAL = frozenset({Status.SUCCESS, Status.FAILED, Status.CONCURRENCY_CONTROLLED_FINAL, Status.CANCELLED})

#: Every legal change of status. Anything else is an InvalidTransition.
TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.REGISTERED: frozenset(
        {
            Status.PENDING,  # claimed
            Status.REROUTED,  # its key was busy: parked
            Status.CONCURRENCY_CONTROLLED_FINAL,  # its key was busy: dropped
            Status.FAILED,  # its task cannot be found
            Status.CANCELLED,  # cancelled before it started
        }
    ),
    Status.REROUTED: frozenset(
        {
            Status.REGISTERED,  # its key freed: its turn has come
            Status.CANCELLED,  # cancelled while parked
        }
    ),
    Status.PENDING: frozenset(
        {
            Status.RUNNING,  # a runner thread started it
            Status.REGISTERED,  # given back: its runner stopped or died before starting it
            Status.FAILED,  # its task cannot be found
            Status.CANCELLED,  # its runner died after its cancel was requested
        }
    ),
    Status.RUNNING: frozenset(
        {
            Status.SUCCESS,
            Status.FAILED,
            Status.RETRY,
            Status.REGISTERED,  # recovered from a runner that died while running it
            Status.CANCELLED,  # cancelled while it ran, and it stopped (or its runner died)
            Status.PAUSED,  # it waits for another invocation to end
        }
    ),
    Status.PAUSED: frozenset(
        {
            Status.RUNNING,  # what it waited for is final (or the wait timed out, or was refused): it goes on
            Status.REGISTERED,  # recovered from a runner that died while it was paused
            Status.FAILED,  # recovered, and a waiting duplicate runs instead
            Status.CANCELLED,  # recovered after its cancel was requested: not run again
        }
    ),
    Status.RETRY: frozenset({Status.REGISTERED, Status.FAILED, Status.CANCELLED}),
    Status.SUCCESS: frozenset(),
    Status.FAILED: frozenset({Status.REGISTERED}),  # retried by hand from the admin
    Status.CONCURRENCY_CONTROLLED_FINAL: frozenset({Status.REGISTERED}),  # retried by hand
    Status.CANCELLED: frozenset({Status.REGISTERED}),  # retried by hand
}


def is_legal(from_status: str, to_status: str) -> bool:
    """Return whether the lifecycle allows going from one status to the other."""
    return Status(to_status) in TRANSITIONS[Status(from_status)]


#: Fields stamped with the database's clock when an invocation enters a status.
STAMPS: dict[Status, str] = {
    Status.REGISTERED: "registered_at",  # when it (last) entered the queue: the queue's order
    Status.RUNNING: "started_at",
    Status.SUCCESS: "finished_at",
    Status.FAILED: "finished_at",
    Status.CONCURRENCY_CONTROLLED_FINAL: "finished_at",
    Status.CANCELLED: "finished_at",
}

#: What entering RUNNING adds to the attempts, and the database's clock: one object each, shared by every
#: change (expressions are never changed in place; the store compiles each once per connection).
ONE_MORE_ATTEMPT = F("attempts") + 1
NOW = Now()

#: Where a run is taken up again: entering RUNNING from here goes on with the same run, not a new attempt.
RESUMABLE = frozenset({Status.PAUSED})

#: What a final invocation registered again (``change(again=True)``, a retry by hand) no longer has: its
#: last failure, its end, a requested start and a cancel request.
CLEARED_AGAIN: Mapping[str, Any] = {"error": "", "error_type": "", "traceback": "", "finished_at": None,
                                    "run_after": None, "cancel_requested": False,
                                    # A run that used up its max_recoveries is given as many again.
                                    "recoveries": 0}

#: The history's notes for the two ways a freed key's next invocation goes on.
WOKEN = "its key freed: its turn"
HANDED = "handed over by the invocation that freed its key"

#: One history row: (invocation id, kind, from status, to status, runner id, runner thread, note).
EventRow = tuple[int, str, str, str, int | None, int | None, str]


@dataclass(frozen=True)
class Change:
    """One change of status as it is written: the statuses entered, the fields written, the history's author."""

    #: Every status entered, in order (a claim that starts at once: PENDING, RUNNING); the last is where it ends.
    path: tuple[Status, ...]
    #: Field name to value or expression: the status, its stamps and whatever goes with it.
    values: Mapping[str, Any]
    #: Recorded on the history rows.
    runner_id: int | None = None
    runner_thread: int | None = None
    note: str = ""
    #: The kind of the history rows (``Event.Kind``).
    kind: str = field(default="TRANSITION")
    #: A paused run taken up again: legal only from a status of ``RESUMABLE``.
    resumed: bool = False
    #: A final invocation registered again: legal only from a status of ``FINAL``, and required there.
    again: bool = False

    @property
    def to(self) -> Status:
        """The status it ends in (a ``mark()`` has none: it keeps the row's)."""
        return self.path[-1]

    def steps(self) -> list[tuple[str | None, str | None]]:
        """Return each step as (from, to); None is the row's own status (the first step's from, a mark's to)."""
        if not self.path:
            return [(None, None)]
        return [(None, self.path[0]), *pairwise(self.path)]

    def events(self, pk: int, from_status: str) -> list[EventRow]:
        """Return the history rows of this change for invocation ``pk``, which was in ``from_status``."""
        return [
            (pk, self.kind, here if here is not None else from_status, there if there is not None else from_status,
             self.runner_id, self.runner_thread, self.note)
            for here, there in self.steps()
        ]

    def legal_from(self, status: str) -> bool:
        """Return whether an invocation in ``status`` may take this change's whole path."""
        return self.illegal_step(status) is None

    def illegal_step(self, status: str) -> tuple[str, str] | None:
        """Return the first step of this change's path the lifecycle forbids from ``status``, or None."""
        for here, there in pairwise([status, *self.path]):
            if not is_legal(here, there):
                return here, there
        if (self.resumed and status not in RESUMABLE) or (self.path and self.again != (status in FINAL)):
            return status, self.to
        return None


def change(
    to: Status,
    *,
    via: Sequence[Status] = (),
    owner_id: int | None = None,
    thread: int | None = None,
    slot: int | None = None,
    values: Mapping[str, Any] | None = None,
    runner_id: int | None = None,
    note: str = "",
    keep_place: bool = False,
    resumed: bool = False,
    again: bool = False,
) -> Change:
    """Return the change to status ``to`` (through ``via``): the one definition of what entering a status writes.

    - each status entered stamps its field of ``STAMPS`` with the database's clock;
    - entering RUNNING counts an attempt: every start is one, a retry's and a recovered run's too;
    - except ``resumed``, a run taken up again where it paused (from ``RESUMABLE``): the same attempt goes
      on, so neither the attempts nor ``started_at`` change;
    - a claim or a hand-off (``slot`` given) records the owner, its thread and the slot of the key it holds;
    - with ``keep_place``, entering REGISTERED leaves ``registered_at`` as it was: a woken invocation
      takes its original place in the queue, not the back (``admission.Policy.round_robin`` says which);
    - ``again``: a final invocation registered again (the only way back from ``FINAL``) clears what its last
      run left (``CLEARED_AGAIN``).

    ``values`` adds what the caller writes with it (a result, an error); ``runner_id``
    (default the owner) and ``thread`` are recorded on the history rows.
    """
    path = (*via, to)
    if resumed and path != (Status.RUNNING,):
        raise ValueError("only RUNNING is resumed, straight from where it paused")
    if again and path != (Status.REGISTERED,):
        raise ValueError("only REGISTERED is entered again, straight from a final status")
    written: dict[str, Any] = {"status": to, **(CLEARED_AGAIN if again else {})}
    if slot is not None:
        written.update(runner_id=owner_id, runner_thread=thread, slot=slot)
    if Status.RUNNING in path and not resumed:
        written["attempts"] = ONE_MORE_ATTEMPT
    for entered in path:
        if entered in STAMPS and not (keep_place and entered is Status.REGISTERED) and not (
                resumed and entered is Status.RUNNING):
            written[STAMPS[entered]] = NOW
    written.update(values or {})
    return Change(path, written, runner_id if runner_id is not None else owner_id, thread, note, resumed=resumed,
                  again=again)


def mark(
    kind: str, values: Mapping[str, Any], *, runner_id: int | None = None, thread: int | None = None, note: str = ""
) -> Change:
    """Return a change that keeps the status: ``values`` written with one history row of ``kind``.

    A deferral, a debounce's merge, a cancel request: writes to a waiting or
    running invocation that the status writer applies like any change (the
    row locked and its status checked, the history row in the same
    transaction), legal from any status the caller expects.
    """
    return Change((), dict(values), runner_id, thread, note, kind=kind)
