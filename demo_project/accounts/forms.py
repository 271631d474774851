from django import forms

from .actions import ACTIONS
from .models import Account


class ActionForm(forms.Form):
    """The button pressed on an account's row."""

    action = forms.ChoiceField(choices=[(action.slug, action.label) for action in ACTIONS.values()])


class PlanForm(forms.ModelForm):  # type: ignore[type-arg]
    """Change an account's plan on the site; saving it asks for a refresh, as a save in the admin does."""

    class Meta:
        model = Account
        fields = ["plan"]
