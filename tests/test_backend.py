"""keyjobs as a django.tasks backend: Django's contract (as Django's own tests/tasks/ pin it) and keyjobs' guarantees."""

import asyncio
import dataclasses
import pickle
import threading
from datetime import datetime, timedelta
from typing import Any

import django
import pytest

from keyjobs.options import OPTIONS as TASK_OPTIONS
from keyjobs.status import FINAL, OWNED, Status

# Deselected before Django 6.1 (tests/conftest.py), where a check refuses the backend (tests/test_checks.py).
pytestmark = pytest.mark.django_tasks

if django.VERSION >= (6, 1):
    from asgiref.sync import sync_to_async
    from django.db import connection, connections, transaction
    from django.tasks import TaskResultStatus, default_task_backend, task, task_backends
    from django.tasks.base import TaskError
    from django.tasks.checks import check_tasks
    from django.tasks.exceptions import InvalidTask, InvalidTaskBackend, TaskResultDoesNotExist, TaskResultMismatch
    from django.tasks.signals import task_enqueued, task_finished, task_started
    from django.test import override_settings
    from django.utils import timezone

    from keyjobs.backend import OPTIONS, KeyjobsBackend, KeyjobsTask, result_of, task_status
    from keyjobs.exceptions import InvocationCancelled, InvocationDropped, TaskDeclarationError
    from keyjobs.models import Invocation
    from keyjobs.worker import Worker
    from tests import django_jobs, jobs
    from tests.test_worker import assert_no_two_runs_of_a_key_overlapped, read_runs


def run_burst(threads: int = 2) -> None:
    Worker(threads=threads, burst=True).run()


# -- the backend and its tasks -----------------------------------------------------------------------------------


def test_the_default_backend_is_keyjobs_with_every_capability():
    assert isinstance(task_backends["default"], KeyjobsBackend)
    assert default_task_backend.alias == "default" and default_task_backend.options == {}
    backend = task_backends["default"]
    assert (backend.supports_defer, backend.supports_async_task, backend.supports_get_result,
            backend.supports_priority) == (True, True, True, True)


def test_the_decorator_makes_django_tasks_that_carry_a_keyjobs_spec():
    for declared in (django_jobs.add, django_jobs.add_async, django_jobs.sync_account):
        assert isinstance(declared, KeyjobsTask)
        assert declared.spec is not None and declared.spec.name == declared.module_path
    policy = django_jobs.sync_account.spec.policy
    assert (policy.running.name, policy.key_arguments) == ("KEYS", ("account_id",))
    assert django_jobs.add.name == "add"


def test_a_task_declared_both_ways_gets_the_same_policy():
    assert django_jobs.sync_account.spec.policy == jobs.keyed.spec.policy
    assert django_jobs.refresh_once.spec.policy.registration == jobs.once_per_key.spec.policy.registration


@pytest.mark.parametrize("option", sorted(set(TASK_OPTIONS) - {"queue", "priority", "name"}))
def test_every_keyjobs_task_option_is_accepted_through_the_django_decorator(option):
    # Read off keyjobs.options' one declaration: an option added there is accepted here with no change.
    default = TASK_OPTIONS[option].default
    declared = task(**{option: default})(django_jobs.add.func)
    assert declared.options == {option: default}
    assert option in OPTIONS


def test_using_makes_a_new_task_sharing_the_spec():
    now = timezone.now()
    changed = django_jobs.add.using(priority=5, queue_name="reports", run_after=now)
    assert (changed.priority, changed.queue_name, changed.run_after) == (5, "reports", now)
    assert (django_jobs.add.priority, django_jobs.add.queue_name, django_jobs.add.run_after) == (0, "default", None)
    assert changed.spec is django_jobs.add.spec
    assert django_jobs.add.using() == django_jobs.add and django_jobs.add.using() is not django_jobs.add


def test_using_an_unknown_backend_is_refused():
    with pytest.raises(InvalidTaskBackend, match="The connection 'unknown' doesn't exist"):
        django_jobs.add.using(backend="unknown")


def test_a_task_pickles_with_its_overrides():
    changed = django_jobs.sync_account.using(priority=3)
    assert pickle.loads(pickle.dumps(changed)) == changed
    assert pickle.loads(pickle.dumps(changed)).spec is django_jobs.sync_account.spec


