"""What a running task may ask of its own invocation: ``keyjobs.current()``."""

from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .models import Invocation

#: The invocation the current thread (or coroutine) runs, set by ``execute.call()`` around the task's function.
running: ContextVar["Invocation | None"] = ContextVar("keyjobs_running", default=None)


@dataclass(frozen=True)
class Current:
    """The run in progress, as its task sees it."""

    #: None when the function was called directly, not by a runner.
    invocation: "Invocation | None"

    @property
    def cancel_requested(self) -> bool:
        """Return whether ``cancel()`` was asked for this run; read from the database each time.

        A task that sees it may stop by raising ``keyjobs.Cancelled``: the
        invocation then ends CANCELLED. An ``async def`` task is stopped for
        it without asking. Read it from synchronous code only.
        """
        if self.invocation is None:
            return False
        from .models import Invocation

        return Invocation.objects.using(self.invocation._state.db).filter(
            pk=self.invocation.pk, cancel_requested=True).exists()


def current() -> Current:
    """Return the run in progress in this thread (``Current.invocation`` is None outside a runner's run)."""
    return Current(running.get())
