from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.utils import timezone

from keyjobs.models import Event, Invocation
from tests.factories import EventFactory, InvocationFactory

pytestmark = pytest.mark.django_db


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


def test_prune_dry_run_deletes_nothing():
    InvocationFactory(status="SUCCESS", finished_at=timezone.now() - timedelta(days=10))
    out = StringIO()
    call_command("prunejobs", "--dry-run", stdout=out)
    assert Invocation.objects.count() == 1 and "1 finished invocation(s) would be deleted" in out.getvalue()


def test_prune_refuses_a_bad_duration():
    with pytest.raises(Exception, match="is not a duration like 30d"):
        call_command("prunejobs", "--older-than", "week")