def test_call_runs_the_function_here():
    assert django_jobs.add.call(2, b=3) == 5
    assert asyncio.run(django_jobs.add.acall(2, 3)) == 5
    assert django_jobs.add_async.call(2, 3) == 5


# -- bad input, at the earliest point, naming the task and the option -------------------------------------------


def test_an_unknown_option_is_refused_at_decoration_naming_the_task_and_option():
    with pytest.raises(TaskDeclarationError, match=r"tests\.django_jobs\.add got unknown option\(s\) runing_concurrency"):
        task(runing_concurrency="KEYS")(django_jobs.add.func)


def test_a_bad_keyjobs_value_is_refused_at_decoration_as_keyjobs_task_refuses_it():
    with pytest.raises(TaskDeclarationError, match=r"tests\.django_jobs\.add: key argument 'account' is not a parameter"):
        task(running_concurrency="KEYS", key_arguments=["account"])(django_jobs.add.func)
    with pytest.raises(TaskDeclarationError, match=r"tests\.django_jobs\.add: max_retries=-1"):
        task(max_retries=-1)(django_jobs.add.func)


def test_keyjobs_spellings_of_django_arguments_are_refused():
    with pytest.raises(TaskDeclarationError, match=r"tests\.django_jobs\.add: queue= is keyjobs' spelling; pass django.tasks' queue_name="):
        task(queue="reports")(django_jobs.add.func)


def test_keyjobs_options_on_a_task_bound_to_another_backend_are_refused():
    with pytest.raises(TaskDeclarationError, match=r"tests\.django_jobs\.sync_account: key_arguments, running_concurrency are "
                       r"keyjobs options, but backend 'immediate' is django\.tasks\.backends\.immediate\.ImmediateBackend"):
        django_jobs.sync_account.using(backend="immediate")
    # Django's own task class refuses them at decoration, naming the option.
    with pytest.raises(TypeError, match="running_concurrency"):
        task(backend="immediate", running_concurrency="KEYS", key_arguments=["a"])(django_jobs.add.func)
    # Without keyjobs options, moving to another backend is Django's business.
    assert django_jobs.add.using(backend="immediate").enqueue(1, 2).return_value == 3


def test_a_queue_missing_from_queues_is_refused_naming_the_task_and_queues():
    with pytest.raises(InvalidTask, match=r"tests\.django_jobs\.add: Queue 'nightly' is not valid for backend 'default': "
                       r"it is not in TASKS\['default'\]\['QUEUES'\] \(default, reports\)"):
        django_jobs.add.using(queue_name="nightly")
    with pytest.raises(InvalidTask, match="Queue 'nightly' is not valid"):
        task(queue_name="nightly")(django_jobs.add.func)


@pytest.mark.django_db
def test_enqueue_refuses_a_queue_that_the_settings_no_longer_list():
    nightly = django_jobs.add.using(queue_name="reports")
    narrower = {"default": {"BACKEND": "keyjobs.backend.KeyjobsBackend", "QUEUES": ["default"]}}
    with (override_settings(TASKS=narrower),
          pytest.raises(InvalidTask, match=r"tests\.django_jobs\.add: Queue 'reports' is not valid")):
        nightly.enqueue(1)
    assert not Invocation.objects.exists()


@pytest.mark.parametrize("priority", [-101, 101, 3.1, True])
def test_a_priority_out_of_range_is_refused_naming_the_task(priority):
    with pytest.raises(InvalidTask, match=r"tests\.django_jobs\.add: priority must be a whole number between -100 and 100"):
        django_jobs.add.using(priority=priority)


def test_the_priority_range_ends_are_accepted():
    for priority in (-100, 0, 100):
        assert django_jobs.add.using(priority=priority).priority == priority


def test_a_naive_run_after_is_refused_naming_the_task():
    with pytest.raises(InvalidTask, match=r"tests\.django_jobs\.add: run_after must be an aware datetime"):
        django_jobs.add.using(run_after=datetime.now())


def test_django_refusals_name_the_task():
    def inner() -> None: ...

    with pytest.raises(InvalidTask, match="Task function must be defined at a module level"):
        task()(inner)
    with pytest.raises(InvalidTask, match=r"tests\.jobs\.add: Task takes context but does not have a first argument"):
        task(takes_context=True)(jobs.add.func)
    with pytest.raises(TypeError, match="run_after cannot be defined statically"):
        task(run_after=timezone.now())(jobs.add.func)


