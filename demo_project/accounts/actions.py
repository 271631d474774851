"""What each button of the accounts page enqueues: the demo's tasks, called with ``delay()``.

Every action runs inside the view's transaction (see ``views.act``): its
invocations are inserted with the request's other writes, rolled back with
them, and seen by a worker only once the request commits. Adding a button is
adding an ``Action`` here.
"""

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings

from demo_project import tasks
from demo_project.scenarios import OPS
from keyjobs import Task
from keyjobs.models import Invocation

from .models import Account


@dataclass(frozen=True)
class Action:
    slug: str
    label: str
    task: Task[..., Any]
    #: What happens to a press made while a call of the same task and account is in flight.
    rule: str
    enqueue: Callable[[Account], list[Invocation]]

    @property
    def task_name(self) -> str:
        # For templates, which would call the task itself: a Task is callable.
        return self.task.name


def refresh(account: Account) -> Invocation:
    """Ask for a refresh of ``account`` in ``settings.ACCOUNT_REFRESH_AFTER`` seconds.

    ``refresh_once`` takes the account's name as ``account_id``, like every
    demo task. Its registration concurrency returns the refresh already
    waiting for the account instead of adding one, so the delay is the window
    in which repeated requests (saves, presses of "refresh") merge into one run.
    """
    after = timedelta(seconds=settings.ACCOUNT_REFRESH_AFTER)
    return tasks.refresh_once.using(run_after=after).delay(account_id=account.name)


def _calls(task: Task[..., Any], *ops: str) -> Callable[[Account], list[Invocation]]:
    return lambda account: [task.delay(account_id=account.name, op=op) for op in ops]


ACTIONS = {
    action.slug: action
    for action in (
        Action("fetch-profile", "fetch profile", tasks.call_keyed_drop,
               "dropped while a fetch for the account is in flight", _calls(tasks.call_keyed_drop, "fetch_profile")),
        Action("list-invoices", "list invoices", tasks.call_keyed,
               "waits its turn behind the account's calls", _calls(tasks.call_keyed, "list_invoices")),
        Action("sync-all", "sync all four", tasks.call_keyed,
               "four calls, run one at a time", _calls(tasks.call_keyed, *OPS)),
        Action("refresh", "refresh", tasks.refresh_once,
               "merged into the refresh already waiting", lambda account: [refresh(account)]),
        Action("sync-unsafe", "sync all four, no key", tasks.call_unsafe,
               "no concurrency control: the four calls overlap and collide", _calls(tasks.call_unsafe, *OPS)),
        Action("sync-retrying", "sync all four, retrying", tasks.call_retrying,
               "no key: a call that collides is tried again, up to 3 more times",
               _calls(tasks.call_retrying, *OPS)),
        Action("sync-report", "sync and report", tasks.sync_report,
               "one run that waits on four calls of the account, made one at a time",
               lambda account: [tasks.sync_report.delay(account_id=account.name)]),
        Action("onboard", "onboard (a workflow)", tasks.onboard,
               "a durable workflow: its profile fetched, a 2 s pause that holds no thread, then a sync; "
               "each step runs once, and a killed runner's workflow resumes where it stopped",
               lambda account: [tasks.onboard.delay(account_id=account.name)]),
    )
}

#: The account field a task's successful call stamps.
STAMPS = {
    tasks.call_keyed.name: "last_synced_at",
    tasks.call_keyed_drop.name: "last_synced_at",
    tasks.call_unsafe.name: "last_synced_at",
    tasks.refresh_once.name: "last_refreshed_at",
    tasks.call_retrying.name: "last_synced_at",
}
