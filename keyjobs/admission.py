"""Admission: whether an invocation may start now, given the state of its key. The one home of the per-key rules.

Every path that decides asks ``admit()``: the claim (a registered invocation
comes up), the wake-up (a slot of a key frees: how many wait to be woken),
the hand-off and the orphan wake-up (both through the wake-up), and bulk
enqueue (what ``delay_many()`` creates parked behind earlier calls of its
key). A decision is one of:

- START in a free slot of the key;
- PARK until the key frees (REROUTED), for a task that lets blocked work wait;
- DEFER until its key's rate window has room (``rate_limit``): it stays
  REGISTERED, not due before that time, holding no thread and no key;
- DROP (CONCURRENCY_CONTROLLED_FINAL), for a task that does not let blocked work wait;
- MERGE into a waiting invocation of the same registration key (``register()``),
  moving its start with ``debounce``.

An operator may hold a key (``Control``, a ``KeyControl`` row in force):
paused, its work is parked whatever the task declares (never dropped) and
no slot of it is woken (``room()``) until it resumes; a running limit or a
rate given until a time replaces the declared one on every path until then
(``under()``, ``Control.limit_for()``).

The partial unique constraints on ``Invocation`` stay the final arbiter: a
start that races another runner's for the same slot loses at the index.

PostgreSQL claims and wakes in one statement what a named subset of policies
allows (``FAST_PATH``); every other task takes the general path, which asks
this module directly. A new rule therefore lands here first, and moves into
SQL only when a bench says it must.
"""

import enum
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from .concurrency import ConcurrencyControlType, Mode, make_key
from .exceptions import ArgumentError

#: The largest ``running_limit``: a slot is a small integer column.
MAX_LIMIT = 32767

#: The units a rate_limit string may count its window in, in seconds.
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RATE = re.compile(r"\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*(s|m|h|d)\s*")


@dataclass(frozen=True)
class Rate:
    """At most ``count`` starts of a key in any window of ``window`` seconds (``rate_limit``)."""

    count: int
    window: float

    @classmethod
    def parse(cls, value: object) -> "Rate":
        """Return the rate ``value`` spells: "100/m", "10/s", "1000/h", "5/10s", or (100, timedelta(minutes=1)).

        ValueError says what is wrong with it.
        """
        if isinstance(value, str):
            found = _RATE.fullmatch(value)
            if found is None:
                raise ValueError("must be 'N/s', 'N/m', 'N/h', 'N/d' (or 'N/10s': N per 10 seconds), "
                                 "or (N, timedelta(...))")
            count, window = int(found[1]), float(found[2] or 1) * _UNITS[found[3]]
        elif isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], timedelta):
            count, window = value[0], value[1].total_seconds()
            if not isinstance(count, int) or isinstance(count, bool):
                raise ValueError("must count whole starts: (N, timedelta(...)) with N an integer")
        else:
            raise ValueError("must be a string such as '100/m' or a pair (N, timedelta(...))")
        if count < 1 or window <= 0:
            raise ValueError("must allow at least 1 start in a window longer than 0 seconds")
        return cls(count, window)

    def __str__(self) -> str:
        for unit, seconds in _UNITS.items():
            if self.window == seconds:
                return f"{self.count}/{unit}"
        return f"{self.count}/{self.window:g}s"


