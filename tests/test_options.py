"""The options of @task, declared once: each with its type, default and description, readable at run time."""

import dataclasses
import subprocess
import sys
import textwrap
import typing

import pytest

from keyjobs import Status, TaskDeclarationError, registry, task
from keyjobs.models import Invocation
from keyjobs.options import OPTIONS, Option, TaskOptions, build_spec, override
from keyjobs.worker import Worker
from tests import jobs
from tests.conftest import ROOT


def test_every_option_is_declared_with_its_type_default_and_description():
    hints = typing.get_type_hints(TaskOptions, include_extras=True)
    assert list(OPTIONS) == list(hints) == list(TaskOptions.__annotations__)
    for name, hint in hints.items():
        (option,) = hint.__metadata__
        assert isinstance(option, Option) and option is OPTIONS[name]
        assert typing.get_origin(hint) is typing.Annotated and typing.get_args(hint)[0] is not None
        assert option.doc.strip() and option.doc.endswith(".") and "\n" not in option.doc, name


@pytest.mark.parametrize("option", list(OPTIONS))
def test_task_takes_every_declared_option_at_its_default(option):
    def f(account_id: str) -> None: ...

    f.__qualname__ = f"f_{option}"  # a module-level name, as a worker imports it
    assert task(**{option: OPTIONS[option].default})(f).spec.options == {option: OPTIONS[option].default}


def plain(account_id: str, n: int = 0) -> int:
    return n


def test_an_option_left_out_takes_its_declared_default():
    given = build_spec(plain, {}, where="here")
    spelled = build_spec(plain, {name: option.default for name, option in OPTIONS.items()}, where="here")
    fields = [field.name for field in dataclasses.fields(given) if field.name != "options"]
    assert [getattr(given, field) for field in fields] == [getattr(spelled, field) for field in fields]


def test_a_spec_keeps_the_options_it_was_built_from():
    assert build_spec(plain, {"priority": 3}, where="here").options == {"priority": 3}


MYPY_SNIPPET = """
from keyjobs import Mode, task

@task(running_concurrency=Mode.KEYS, key_arguments=("account_id",), running_limit=2)
def sync(account_id: str, full: bool = False) -> int:
    return 1

@task
def bare(x: int) -> str:
    return ""

reveal_type(sync)
reveal_type(bare)
sync.delay("acme", full=True)
sync.delay(1)
@task(running_limit="two")
def wrong(x: int) -> None: ...
@task(runing_limit=2)
def misspelled(x: int) -> None: ...
"""


# About no database: checked once, in the SQLite half of the suite (mypy takes a while).
@pytest.mark.sqlite
def test_task_is_typed_for_its_users(tmp_path):
    # A decorated function keeps its parameters (ParamSpec) and its return type; an option's type is checked.
    (tmp_path / "snippet.py").write_text(textwrap.dedent(MYPY_SNIPPET))
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--config-file", str(ROOT / "pyproject.toml"),
         str(tmp_path / "snippet.py")], capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    out = checked.stdout
    assert 'Revealed type is "keyjobs.declare.Task[[account_id: str, full: bool =], int]"' in out, out
    assert 'Revealed type is "keyjobs.declare.Task[[x: int], str]"' in out, out
    lines = {line.split(":")[1] for line in out.splitlines() if ": error:" in line}
    snippet = textwrap.dedent(MYPY_SNIPPET).splitlines()
    wrong = {str(number) for number, line in enumerate(snippet, 1)
             if line.startswith(("sync.delay(1)", "@task(running_limit=", "@task(runing_limit="))}
    assert lines == wrong, out


def test_task_without_options_is_the_function_declared():
    declared = task(plain)
    assert declared.spec.options == {} and declared(account_id="acme", n=2) == 2


# -- KEYJOBS_TASK_OPTIONS: what a deployment changes --------------------------------------------------------------


def test_settings_may_change_the_operational_options_and_say_why_not_the_others():
    fixed = {name for name, option in OPTIONS.items() if not option.overridable}
    assert fixed == {"name", "running_concurrency", "registration_concurrency", "key_arguments",
                     "reroute_on_concurrency_control", "retry_for", "trigger"}
    assert all(OPTIONS[name].fixed.strip() for name in fixed)


@pytest.mark.django_db
def test_an_override_applies_to_the_invocations_created_after_it(settings):
    before = jobs.keyed.delay("acme", "a")
    settings.KEYJOBS_TASK_OPTIONS = {"tests.jobs.keyed": {"running_limit": 3, "priority": 4, "queue": "bulk"}}
    after = jobs.keyed.delay("acme", "b")
    # One value: what delay() decided is stored on the row, and later paths read the row.
    stored = {row.pk: (row.running_limit, row.priority, row.queue) for row in Invocation.objects.all()}
    assert stored == {before.pk: (1, 0, "default"), after.pk: (3, 4, "bulk")}
    assert jobs.keyed.running_limit == 3 and registry.get("tests.jobs.keyed").policy.limit == 3
    assert jobs.keyed.declaration.policy.limit == 1


@pytest.mark.django_db(transaction=True)
def test_an_override_reaches_the_worker(settings, tmp_path):
    settings.KEYJOBS_TASK_OPTIONS = {"tests.jobs.flaky": {"max_retries": 4}}
    invocation = jobs.flaky.delay(str(tmp_path / "count"), 4)
    Worker(threads=1, burst=True, poll_interval=0.01).run()
    invocation.refresh_from_db()
    assert (invocation.status, invocation.attempts) == (Status.SUCCESS, 5)  # declared: 2 retries, then FAILED


def test_a_rate_limit_override_takes_the_task_off_the_one_statement_path(settings):
    assert jobs.keyed.name in registry.fast_tasks()
    settings.KEYJOBS_TASK_OPTIONS = {"tests.jobs.keyed": {"rate_limit": "5/s"}}
    assert jobs.keyed.name not in registry.fast_tasks() and str(jobs.keyed.rate_limit) == "5/s"


def test_an_override_that_cannot_apply_leaves_the_task_as_declared_and_says_why(settings, caplog):
    settings.KEYJOBS_TASK_OPTIONS = {"tests.jobs.keyed": {"running_limit": 0, "timeout": 5}}
    assert (jobs.keyed.running_limit, jobs.keyed.timeout) == (1, None)  # not half applied
    (record,) = [r for r in caplog.records if r.name == "keyjobs.registry"]
    assert "KEYJOBS_TASK_OPTIONS['tests.jobs.keyed']: running_limit=0 must be a whole number" in record.getMessage()


def test_an_override_is_checked_by_the_validator_of_task(settings):
    settings.KEYJOBS_TASK_OPTIONS = {"tests.jobs.add": {"running_limit": 2}}
    with pytest.raises(TaskDeclarationError, match=r"KEYJOBS_TASK_OPTIONS\['tests.jobs.add'\]: running_limit=2 needs "
                                                    r"running_concurrency"):
        override(jobs.add.declaration, settings.KEYJOBS_TASK_OPTIONS["tests.jobs.add"])
