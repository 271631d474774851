"""Every task spec, by name, so that a worker can find the function of an invocation."""

from typing import TYPE_CHECKING

from django.utils.module_loading import import_string

from .exceptions import TaskDeclarationError, TaskNotFound

if TYPE_CHECKING:
    from .spec import TaskSpec

_tasks: dict[str, "TaskSpec"] = {}
_generation = 0


def register(spec: "TaskSpec") -> None:
    """Add ``spec``; a second, different function under the same name is an error."""
    global _generation
    known = _tasks.get(spec.name)
    if known is not None and known.func_path != spec.func_path:
        raise TaskDeclarationError(
            f"task name {spec.name!r} is already used by {known.func_path}; pass name=... to tell them apart"
        )
    _tasks[spec.name] = spec
    _generation += 1


def get(name: str) -> "TaskSpec":
    """Return the spec of the task called ``name``, importing its module if no one has yet."""
    from .spec import TaskSpec

    try:
        return _tasks[name]
    except KeyError:
        pass
    try:
        found = import_string(name)
    except ImportError as exc:
        raise TaskNotFound(f"no task named {name!r} is registered, and it cannot be imported: {exc}") from None
    spec = getattr(found, "spec", found)
    if not isinstance(spec, TaskSpec):
        raise TaskNotFound(f"{name!r} is not a keyjobs task (it is a {type(found).__name__})")
    return spec


def is_registered(name: str) -> bool:
    """Return whether this process has a task called ``name``, without trying to import it (a hot-path look)."""
    return name in _tasks


def all_tasks() -> dict[str, "TaskSpec"]:
    """Return a copy of the registry."""
    return dict(_tasks)


def generation() -> int:
    """Return a number that changes whenever a task is registered (for caches of the registry)."""
    return _generation
