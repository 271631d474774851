"""The accounts' signal receivers: a saved account asks for a refresh; a finished call stamps its account."""

from typing import Any

from django.db.models.functions import Now
from django.db.models.signals import post_save
from django.dispatch import receiver

from keyjobs import Status
from keyjobs.models import Invocation
from keyjobs.signals import invocation_finished

from .actions import STAMPS, refresh
from .models import Account


@receiver(post_save, sender=Account, dispatch_uid="accounts.refresh_saved_account")
def refresh_saved_account(sender: type[Account], instance: Account, raw: bool = False, **kwargs: Any) -> None:
    """Ask for a refresh, in the transaction of the save: rolled back with it, merged with the next saves'."""
    if raw:
        # loaddata: the row is restored, not changed.
        return
    refresh(instance)


@receiver(invocation_finished, dispatch_uid="accounts.stamp_account")
def stamp_account(sender: type[Invocation], invocation: Invocation, status: Status, **kwargs: Any) -> None:
    """Record on the account when one of the demo's calls for it succeeded (sent in the worker)."""
    field = STAMPS.get(invocation.task_name)
    if field is None or status != Status.SUCCESS:
        return
    account = invocation.kwargs.get("account_id") or next(iter(invocation.args), None)
    # update(), not save(): a save would send post_save, and ask for another refresh.
    Account.objects.filter(name=account).update(**{field: Now()})
