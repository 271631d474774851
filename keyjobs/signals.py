"""Signals keyjobs sends. Declarations only."""

from django.dispatch import Signal

#: Sent in the runner thread just before the function is called; ``sender`` is the Task, with ``invocation``.
invocation_started = Signal()

#: Sent after the outcome is recorded; ``sender`` is Invocation, with ``invocation``, ``status`` and
#: ``exception`` (what the run raised; None for a success).
invocation_finished = Signal()
