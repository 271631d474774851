"""What the store returns, and the one-statement steps a database may offer beside the portable ones."""

from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any, NamedTuple, Protocol

from ..models import Invocation
from ..status import Change


class LockedRow(NamedTuple):
    """What a caller holding an invocation's row lock knows of it."""

    id: int
    status: str
    runner_id: int | None


class WaitingRow(NamedTuple):
    """A waiting invocation of a key, in key order."""

    id: int
    status: str
    queue: str
    #: The limit it stored: how many runs of its key may be in flight at once.
    running_limit: int


class Window(NamedTuple):
    """What a rate-limited start found in its key's window."""

    #: When the start took its token (its ``started_at``); None if the window was full.
    taken_at: datetime | None
    #: If the window was full: when its first token frees.
    full_until: datetime | None
    #: Whether every token was being taken by claims not committed yet: nobody knows yet whether the window is full,
    #: and ``full_until`` is only when to look again.
    contended: bool = False


class Claimed(NamedTuple):
    """What a one-statement claim took, and whether it stopped at an invocation that needs deciding."""

    invocations: list[Invocation]
    stopped: bool


class Recorded(NamedTuple):
    """An outcome recorded and the thread's next claim, in one statement."""

    #: The recorded invocation's row as it was before (None if it is gone).
    row: LockedRow | None
    claimed: Claimed


class Woken(NamedTuple):
    """What freeing a slot of a key did."""

    #: The invocation handed straight to the freeing thread, RUNNING, if any.
    handed: Invocation | None
    #: Parked invocations registered again.
    woken: list[int]
    #: Whether parked invocations it meant to wake were taken first by another waker of the key: look again.
    missed: bool = False
    #: The key has an operator's control in force, which the one statement does not decide: it did nothing.
    controlled: bool = False


class Steps(Protocol):
    """Whole steps of an invocation's life, each in one statement (``store.steps``; None where there are none).

    Each implements a named subset of the general path exactly: the caller
    checks that the step applies (``admission.FAST_PATH``, a legal path), and
    the partial unique constraints still decide every race.
    """

    def move_checked(
        self, ids: Sequence[int], change: Change, *, only_from: Collection[str], owner_id: int | None
    ) -> list[LockedRow]:
        """Lock ``ids``, apply ``change`` to those in ``only_from`` (all owned by ``owner_id`` if given).

        Return every row as it was; nothing is written if one of them is owned by another runner.
        """

    def claim_head(
        self, queues: Sequence[str] | None, limit: int, *, fast_tasks: Sequence[str], claim: Change
    ) -> Claimed:
        """Claim the head of the queue with ``claim``, up to the first invocation that needs deciding.

        That is an invocation of a task not in ``fast_tasks``, or of a running
        key that is held, has work ahead of it or an operator's control in force.
        """

    def record_and_claim(
        self, pk: int, outcome: Change, *, owner_id: int, queues: Sequence[str] | None, fast_tasks: Sequence[str],
        claim: Change,
    ) -> Recorded:
        """``move_checked`` of one RUNNING invocation, then ``claim_head`` of one for the same thread, at once.

        A runner whose outcome is refused claims nothing.
        """

    def wake_next(
        self, task_name: str, running_key: str, *, woken: Change, handed: Change | None,
        queues: Sequence[str] | None, fast_tasks: Sequence[str] = (), claim: Change | None = None,
    ) -> Woken:
        """Wake the parked invocations among a key's next ones, one for each free slot (see ``claim.wake_next``).

        The key's limit is the one its next invocation stored. With
        ``handed``, the first goes to the freeing thread instead if it is
        parked and nothing claimable in ``queues`` is ahead of it; with
        ``claim`` too, a thread handed nothing claims the queue's next with it
        instead, as ``record_and_claim`` does (``Woken.handed``). A key with
        an operator's control in force is left alone (``Woken.controlled``):
        the general path decides it.
        """

    def insert_or_park(
        self, fields: Sequence[Any], row: Sequence[Any], returning: Sequence[Any], *, ahead: "KeyAhead",
        parked: Change,
    ) -> tuple[tuple[Any, ...], str]:
        """Insert one invocation of a running key, parked with ``parked`` if its key is busy (see ``KeyAhead``).

        ``row`` holds the prepared values of ``fields`` (its status
        REGISTERED); the runners of its queue are woken only if it is not
        parked. Return the ``returning`` values and the status it got.
        """


class KeyAhead(NamedTuple):
    """What a new invocation of a running key finds ahead of it: busy with ``limit`` rows (``Store.busy_ahead``)."""

    task_name: str
    running_key: str
    #: Its priority: a row not yet inserted has no waiters, so this is its effective priority too.
    priority: int
    limit: int
