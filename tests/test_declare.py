import asyncio
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.core.exceptions import SynchronousOnlyOperation
from django.db import connections

from keyjobs import ConcurrencyControlType, Mode, Task, TaskDeclarationError, registry, task
from keyjobs.models import Invocation
from tests import jobs


def test_a_task_is_still_a_plain_function():
    assert jobs.add(2, b=3) == 5


def test_a_task_is_named_after_its_module_and_function():
    assert jobs.add.name == "tests.jobs.add"
    assert registry.get("tests.jobs.add") is jobs.add.spec


def test_mode_is_concurrency_control_type():
    assert Mode is ConcurrencyControlType
    assert [m.name for m in Mode] == ["DISABLED", "TASK", "ARGUMENTS", "KEYS"]


def test_scopes_may_be_given_by_name():
    def by_name(account_id): ...

    declared = Task(by_name, name="tests.by_name", running_concurrency="keys", key_arguments="account_id")
    assert declared.running_concurrency is Mode.KEYS
    assert declared.key_arguments == ("account_id",)


@pytest.mark.parametrize("option", ["running_concurrency", "registration_concurrency"])
def test_an_unknown_scope_is_refused_at_declaration(option):
    with pytest.raises(TaskDeclarationError, match=f"{option}='EVERYTHING' is not a concurrency scope"):

        @task(**{option: "EVERYTHING"})
        def f(x): ...


@pytest.mark.parametrize("option", ["running_concurrency", "registration_concurrency"])
def test_keys_without_key_arguments_is_refused(option):
    with pytest.raises(TaskDeclarationError, match=r"Mode\.KEYS needs key_arguments"):

        @task(**{option: Mode.KEYS})
        def f(account_id): ...


def test_a_key_argument_the_function_lacks_is_refused():
    with pytest.raises(TaskDeclarationError, match=r"key argument 'acount_id' is not a parameter .*account_id, op"):

        @task(running_concurrency=Mode.KEYS, key_arguments=("acount_id",))
        def f(account_id, op): ...


def test_a_star_parameter_cannot_be_a_key():
    with pytest.raises(TaskDeclarationError, match=r"cannot be a \*args or \*\*kwargs"):

        @task(running_concurrency=Mode.KEYS, key_arguments=("rest",))
        def f(*rest): ...


def test_key_arguments_without_keys_scope_is_refused():
    with pytest.raises(TaskDeclarationError, match="has no effect unless"):

        @task(running_concurrency=Mode.TASK, key_arguments=("account_id",))
        def f(account_id): ...


def test_an_unknown_option_is_refused():
    with pytest.raises(TaskDeclarationError, match=r"unknown option.*runing_concurrency"):

        @task(runing_concurrency=Mode.KEYS)
        def f(account_id): ...


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"reroute_on_concurrency_control": "yes"}, "must be True or False"),
        ({"priority": "high"}, "priority='high' must be an integer"),
        ({"priority": True}, "must be an integer"),
        ({"queue": ""}, "queue='' must be a non-empty string"),
        ({"queue": "a,b"}, "without commas"),
        ({"kill_on_timeout": True}, "kill_on_timeout=True needs timeout=<seconds>"),
        ({"kill_on_timeout": "yes", "timeout": 1}, "kill_on_timeout must be True or False"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(TaskDeclarationError, match=message):

        @task(**options)
        def f(x): ...


def test_a_nested_function_is_refused_because_workers_cannot_import_it():
    def outer():
        @task
        def inner(): ...

    with pytest.raises(TaskDeclarationError, match="module-level function"):
        outer()


def test_two_functions_cannot_share_a_name():
    def other(a, b=0): ...

    with pytest.raises(TaskDeclarationError, match=r"already used by tests\.jobs\.add"):
        Task(other, name="tests.jobs.add")


def test_using_overrides_queue_and_priority():
    options = jobs.add.using(queue="urgent", priority=5)
    assert (options.queue, options.priority) == ("urgent", 5)
    with pytest.raises(TaskDeclarationError, match="priority"):
        jobs.add.using(priority=1.5)


def test_using_returns_the_task_with_those_options_for_its_calls():
    urgent = jobs.add.using(queue="urgent", priority=5)
    later = urgent.using(priority=1, run_after=timedelta(hours=1))
    assert isinstance(later, Task) and later.spec is jobs.add.spec and later(2, b=3) == 5
    assert (later.queue, later.priority, later.run_after) == ("urgent", 1, timedelta(hours=1))
    assert (jobs.add.queue, jobs.add.priority, jobs.add.run_after) == ("default", 0, None)


def test_a_run_after_that_is_no_time_is_refused_by_using():
    with pytest.raises(TaskDeclarationError, match=r"tests\.jobs\.add\.using\(\): run_after must be a datetime"):
        jobs.add.using(run_after="tomorrow")


@pytest.mark.django_db(transaction=True)
def test_async_code_delays_with_adelay_and_is_told_so_by_delay():
    async def go() -> tuple[list[tuple[str, list[int]]], str]:
        one = await jobs.add.using(queue="async").adelay(1, b=2)
        many = await jobs.add.adelay_many([((3,), {}), {"a": 4}])
        try:
            jobs.add.delay(5)
        except SynchronousOnlyOperation as exc:
            refused = str(exc)
        await sync_to_async(connections.close_all)()  # the thread that inserted them
        return [(each.queue, each.args) for each in (one, *many)], refused

    made, refused = asyncio.run(go())
    assert made == [("async", [1]), ("default", [3]), ("default", [])]
    assert refused == ("tests.jobs.add.delay() queries the database, which async code may not do directly: "
                       "await tests.jobs.add.adelay(...) instead")
    assert Invocation.objects.count() == 3


def test_the_tasks_modules_of_installed_apps_are_discovered_at_start_up():
    # demo_project is an installed app; nothing in the tests imports its tasks module first.
    assert "demo_project.tasks.call_keyed" in registry.all_tasks()


def test_a_task_found_while_another_thread_imports_its_module_runs_once_the_module_is_whole():
    """A runner thread importing a task's module (a look-up of a task no one imported) registers the task before
    the module ends; another thread that finds it meanwhile waits for the module, instead of calling a function
    whose helpers do not exist yet (a NameError)."""
    import sys
    import threading

    name = "tests.late_module.uses_a_helper_defined_below"
    importing = threading.Thread(target=registry.get, args=(name,))
    importing.start()
    try:
        registered = None
        for _ in range(500):
            # The module is in sys.modules from its first line: its Event may not exist yet.
            registered = getattr(sys.modules.get("tests.late_module"), "registered", None)
            if registered is not None and registered.is_set():
                break
            importing.join(0.01)
        assert registered is not None and registered.is_set()
        assert registry.get(name).func() == "the whole module"
    finally:
        importing.join(10)
