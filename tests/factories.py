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
