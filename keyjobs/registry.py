"""Every task spec, by name, so that a worker can find the function of an invocation.

The registry holds each spec as its producer declared it, and hands out the
spec this process runs: with the task's ``KEYJOBS_TASK_OPTIONS`` applied
(``effective()``), so that ``delay()``, the claim and the run read one value.
"""

import importlib
import logging
import sys
from collections.abc import Mapping
from typing import Any

from django.core.signals import setting_changed
from django.utils.module_loading import import_string

from .admission import Policy, in_fast_path
from .conf import conf
from .exceptions import TaskDeclarationError, TaskNotFound, dotted_path
from .options import override
from .spec import TaskSpec

logger = logging.getLogger(__name__)

_tasks: dict[str, TaskSpec] = {}
_generation = 0
#: By name: the declared spec, and the spec this process runs for it (with its settings applied).
_effective: dict[str, tuple[TaskSpec, TaskSpec]] = {}


def register(spec: TaskSpec) -> None:
    """Add ``spec``; a second, different function under the same name is an error."""
    global _generation
    known = _tasks.get(spec.name)
    if known is not None and known.func_path != spec.func_path:
        raise TaskDeclarationError(
            f"task name {spec.name!r} is already used by {known.func_path}; pass name=... to tell them apart"
        )
    _tasks[spec.name] = spec
    _generation += 1


def effective(spec: TaskSpec) -> TaskSpec:
    """Return ``spec`` as this process runs it: with its ``KEYJOBS_TASK_OPTIONS`` applied (``options.override()``).

    Options that cannot apply leave the task as declared, and are logged once;
    the system checks (``keyjobs.E005`` to ``E008``) refuse to start a
    command with them.
    """
    cached = _effective.get(spec.name)
    if cached is not None and spec in cached:  # declared, or already the one it runs
        return cached[1]
    changes = conf.TASK_OPTIONS.get(spec.name) if isinstance(conf.TASK_OPTIONS, Mapping) else None
    running = spec
    if changes is not None:
        try:
            running = override(spec, changes)
        except TaskDeclarationError as exc:
            logger.error("%s; %s runs as declared", exc, spec.name, extra={"task": spec.name})
    _effective[spec.name] = (spec, running)
    return running


def _forget_settings(*, setting: str, **kwargs: Any) -> None:
    global _generation
    if setting == "KEYJOBS_TASK_OPTIONS":
        _effective.clear()
        _generation += 1


setting_changed.connect(_forget_settings)


def get(name: str) -> TaskSpec:
    """Return the spec of the task called ``name`` as it runs here, importing its module if no one has yet."""
    try:
        return effective(_imported(_tasks[name]))
    except KeyError:
        pass
    try:
        found = import_string(name)
    except ImportError as exc:
        raise TaskNotFound(f"no task named {name!r} is registered, and it cannot be imported: {exc}") from None
    except Exception as exc:
        # Importing a module runs its code, which may raise anything: every path that looks a task up
        # (a claim, a recovery, a wake-up) treats it as a task it cannot find, not as its own failure.
        raise TaskNotFound(f"no task named {name!r} is registered, and importing it raised "
                           f"{dotted_path(type(exc))}: {exc}") from None
    spec = getattr(found, "spec", found)
    if not isinstance(spec, TaskSpec):
        raise TaskNotFound(f"{name!r} is not a keyjobs task (it is a {type(found).__name__})")
    return effective(spec)


def _imported(spec: TaskSpec) -> TaskSpec:
    """Return ``spec`` once the module that declares it has run to its end.

    A task is registered while its module runs, before the module's end. A
    runner thread that imports the module (a look-up of a task not imported
    yet, below) registers it; another thread can then find it here and call
    it before the names it uses further down the module exist (a NameError,
    seen under the chaos run's kills and restarts). Such a thread waits for
    the import as ``import`` itself waits on a module another thread is still
    running; once imported, the look costs a dictionary read.
    """
    module = sys.modules.get(spec.func.__module__)
    if module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False):
        importlib.import_module(spec.func.__module__)
    return spec


def declared(name: str) -> TaskSpec | None:
    """Return the spec of the task called ``name`` as its producer declared it (None if none is registered)."""
    return _tasks.get(name)


def is_registered(name: str) -> bool:
    """Return whether this process has a task called ``name``, without trying to import it (a hot-path look)."""
    return name in _tasks


def all_tasks() -> dict[str, TaskSpec]:
    """Return every registered task's spec as it runs here, by name."""
    return {name: effective(spec) for name, spec in _tasks.items()}


def generation() -> int:
    """Return a number that changes whenever a task is registered or its settings change (for caches of it)."""
    return _generation


def policy_of(task_name: str) -> Policy:
    """Return the policy of a task by name; a task this process does not know gets the default, one per key."""
    try:
        return get(task_name).policy
    except LookupError:
        return Policy()


_fast: tuple[int, list[str]] = (-1, [])


def fast_tasks() -> list[str]:
    """Return the names of the registered tasks whose policy is in admission's fast path, sorted."""
    global _fast
    known, names = _fast
    if known != _generation:
        names = sorted(name for name, spec in all_tasks().items() if in_fast_path(spec.policy))
        _fast = (_generation, names)
    return names
