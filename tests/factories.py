from datetime import datetime, timedelta

import factory

from keyjobs.models import Event, Invocation, Runner
from keyjobs.status import Status


class RunnerFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Runner

    host = "test-host"
    pid = factory.Sequence(lambda n: 10_000 + n)
    threads = 4


class InvocationFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Invocation

    task_name = "tests.jobs.add"
    queue = "default"
    args = factory.LazyFunction(lambda: [1, 2])
    kwargs = factory.LazyFunction(dict)
    status = Status.REGISTERED


class EventFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Event

    invocation = factory.SubFactory(InvocationFactory)
    from_status = Status.REGISTERED
    to_status = Status.PENDING


def give_run(
    invocation: Invocation,
    *,
    runner: Runner,
    thread: int,
    start: datetime,
    end: datetime | None = None,
    status: str = Status.SUCCESS,
) -> Invocation:
    """Write the history of one run of ``invocation`` on ``runner``'s ``thread``: claimed, started, and ended
    at ``end`` in ``status`` (still RUNNING without an ``end``); return the invocation, updated to match.

    For monitor tests that need runs at given times, which a real worker cannot be told to keep.
    """
    EventFactory(invocation=invocation, from_status=invocation.status, to_status=Status.PENDING,
                 at=start - timedelta(milliseconds=1), runner=runner, runner_thread=thread)
    EventFactory(invocation=invocation, from_status=Status.PENDING, to_status=Status.RUNNING, at=start,
                 runner=runner, runner_thread=thread)
    invocation.status, invocation.runner, invocation.runner_thread = Status.RUNNING, runner, thread
    invocation.started_at, invocation.attempts = start, invocation.attempts + 1
    if end is not None:
        EventFactory(invocation=invocation, from_status=Status.RUNNING, to_status=status, at=end, runner=runner,
                     runner_thread=thread)
        invocation.status = status
        if status in (Status.SUCCESS, Status.FAILED):
            invocation.finished_at = end
    invocation.save()
    return invocation
