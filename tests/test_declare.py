import pytest

from keyjobs import ConcurrencyControlType, Mode, Task, TaskDeclarationError, registry, task
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


def test_the_tasks_modules_of_installed_apps_are_discovered_at_start_up():
    # demo_project is an installed app; nothing in the tests imports its tasks module first.
    assert "demo_project.tasks.call_keyed" in registry.all_tasks()