# -- enqueue -----------------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_enqueue_registers_an_invocation_and_returns_a_ready_result():
    result = django_jobs.report.enqueue("q3")
    assert result.status == TaskResultStatus.READY and not result.is_finished
    assert result.task == django_jobs.report and result.backend == "default"
    assert (result.args, result.kwargs, result.errors, result.worker_ids, result.attempts) == (["q3"], {}, [], [], 0)
    assert result.enqueued_at is not None and result.started_at is None and result.finished_at is None
    assert result.merged is False
    invocation = Invocation.objects.get(pk=int(result.id))
    assert (invocation.task_name, invocation.queue, invocation.priority) == ("tests.django_jobs.report", "reports", 10)
    with pytest.raises(ValueError, match="Task has not finished yet"):
        _ = result.return_value


@pytest.mark.django_db
def test_priority_and_run_after_go_to_the_invocation_unchanged():
    later = timezone.now() + timedelta(hours=1)
    result = django_jobs.add.using(priority=-7, run_after=later).enqueue(1)
    invocation = Invocation.objects.get(pk=int(result.id))
    assert (invocation.priority, invocation.run_after) == (-7, later)
    fetched = django_jobs.add.get_result(result.id)
    assert (fetched.task.priority, fetched.task.run_after) == (-7, later)


@pytest.mark.django_db
def test_enqueue_refuses_arguments_that_cannot_be_stored():
    with pytest.raises(TypeError):
        django_jobs.add.enqueue(datetime.now())
    with pytest.raises(TypeError, match=r"tests\.django_jobs\.add"):
        django_jobs.add.enqueue(1, c=2)


@pytest.mark.django_db
def test_enqueue_sends_task_enqueued():
    seen = []

    def receiver(sender: Any, task_result: Any, **kwargs: Any) -> None:
        seen.append((sender, task_result.id))

    task_enqueued.connect(receiver)
    try:
        result = django_jobs.add.enqueue(1)
    finally:
        task_enqueued.disconnect(receiver)
    assert seen == [(KeyjobsBackend, result.id)]


@pytest.mark.django_db
def test_a_deduplicated_enqueue_returns_the_waiting_invocations_result_marked_merged():
    first = django_jobs.refresh_once.enqueue("acme")
    second = django_jobs.refresh_once.enqueue("acme")
    other = django_jobs.refresh_once.enqueue("globex")
    assert second.id == first.id and second.merged is True and first.merged is False
    assert other.id != first.id and other.merged is False
    assert Invocation.objects.count() == 2


@pytest.mark.django_db(transaction=True)
def test_enqueue_inside_atomic_is_part_of_the_transaction():
    with pytest.raises(RuntimeError), transaction.atomic():
        rolled_back = django_jobs.add.enqueue(1)
        assert Invocation.objects.filter(pk=int(rolled_back.id)).exists()
        raise RuntimeError("roll back")
    assert not Invocation.objects.exists()
    with pytest.raises(TaskResultDoesNotExist):
        django_jobs.add.get_result(rolled_back.id)
    with transaction.atomic():
        kept = django_jobs.add.enqueue(2)
    run_burst()
    assert django_jobs.add.get_result(kept.id).return_value == 2


@pytest.mark.django_db(transaction=True)
def test_a_worker_sees_an_enqueue_only_once_its_transaction_commits():
    seen: list[bool] = []

    def look() -> None:
        # Another connection, as a worker's: the uncommitted row is not there.
        seen.append(Invocation.objects.filter(pk=int(result.id)).exists())
        connection.close()

    with transaction.atomic():
        result = django_jobs.add.enqueue(3)
        looker = threading.Thread(target=look)
        looker.start()
        looker.join(30)
    assert seen == [False]
    run_burst()
    assert django_jobs.add.get_result(result.id).status == TaskResultStatus.SUCCESSFUL


@pytest.mark.django_db(transaction=True)
def test_aenqueue_and_aget_result():
    async def go() -> tuple[Any, Any]:
        result = await django_jobs.add.aenqueue(2, b=5)
        fetched = await django_jobs.add.aget_result(result.id)
        await sync_to_async(connections.close_all)()  # the thread that ran them
        return result, fetched

    result, fetched = asyncio.run(go())
    assert result.status == TaskResultStatus.READY and fetched.id == result.id
    run_burst()

    async def refresh() -> None:
        await result.arefresh()
        await sync_to_async(connections.close_all)()

    asyncio.run(refresh())
    assert result.return_value == 7


