"""The accounts page, its live part, and the POSTs of its buttons.

The POST views run in one transaction (``transaction.atomic``): the
invocations ``delay()`` inserts commit with the request, or not at all if the
view raises after them, and no worker sees them before the request commits.
"""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db import transaction
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_POST

from .actions import ACTIONS
from .activity import activity
from .forms import ActionForm, PlanForm
from .models import Account


@login_required
@require_GET
def account_list(request: HttpRequest) -> HttpResponse:
    """Show every account with its buttons, its plan, and its recent calls."""
    shown = activity(list(Account.objects.all()))
    return render(request, "accounts/account_list.html", {
        "activity": shown,
        "rows": [(row, PlanForm(instance=row.account, auto_id=f"id_%s_{row.account.name}")) for row in shown.rows],
        "actions": list(ACTIONS.values()),
    })


@login_required
@require_GET
def account_activity(request: HttpRequest) -> HttpResponse:
    """Return the live part of the page alone, which its script swaps in while work runs."""
    return render(request, "accounts/_activity.html", {"activity": activity(list(Account.objects.all()))})


@login_required
@require_POST
@transaction.atomic
def act(request: HttpRequest, name: str) -> HttpResponse:
    """Enqueue what the pressed button stands for, then go back to the page."""
    account = get_object_or_404(Account, name=name)
    form = ActionForm(request.POST)
    if not form.is_valid():
        return HttpResponseBadRequest(f"unknown action: {form.errors.as_text()}")
    action = ACTIONS[form.cleaned_data["action"]]
    invocations = action.enqueue(account)
    merged = [invocation for invocation in invocations if invocation.reused]
    created = [invocation for invocation in invocations if not invocation.reused]
    told = []
    if created:
        told.append(f"registered {', '.join(f'#{invocation.pk}' for invocation in created)}")
    if merged:
        told.append(f"merged into the waiting {', '.join(f'#{invocation.pk}' for invocation in merged)}")
    messages.success(request, f"{account} · {action.label}: {' and '.join(told)} ({action.task_name.rpartition('.')[2]}: "
                              f"{action.rule}).")
    return redirect("accounts:list")


@login_required
@require_POST
@transaction.atomic
def save(request: HttpRequest, name: str) -> HttpResponse:
    """Save the account's plan; its post_save receiver asks for a refresh in the same transaction."""
    account = get_object_or_404(Account, name=name)
    form = PlanForm(request.POST, instance=account)
    if not form.is_valid():
        return HttpResponseBadRequest(f"invalid plan: {form.errors.as_text()}")
    form.save()
    messages.success(request, f"{account} saved: a refresh is asked for; saves close together merge into one.")
    return redirect("accounts:list")
