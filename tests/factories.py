from datetime import datetime, timedelta

import factory
from django.contrib.auth.models import Permission
from django.db.models import F
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
        skip_postgeneration_save = True

    task_name = "tests.jobs.add"
    queue = "default"
    args = factory.LazyFunction(lambda: [1, 2])
    kwargs = factory.LazyFunction(dict)
    status = Status.REGISTERED

    @factory.post_generation
    def counted(obj: Invocation, create: bool, extracted: object, **kwargs: object) -> None:
        """Count a made-up wait on what it waits on, as the store counts a real one (``Invocation.waiters``)."""
        if create and obj.waiting_on_id is not None:
            Invocation.objects.using(obj._state.db).filter(pk=obj.waiting_on_id).update(waiters=F("waiters") + 1)


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


def give_busy_window(count: int, *, now: datetime, minutes: int = 15, keys: int = 2_000) -> None:
    """Write ``count`` finished runs over ``keys`` keys and 16 runner threads in the ``minutes`` before ``now``, in bulk,
    one in ten parked first and one in fifty dropped instead: a timeline at scale."""
    runners = [RunnerFactory() for _ in range(2)]
    span = timedelta(minutes=minutes) / count
    invocations = []
    for number in range(count):
        created = now - timedelta(minutes=minutes) + span * number
        dropped = number % 50 == 0
        invocations.append(Invocation(
            task_name=f"tests.jobs.t{number % 3}", queue="default", running_key=f'{{"account_id":"a{number % keys}"}}',
            status=Status.CONCURRENCY_CONTROLLED_FINAL if dropped else Status.SUCCESS, created_at=created,
            runner=None if dropped else runners[number % 2], runner_thread=None if dropped else number % 8,
            started_at=None if dropped else created + timedelta(milliseconds=5),
            finished_at=created + timedelta(milliseconds=5 if dropped else 400)))
    Invocation.objects.bulk_create(invocations, batch_size=2000)
    events = []
    for number, invocation in enumerate(invocations):
        at = invocation.created_at
        if number % 50 == 0:
            events.append(Event(invocation=invocation, from_status=Status.REGISTERED,
                                to_status=Status.CONCURRENCY_CONTROLLED_FINAL, at=at))
            continue
        if number % 10 == 3:
            events.append(Event(invocation=invocation, from_status=Status.REGISTERED, to_status=Status.REROUTED,
                                at=at + timedelta(milliseconds=1)))
        for came, went, offset in [(Status.REGISTERED, Status.PENDING, 4), (Status.PENDING, Status.RUNNING, 5),
                                   (Status.RUNNING, Status.SUCCESS, 400)]:
            events.append(Event(invocation=invocation, from_status=came, to_status=went,
                                at=at + timedelta(milliseconds=offset), runner=invocation.runner,
                                runner_thread=invocation.runner_thread))
    Event.objects.bulk_create(events, batch_size=5000)