# -- results -----------------------------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("result_id", ["123456", "not a number", None])
def test_an_unknown_id_raises_task_result_does_not_exist(result_id):
    with pytest.raises(TaskResultDoesNotExist):
        default_task_backend.get_result(result_id)

    async def fetch() -> None:
        try:
            await default_task_backend.aget_result(result_id)
        finally:
            await sync_to_async(connections.close_all)()  # the thread that ran it

    with pytest.raises(TaskResultDoesNotExist):
        asyncio.run(fetch())


@pytest.mark.django_db
def test_an_invocation_of_a_keyjobs_task_is_not_a_django_result():
    invocation = jobs.add.delay(1)
    with pytest.raises(TaskResultDoesNotExist, match=r"tests\.jobs\.add"):
        default_task_backend.get_result(str(invocation.pk))


@pytest.mark.django_db
def test_get_result_of_another_task_is_a_mismatch():
    result = django_jobs.add_async.enqueue(1, 2)
    with pytest.raises(TaskResultMismatch, match="Task does not match"):
        django_jobs.add.get_result(result.id)


@pytest.mark.django_db
def test_refresh_reads_the_same_result_back():
    result = django_jobs.add.enqueue(1)
    before = dataclasses.asdict(result)
    result.refresh()
    assert dataclasses.asdict(result) == before


@pytest.mark.django_db
def test_a_result_pickles():
    result = django_jobs.add.enqueue(1)
    assert pickle.loads(pickle.dumps(result)) == result


@pytest.mark.parametrize("status", list(Status))
def test_every_keyjobs_status_maps_onto_djangos(status):
    # The README's table; a status added later folds in by its set: final, a run begun, or waiting.
    table = {
        "REGISTERED": TaskResultStatus.READY, "REROUTED": TaskResultStatus.READY, "PENDING": TaskResultStatus.READY,
        "RETRY": TaskResultStatus.READY, "RUNNING": TaskResultStatus.RUNNING, "SUCCESS": TaskResultStatus.SUCCESSFUL,
        "FAILED": TaskResultStatus.FAILED, "CONCURRENCY_CONTROLLED_FINAL": TaskResultStatus.FAILED,
        "CANCELLED": TaskResultStatus.FAILED,
    }
    by_set = (TaskResultStatus.FAILED if status in FINAL else TaskResultStatus.RUNNING if status in OWNED
              else TaskResultStatus.READY)
    assert task_status(status) == table.get(status, by_set)


@pytest.mark.django_db
def test_a_dropped_invocation_is_failed_with_keyjobs_own_exception():
    result = django_jobs.keyed_drop.enqueue("acme")
    Invocation.objects.filter(pk=int(result.id)).update(status=Status.CONCURRENCY_CONTROLLED_FINAL,
                                                          finished_at=timezone.now())
    result.refresh()
    assert result.status == TaskResultStatus.FAILED and result.finished_at is not None
    assert [error.exception_class for error in result.errors] == [InvocationDropped]
    assert "dropped by concurrency control" in result.errors[0].traceback
    with pytest.raises(ValueError, match="Task failed"):
        _ = result.return_value


@pytest.mark.django_db
def test_a_cancelled_invocation_is_failed_with_keyjobs_own_exception():
    from keyjobs.control import cancel

    result = django_jobs.add.enqueue(1)
    cancel([Invocation.objects.get(pk=int(result.id))], by="a test")
    result.refresh()
    assert result.status == TaskResultStatus.FAILED
    assert [error.exception_class for error in result.errors] == [InvocationCancelled]
    assert "was cancelled" in result.errors[0].traceback


# -- on the workers ----------------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_worker_runs_it_and_fills_the_result():
    result = django_jobs.sync_account.enqueue("acme", op="list_invoices")
    run_burst()
    result.refresh()
    assert result.status == TaskResultStatus.SUCCESSFUL and result.is_finished
    assert result.return_value == {"account": "acme", "op": "list_invoices"}
    assert result.enqueued_at <= result.started_at == result.last_attempted_at <= result.finished_at
    invocation = Invocation.objects.get(pk=int(result.id))
    assert result.worker_ids == [str(invocation.runner_id)] and result.attempts == 1 and result.errors == []
    assert django_jobs.sync_account.get_result(result.id) == result


