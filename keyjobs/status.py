"""The invocation lifecycle: every status, and which changes between them are legal.

This module only describes the lifecycle; ``keyjobs.transitions`` is the one
place that writes a status, and it refuses anything not listed here.
"""

from django.db import models
from django.utils.translation import gettext_lazy as _


class Status(models.TextChoices):
    # Created by delay(); waiting to be claimed by a runner.
    REGISTERED = "REGISTERED", _("Registered")
    # Its key was busy when it came up (or delay_many() created it behind an earlier invocation
    # of its key); parked until the key frees, then registered again.
    REROUTED = "REROUTED", _("Rerouted")
    # Claimed by a runner, which now holds the key; about to execute.
    PENDING = "PENDING", _("Pending")
    # Executing in a runner thread; the key stays held until it ends.
    RUNNING = "RUNNING", _("Running")
    # Ended: the function returned; the result is stored.
    SUCCESS = "SUCCESS", _("Success")
    # Ended: the function raised, its task could not be found, or its result was not JSON.
    FAILED = "FAILED", _("Failed")
    # Failed, and will be registered again for another attempt.
    RETRY = "RETRY", _("Retry")
    # Ended without running: blocked by concurrency control on a task that drops blocked work.
    CONCURRENCY_CONTROLLED_FINAL = "CONCURRENCY_CONTROLLED_FINAL", _("Dropped by concurrency control")


#: Waiting to be picked up: the states the registration guard counts.
WAITING = frozenset({Status.REGISTERED, Status.REROUTED, Status.RETRY})
#: Owned by a runner: the states the running guard counts.
OWNED = frozenset({Status.PENDING, Status.RUNNING})
#: Nothing will change these any more.
FINAL = frozenset({Status.SUCCESS, Status.FAILED, Status.CONCURRENCY_CONTROLLED_FINAL})

#: Every legal change of status. Anything else is an InvalidTransition.
TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.REGISTERED: frozenset(
        {
            Status.PENDING,  # claimed
            Status.REROUTED,  # its key was busy: parked
            Status.CONCURRENCY_CONTROLLED_FINAL,  # its key was busy: dropped
            Status.FAILED,  # its task cannot be found, or cancelled
        }
    ),
    Status.REROUTED: frozenset(
        {
            Status.REGISTERED,  # its key freed: its turn has come
            Status.FAILED,  # cancelled
        }
    ),
    Status.PENDING: frozenset(
        {
            Status.RUNNING,  # a runner thread started it
            Status.REGISTERED,  # given back: its runner stopped or died before starting it
            Status.FAILED,  # its task cannot be found
        }
    ),
    Status.RUNNING: frozenset(
        {
            Status.SUCCESS,
            Status.FAILED,
            Status.RETRY,
            Status.REGISTERED,  # recovered from a runner that died while running it
        }
    ),
    Status.RETRY: frozenset({Status.REGISTERED, Status.FAILED}),
    Status.SUCCESS: frozenset(),
    Status.FAILED: frozenset({Status.REGISTERED}),  # retried by hand from the admin
    Status.CONCURRENCY_CONTROLLED_FINAL: frozenset({Status.REGISTERED}),  # retried by hand
}


def is_legal(from_status: str, to_status: str) -> bool:
    """Return whether the lifecycle allows going from one status to the other."""
    return Status(to_status) in TRANSITIONS[Status(from_status)]
