"""Admission: whether an invocation may start now, given the state of its key. The one home of the per-key rules.

Every path that decides asks ``admit()``: the claim (a registered invocation
comes up), the wake-up (a slot of a key frees: how many wait to be woken),
the hand-off and the orphan wake-up (both through the wake-up), and bulk
enqueue (what ``delay_many()`` creates parked behind earlier calls of its
key). A decision is one of:

- START in a free slot of the key;
- PARK until the key frees (REROUTED), for a task that lets blocked work wait;
- DROP (CONCURRENCY_CONTROLLED_FINAL), for a task that does not;
- MERGE into a waiting invocation of the same registration key (``register()``).

The partial unique constraints on ``Invocation`` stay the final arbiter: a
start that races another runner's for the same slot loses at the index.

PostgreSQL claims and wakes in one statement what a named subset of policies
allows (``FAST_PATH``); every other task takes the general path, which asks
this module directly. A new rule therefore lands here first, and moves into
SQL only when a bench says it must.
"""

import enum
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from . import registry
from .concurrency import ConcurrencyControlType, Mode, make_key


@dataclass(frozen=True)
class Policy:
    """A task's concurrency rules, as declared."""

    #: Which invocations count as the same while they run.
    running: ConcurrencyControlType = Mode.DISABLED
    #: Which invocations count as the same while they wait: a second one merges into the first.
    registration: ConcurrencyControlType = Mode.DISABLED
    #: The arguments that form the key, for Mode.KEYS.
    key_arguments: tuple[str, ...] = ()
    #: Runs of one running key at once.
    limit: int = 1
    #: Blocked work is parked to wait its turn (True; status REROUTED) or dropped (False).
    #: Declared as ``reroute_on_concurrency_control``.
    park_blocked: bool = True

    def keys_for(self, arguments: Mapping[str, Any]) -> tuple[str | None, str | None]:
        """Return the (running, registration) keys of a call's bound arguments."""
        return (make_key(self.running, arguments, self.key_arguments),
                make_key(self.registration, arguments, self.key_arguments))


class Verdict(enum.Enum):
    START = "start"
    PARK = "park"
    DROP = "drop"
    MERGE = "merge"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    #: START: the slot of the key the invocation takes.
    slot: int | None = None


@dataclass(frozen=True)
class KeyState:
    """What admission needs to know of a key, from the candidate's point of view."""

    #: The slots its owners hold.
    held: Collection[int] = frozenset()
    #: How many due invocations of the key wait ahead of the candidate, in key order (up to the limit).
    ahead: int = 0


def free_slots(policy: Policy, held: Collection[int]) -> list[int]:
    """Return the key's free slots, lowest first."""
    return [slot for slot in range(policy.limit) if slot not in held]


def admit(policy: Policy, key: KeyState) -> Decision:
    """Decide a candidate: START in a free slot if one is left after those ahead of it take theirs; else PARK or DROP.

    Work ahead of the candidate in its key goes first: within a key,
    invocations start in key order (priority, then enqueue order).
    """
    free = free_slots(policy, key.held)
    if len(free) > key.ahead:
        return Decision(Verdict.START, free[key.ahead])
    return Decision(Verdict.PARK if policy.park_blocked else Verdict.DROP)


def register(policy: Policy, waiting: object | None) -> Decision:
    """Decide a new call of a registration key: MERGE into the invocation already waiting, if any, else START."""
    return Decision(Verdict.MERGE) if waiting is not None else Decision(Verdict.START)


#: The policies PostgreSQL's one-statement claim and wake-up implement: one run per key at once
#: (any scope), parked or dropped when blocked. Anything else takes the general path.
FAST_PATH = "limit == 1"


def in_fast_path(policy: Policy) -> bool:
    """Return whether the one-statement steps implement ``policy`` exactly (see ``FAST_PATH``)."""
    return policy.limit == 1


_fast: tuple[int, list[str]] = (-1, [])


def fast_tasks() -> list[str]:
    """Return the names of the registered tasks whose policy is in the fast path, sorted."""
    global _fast
    generation, names = _fast
    if generation != registry.generation():
        names = sorted(name for name, spec in registry.all_tasks().items() if in_fast_path(spec.policy))
        _fast = (registry.generation(), names)
    return names


def policy_of(task_name: str) -> Policy:
    """Return the policy of a task by name; a task this process does not know gets the default, one per key."""
    try:
        return registry.get(task_name).policy
    except LookupError:
        return Policy()
