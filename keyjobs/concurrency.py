"""Concurrency scopes, and the keys the database guards are built on.

A key is the canonical JSON of the subset of a call's bound arguments that the
scope looks at: none for TASK, all for ARGUMENTS, ``key_arguments`` for KEYS.
Two calls collide exactly when their keys are equal, and the partial unique
constraints on ``Invocation`` compare nothing else.
"""

import enum
import hashlib
import json
from collections.abc import Mapping
from typing import Any

#: Keys longer than this are stored as a digest, so that the guards' indexes
#: never meet the database's limit on the size of an index entry.
MAX_KEY_LENGTH = 200


class ConcurrencyControlType(enum.Enum):
    """Which invocations of a task count as the same for a concurrency guard."""

    #: No guard: any number at once.
    DISABLED = "DISABLED"
    #: At most one per task.
    TASK = "TASK"
    #: At most one per full argument tuple (bound to the signature, defaults applied).
    ARGUMENTS = "ARGUMENTS"
    #: At most one per value of the task's ``key_arguments``.
    KEYS = "KEYS"

    @classmethod
    def parse(cls, value: Any, *, option: str) -> "ConcurrencyControlType":
        """Return the scope named by ``value`` (a member or its name), or raise TypeError."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str) and value.upper() in cls.__members__:
            return cls[value.upper()]
        choices = ", ".join(f"Mode.{name}" for name in cls.__members__)
        raise TypeError(f"{option}={value!r} is not a concurrency scope; use one of {choices}")


Mode = ConcurrencyControlType


def make_key(
    mode: ConcurrencyControlType,
    arguments: Mapping[str, Any],
    key_arguments: tuple[str, ...],
) -> str | None:
    """Return the guard key of a call's bound ``arguments`` under ``mode``, or None when disabled."""
    if mode is Mode.DISABLED:
        return None
    if mode is Mode.TASK:
        subset: Mapping[str, Any] = {}
    elif mode is Mode.ARGUMENTS:
        subset = arguments
    else:
        subset = {name: arguments[name] for name in key_arguments}
    text = json.dumps(subset, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    if len(text) > MAX_KEY_LENGTH:
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    return text


def key_label(key: str | None) -> str:
    """Return a short human form of a key: ``acme`` for ``{"account_id":"acme"}``."""
    if key is None:
        return ""
    if key.startswith("sha256:"):
        return key[:19] + "…"
    values = list(json.loads(key).values())
    if not values:
        return "*"
    return ", ".join(v if isinstance(v, str) else json.dumps(v) for v in values)