@dataclass(frozen=True)
class Policy:
    """A task's concurrency rules, as declared."""

    #: Which invocations count as the same while they run.
    running: ConcurrencyControlType = Mode.DISABLED
    #: Which invocations count as the same while they wait: a second one merges into the first.
    registration: ConcurrencyControlType = Mode.DISABLED
    #: The arguments that form the key, for Mode.KEYS.
    key_arguments: tuple[str, ...] = ()
    #: Runs of one running key at once: a number, or a function of the key arguments called at
    #: delay(), whose answer each invocation stores (``Invocation.running_limit``).
    limit: int | Callable[..., int] = 1
    #: Blocked work is parked to wait its turn (True; status REROUTED) or dropped (False).
    #: Declared as ``reroute_on_concurrency_control``.
    park_blocked: bool = True
    #: Starts of one running key in any window (``rate_limit``); None for no limit.
    rate: Rate | None = None
    #: A waiting invocation of a registration key starts this many seconds after the last call that merged into it.
    debounce: float | None = None
    #: ... but never later than this many seconds after the first of those calls.
    debounce_max: float | None = None
    #: A freed key's next invocation goes to the back of the queue (round-robin across keys), instead of
    #: keeping its place in enqueue order. Declared as ``round_robin``.
    round_robin: bool = False

    def limit_for(self, arguments: Mapping[str, Any], *, where: str) -> int:
        """Return the running limit of a call's bound arguments: the number, or the function's answer.

        The function is called with the arguments its scope looks at (the key
        arguments for KEYS, every argument for ARGUMENTS, none for TASK);
        ArgumentError, naming ``where``, if it answers anything but a positive integer.
        """
        if isinstance(self.limit, int):
            return self.limit
        if self.running is Mode.KEYS:
            answer = self.limit(**{name: arguments[name] for name in self.key_arguments})
        elif self.running is Mode.ARGUMENTS:
            answer = self.limit(**arguments)
        else:
            answer = self.limit()
        if not is_limit(answer):
            raise ArgumentError(
                f"{where}: running_limit returned {answer!r}; it must return a whole number from 1 to {MAX_LIMIT}"
            )
        return answer

    def key_names(self, parameters: Iterable[str]) -> set[str]:
        """Return the names, among a task's ``parameters``, of the arguments its keys are made of."""
        scopes = {self.running, self.registration}
        if Mode.ARGUMENTS in scopes:
            return set(parameters)
        return set(self.key_arguments) if Mode.KEYS in scopes else set()

    def keys_for(self, arguments: Mapping[str, Any]) -> tuple[str | None, str | None]:
        """Return the (running, registration) keys of a call's bound arguments."""
        return (make_key(self.running, arguments, self.key_arguments),
                make_key(self.registration, arguments, self.key_arguments))


class Verdict(enum.Enum):
    START = "start"
    PARK = "park"
    DROP = "drop"
    MERGE = "merge"
    DEFER = "defer"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    #: START: the slot of the key the invocation takes.
    slot: int | None = None
    #: DEFER: not before this time; MERGE with debounce: the merged invocation's new start.
    until: datetime | None = None


@dataclass(frozen=True)
class KeyState:
    """What admission needs to know of a key, from the candidate's point of view."""

    #: The slots its owners hold.
    held: Collection[int] = frozenset()
    #: How many due invocations of the key wait ahead of the candidate, in key order (up to the limit).
    ahead: int = 0
    #: With a rate limit: None if the key's window had room (the start took its token), else when it next has.
    window_full_until: datetime | None = None
    #: Runs of the key at once: the limit the candidate stored when it was created, or an operator's in force.
    limit: int = 1
    #: An operator paused the key: nothing of it starts, whatever its slots.
    paused: bool = False


@dataclass(frozen=True)
class Control:
    """An operator's hold on a key, as far as it is in force now (a ``KeyControl`` row, read on the database's clock)."""

    paused: bool = False
    #: Runs of the key at once in place of the limit its invocations stored, until the override ends.
    limit: int | None = None
    #: Starts of the key in any window in place of the task's ``rate_limit``, until the override ends.
    rate: Rate | None = None

    def limit_for(self, stored: int) -> int:
        """Return the key's limit under this control: the override's, else the one its invocation ``stored``."""
        return self.limit if self.limit is not None else stored


