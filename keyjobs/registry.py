"""Every declared task, by name, so that a worker can find the function of an invocation."""

from typing import TYPE_CHECKING

from django.utils.module_loading import import_string

from .exceptions import TaskDeclarationError, TaskNotFound

if TYPE_CHECKING:
    from .declare import Task

_tasks: dict[str, "Task"] = {}


def register(task: "Task") -> None:
    """Add ``task``; a second, different function under the same name is an error."""
    known = _tasks.get(task.name)
    if known is not None and known.func.__module__ + known.func.__qualname__ != (
        task.func.__module__ + task.func.__qualname__
    ):
        raise TaskDeclarationError(
            f"task name {task.name!r} is already used by "
            f"{known.func.__module__}.{known.func.__qualname__}; pass name=... to tell them apart"
        )
    _tasks[task.name] = task


def get(name: str) -> "Task":
    """Return the task called ``name``, importing its module if no one has yet."""
    from .declare import Task

    try:
        return _tasks[name]
    except KeyError:
        pass
    try:
        found = import_string(name)
    except ImportError as exc:
        raise TaskNotFound(f"no task named {name!r} is registered, and it cannot be imported: {exc}") from None
    if not isinstance(found, Task):
        raise TaskNotFound(f"{name!r} is not a keyjobs task (it is a {type(found).__name__})")
    return found


def all_tasks() -> dict[str, "Task"]:
    """Return a copy of the registry."""
    return dict(_tasks)


def all_names() -> set[str]:
    """Return the names of the registered tasks (a view: cheap to ask on a hot path)."""
    return _tasks.keys()  # type: ignore[return-value]