@pytest.mark.django_db(transaction=True)
def test_async_tasks_run_on_the_worker():
    plain = django_jobs.add_async.enqueue(2, 3)
    with_context = django_jobs.async_with_context.enqueue(4)
    run_burst()
    assert django_jobs.add_async.get_result(plain.id).return_value == 5
    assert django_jobs.async_with_context.get_result(with_context.id).return_value == [4, 1]


@pytest.mark.django_db(transaction=True)
def test_a_failure_records_its_class_path_and_traceback(caplog):
    result = django_jobs.fail.enqueue("broken")
    with caplog.at_level("ERROR", logger="django.tasks"):
        run_burst()
    # Django's own log line of a failed task carries the exception, as its own backends send it.
    [logged] = [record for record in caplog.records if record.name == "django.tasks" and result.id in record.getMessage()]
    assert logged.exc_info is not None and logged.exc_info[0] is ValueError and "broken" in str(logged.exc_info[1])
    result.refresh()
    assert result.status == TaskResultStatus.FAILED and result.finished_at is not None
    assert len(result.errors) == 1 and result.errors[0].exception_class is ValueError
    assert result.errors[0].traceback.endswith("ValueError: broken\n")
    with pytest.raises(ValueError, match="Task failed"):
        _ = result.return_value


@pytest.mark.django_db(transaction=True)
def test_a_result_that_cannot_be_stored_fails_the_task():
    result = django_jobs.not_json.enqueue()
    run_burst()
    result.refresh()
    assert result.status == TaskResultStatus.FAILED
    assert result.errors[0].exception_class_path == "keyjobs.exceptions.ResultNotStorable"


@pytest.mark.django_db(transaction=True)
def test_each_failed_attempt_has_its_error_and_each_attempt_its_worker(tmp_path):
    result = django_jobs.fail_twice_then_succeed.enqueue(str(tmp_path / "attempts"))
    for _ in range(3):
        run_burst()
    result.refresh()
    assert result.status == TaskResultStatus.SUCCESSFUL and result.return_value == 3
    assert result.attempts == 3 and len(result.worker_ids) == 3
    assert [error.exception_class for error in result.errors] == [KeyError, KeyError]
    assert [error.traceback.splitlines()[-1] for error in result.errors] == ["KeyError: 'attempt 1'",
                                                                            "KeyError: 'attempt 2'"]
    assert result.started_at < result.last_attempted_at


@pytest.mark.django_db(transaction=True)
def test_the_context_counts_attempts_from_one():
    once = django_jobs.attempt_and_id.enqueue(fail_first=False)
    twice = django_jobs.attempt_and_id.enqueue(fail_first=True)
    keyed = django_jobs.keyed_with_context.enqueue("acme")
    for _ in range(2):
        run_burst()
    once_value = django_jobs.attempt_and_id.get_result(once.id).return_value
    assert once_value["attempt"] == 1 and once_value["id"] == once.id and len(once_value["worker_ids"]) == 1
    second = django_jobs.attempt_and_id.get_result(twice.id)
    assert second.return_value["attempt"] == 2 and len(second.return_value["worker_ids"]) == 2
    assert [error.exception_class for error in second.errors] == [RuntimeError]
    assert django_jobs.keyed_with_context.get_result(keyed.id).return_value == "acme:1"


@pytest.mark.django_db(transaction=True)
def test_the_worker_sends_task_started_and_task_finished():
    seen: list[tuple[str, str, str]] = []

    def started(sender: Any, task_result: Any, **kwargs: Any) -> None:
        seen.append(("started", task_result.id, task_result.status))

    def finished(sender: Any, task_result: Any, **kwargs: Any) -> None:
        seen.append(("finished", task_result.id, task_result.status))

    task_started.connect(started)
    task_finished.connect(finished)
    try:
        good = django_jobs.add.enqueue(1)
        bad = django_jobs.fail.enqueue("no")
        keyjobs_own = jobs.add.delay(1)
        run_burst(threads=1)
    finally:
        task_started.disconnect(started)
        task_finished.disconnect(finished)
    assert sorted(seen) == sorted([
        ("started", good.id, TaskResultStatus.RUNNING), ("finished", good.id, TaskResultStatus.SUCCESSFUL),
        ("started", bad.id, TaskResultStatus.RUNNING), ("finished", bad.id, TaskResultStatus.FAILED),
    ])
    assert keyjobs_own.wait(timeout=5) == Status.SUCCESS


