from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.utils import timezone

from keyjobs.models import Event, Invocation
from tests.commands import assert_usage_error
from tests.factories import EventFactory, InvocationFactory


@pytest.mark.django_db
def test_prune_deletes_old_finished_invocations_and_their_history_only():
    old = InvocationFactory(status="SUCCESS", finished_at=timezone.now() - timedelta(days=10))
    EventFactory(invocation=old)
    recent = InvocationFactory(status="FAILED", finished_at=timezone.now() - timedelta(days=1))
    waiting = InvocationFactory(status="REGISTERED")
    out = StringIO()
    call_command("prunejobs", "--older-than", "7d", stdout=out)
    assert set(Invocation.objects.values_list("pk", flat=True)) == {recent.pk, waiting.pk}
    assert not Event.objects.filter(invocation_id=old.pk).exists()
    assert "deleted 1 finished invocation(s)" in out.getvalue()


@pytest.mark.django_db
def test_prune_dry_run_deletes_nothing():
    InvocationFactory(status="SUCCESS", finished_at=timezone.now() - timedelta(days=10))
    out = StringIO()
    call_command("prunejobs", "--dry-run", stdout=out)
    assert Invocation.objects.count() == 1 and "1 finished invocation(s) would be deleted" in out.getvalue()


@pytest.mark.django_db
def test_prune_deletes_in_batches_of_the_given_size():
    for _ in range(3):
        InvocationFactory(status="SUCCESS", finished_at=timezone.now() - timedelta(days=10))
    out = StringIO()
    call_command("prunejobs", "--batch", "2", stdout=out)
    assert not Invocation.objects.exists() and "deleted 3 finished invocation(s)" in out.getvalue()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--older-than", "nonsense"], "argument --older-than: 'nonsense' is not a duration like 30d, 12h"),
        (["--older-than=-1 day"], "argument --older-than: must not be negative, not '-1 day'"),
        (["--batch", "-1"], "argument --batch: must be at least 1, not -1"),
        (["--batch", "many"], "argument --batch: 'many' is not a whole number"),
    ],
)
def test_bad_arguments_get_a_one_line_usage_error_and_exit_2(arguments, message):
    assert_usage_error("prunejobs", arguments, message)


@pytest.mark.django_db
def test_prune_deletes_the_rollups_minutes_past_their_keeping_per_task_and_per_key_and_keeps_the_totals():
    from django.test import override_settings

    from keyjobs.models import KeyMinute, TaskMinute, TaskTotal

    now = timezone.now().replace(second=0, microsecond=0)
    for age in (timedelta(days=9), timedelta(days=2), timedelta(minutes=5)):
        TaskMinute.objects.create(task_name="t", minute=now - age, succeeded=1)
        KeyMinute.objects.create(task_name="t", key="k", minute=now - age, succeeded=1)
    TaskTotal.objects.create(task_name="t", succeeded=3)
    out = StringIO()
    call_command("prunejobs", stdout=out)  # the defaults: 8 days per task, 1 day per key
    assert sorted(now - m for m in TaskMinute.objects.values_list("minute", flat=True)) == [
        timedelta(minutes=5), timedelta(days=2)]
    assert list(KeyMinute.objects.values_list("minute", flat=True)) == [now - timedelta(minutes=5)]
    assert "3 rollup minute(s) past their keeping" in out.getvalue()
    with override_settings(KEYJOBS_ROLLUP_KEEP=timedelta(hours=1)):
        call_command("prunejobs", stdout=StringIO())
    assert TaskMinute.objects.count() == 1 and TaskTotal.objects.get().succeeded == 3


@pytest.mark.django_db
def test_the_rollup_duty_prunes_what_is_past_its_keeping():
    from keyjobs.duties import RollUp
    from keyjobs.models import KeyMinute

    KeyMinute.objects.create(task_name="t", key="k", minute=timezone.now() - timedelta(days=2), succeeded=1)

    class Host:
        using = "default"

    RollUp().run(Host())  # type: ignore[arg-type]
    assert not KeyMinute.objects.exists()