def under(policy: Policy, control: Control | None) -> Policy:
    """Return the policy a key's work is decided by while ``control`` is in force.

    An overridden rate replaces the declared one; a paused key's blocked work
    is parked, never dropped, so that it runs once the key resumes.
    """
    if control is None:
        return policy
    return replace(policy, rate=control.rate or policy.rate, park_blocked=policy.park_blocked or control.paused)


def room(key: KeyState) -> list[int]:
    """Return the slots of a key its waiting work may be woken into: the free ones, none while it is paused."""
    return [] if key.paused else free_slots(key.limit, key.held)


def is_limit(value: object) -> bool:
    """Return whether ``value`` is a running limit: a whole number from 1 to ``MAX_LIMIT`` (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_LIMIT


def free_slots(limit: int, held: Collection[int]) -> list[int]:
    """Return the free slots of a key with ``limit`` slots, lowest first."""
    return [slot for slot in range(limit) if slot not in held]


def admit(policy: Policy, key: KeyState) -> Decision:
    """Decide a candidate: START in a free slot if one is left after those ahead of it take theirs; else PARK or DROP.

    Work ahead of the candidate in its key goes first: within a key,
    invocations start in key order (priority, then enqueue order). The key
    has ``key.limit`` slots, the limit the candidate stored; the check
    constraint ``keyjobs_slot_within_limit`` and the unique slot index hold
    the database to it. A key with a free slot but a full rate window
    (``key.window_full_until``) DEFERs the candidate until the window has
    room, or DROPs it for a task that does not let blocked work wait. The
    caller asks about the window only once the slots allow a start: taking
    the window's token is part of starting. A paused key PARKs the
    candidate, whatever the task declares, so that it waits for the resume.
    """
    if key.paused:
        return Decision(Verdict.PARK)
    free = free_slots(key.limit, key.held)
    if len(free) <= key.ahead:
        return Decision(Verdict.PARK if policy.park_blocked else Verdict.DROP)
    if key.window_full_until is not None:
        return Decision(Verdict.DEFER, until=key.window_full_until) if policy.park_blocked else Decision(Verdict.DROP)
    return Decision(Verdict.START, free[key.ahead])


def register(policy: Policy, waiting: Any | None, *, now: datetime | None = None) -> Decision:
    """Decide a new call of a registration key: MERGE into the invocation already waiting, if any, else START.

    With ``debounce``, a merge moves the waiting invocation's start to
    ``debounce`` seconds after ``now``, but never past ``debounce_max``
    seconds after it was created (the first of the calls it stands for).
    ``now`` is the database's clock, as ``created_at`` is.
    """
    if waiting is None:
        return Decision(Verdict.START)
    if policy.debounce is None or now is None:
        return Decision(Verdict.MERGE)
    return Decision(Verdict.MERGE, until=debounced_start(policy, first=waiting.created_at, now=now))


def debounced_start(policy: Policy, *, first: datetime, now: datetime) -> datetime | None:
    """Return when a debounced invocation first requested at ``first`` starts, given a request at ``now``."""
    if policy.debounce is None:
        return None
    start = now + timedelta(seconds=policy.debounce)
    if policy.debounce_max is not None:
        start = min(start, first + timedelta(seconds=policy.debounce_max))
    return start


#: The policies PostgreSQL's one-statement steps implement: any limit of runs per key (any scope,
#: a number or a function's stored answer: each step reads the limit the invocation stored), parked
#: or dropped when blocked, no rate limit, a woken invocation keeping its place or going to the back
#: as the change says, and no operator's control in force on the key (the statements check for its
#: row: a controlled key's work is decided on the general path). Its claim decides N slots with
#: ``admit()``'s rule; its wake-up gives a key's free slots to its next invocations, as
#: ``claim.wake_next`` does (``in_fast_path``).
FAST_PATH = "rate is None and no Control in force"


def in_fast_path(policy: Policy) -> bool:
    """Return whether the one-statement claim and wake-up implement ``policy`` exactly (see ``FAST_PATH``)."""
    return policy.rate is None