@pytest.mark.django_db(transaction=True)
def test_django_and_keyjobs_tasks_share_the_pool_and_the_guarantees(tmp_path):
    log = tmp_path / "runs.log"
    results = [django_jobs.record_run.enqueue(account, number, 0.01, str(log))
               for account in ("acme", "globex") for number in range(3)]
    plain = jobs.add.delay(1)
    run_burst(threads=4)
    assert {django_jobs.record_run.get_result(result.id).status for result in results} == {TaskResultStatus.SUCCESSFUL}
    assert plain.wait(timeout=5) == Status.SUCCESS
    runs = read_runs(log)
    assert_no_two_runs_of_a_key_overlapped(runs)
    for account in ("acme", "globex"):
        assert [number for acct, number, *_ in sorted(runs, key=lambda r: r[2]) if acct == account] == [0, 1, 2]


@pytest.mark.django_db(transaction=True)
def test_keyed_work_through_django_tasks_never_overlaps_across_two_worker_processes(worker_process, tmp_path):
    log = tmp_path / "runs.log"
    accounts = ("acme", "globex", "initech")
    with transaction.atomic():
        results = [django_jobs.record_run.enqueue(account, number, 0.05, str(log))
                   for number in range(6) for account in accounts]
    workers = [worker_process("--burst", "--threads", "4") for _ in range(2)]
    for process in workers:
        process.wait(timeout=120)
    assert {default_task_backend.get_result(result.id).status for result in results} == {TaskResultStatus.SUCCESSFUL}
    runs = read_runs(log)
    assert len(runs) == len(results)
    assert_no_two_runs_of_a_key_overlapped(runs)


def test_result_of_reads_a_row_without_its_history_on_a_first_attempt(django_assert_num_queries, db):
    result = django_jobs.add.enqueue(1)
    invocation = Invocation.objects.get(pk=int(result.id))
    with django_assert_num_queries(0):
        assert result_of(django_jobs.add, invocation).id == result.id


# -- checks ------------------------------------------------------------------------------------------------------


def test_the_backends_checks_run_with_the_system_checks():
    assert [message.id for message in check_tasks()] == []
    with override_settings(TASKS={"default": {"BACKEND": "keyjobs.backend.KeyjobsBackend", "OPTIONS": {"DATABASE": "x"}}}):
        assert [message.id for message in check_tasks()] == ["keyjobs.E130"]


def test_options_are_refused_by_the_check():
    backend = KeyjobsBackend("other", {"OPTIONS": {"RETRIES": 3}})
    (message,) = backend.check()
    assert message.id == "keyjobs.E130" and "RETRIES" in message.msg


def test_task_errors_name_a_class_path_django_can_resolve():
    assert TaskError(exception_class_path="keyjobs.exceptions.InvocationDropped", traceback="").exception_class is (
        InvocationDropped
    )



def test_the_backend_needs_keyjobs_installed():
    backend = KeyjobsBackend("other", {})
    with override_settings(INSTALLED_APPS=["django.contrib.contenttypes"]):
        (message,) = backend.check()
    assert message.id == "keyjobs.E131" and "INSTALLED_APPS" in message.msg


@pytest.mark.django_db(transaction=True)
def test_a_task_finished_receiver_that_raises_leaves_the_outcome_as_recorded(caplog):
    def broken(sender: Any, task_result: Any, **kwargs: Any) -> None:
        raise RuntimeError("receiver broke")

    task_finished.connect(broken)
    try:
        result = django_jobs.add.enqueue(4)
        run_burst(threads=1)
    finally:
        task_finished.disconnect(broken)
    assert django_jobs.add.get_result(result.id).return_value == 4
    (record,) = [r for r in caplog.records if "a task_finished receiver" in r.getMessage()]
    invocation = Invocation.objects.get(pk=int(result.id))
    assert record.name == "keyjobs.backend" and not record.getMessage().startswith("keyjobs:")
    assert (record.invocation_id, record.task, record.key) == (invocation.pk, invocation.task_name,
                                                               invocation.running_key)


@pytest.mark.django_db
def test_settings_change_the_options_of_a_task_declared_through_django(settings):
    settings.KEYJOBS_TASK_OPTIONS = {django_jobs.sync_account.module_path: {"running_limit": 2}}
    result = django_jobs.sync_account.enqueue("acme", "x")
    assert django_jobs.sync_account.keyjobs_spec.policy.limit == 2
    assert Invocation.objects.get(pk=int(result.id)).running_limit == 2
