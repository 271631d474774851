from datetime import datetime, timedelta

import factory
from django.contrib.auth.models import Permission
from django.test import Client
from django.utils import timezone

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


def give_runs(now: datetime, count: int = 30) -> None:
    """Write ``count`` finished half-second runs of distinct keys over three runners in the 100 s before ``now``,
    plus one run still going since an hour ago: a timeline's worth, for query-count tests."""
    runners = [RunnerFactory() for _ in range(3)]
    for number in range(count):
        start = now - timedelta(seconds=100 - number)
        give_run(InvocationFactory(running_key=f'{{"account_id":"a{number}"}}'), runner=runners[number % 3],
                 thread=number % 4, start=start, end=start + timedelta(milliseconds=500))
    give_run(InvocationFactory(), runner=runners[0], thread=0, start=now - timedelta(hours=1))


def give_dashboard_load() -> None:
    """Write 20 finished invocations over 4 tasks, 7 keys and 3 runners, and one waiting: for query-count tests."""
    runners = [RunnerFactory() for _ in range(3)]
    for number in range(20):
        InvocationFactory(task_name=f"tests.jobs.t{number % 4}", running_key=f'{{"account_id":"a{number % 7}"}}',
                          status=Status.SUCCESS, finished_at=timezone.now(), runner=runners[number % 3])
    InvocationFactory(status=Status.REGISTERED)


def staff(django_user_model: type, name: str, *codenames: str) -> Client:
    """Return a client logged in as a new staff user ``name`` holding the permissions ``codenames``."""
    user = django_user_model.objects.create_user(name, password="x", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    client = Client()
    client.force_login(user)
    return client
