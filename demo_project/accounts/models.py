from django.db import models


class Account(models.Model):
    """A client account of the SaaS, on whose behalf the demo's tasks call the provider."""

    class Plan(models.TextChoices):
        FREE = "free", "Free"
        TEAM = "team", "Team"
        ENTERPRISE = "enterprise", "Enterprise"

    #: The ``account_id`` the demo's tasks take and are keyed on.
    name = models.SlugField(max_length=50, unique=True)
    plan = models.CharField(max_length=20, choices=Plan.choices, default=Plan.FREE)
    #: When a call for the account last succeeded (``call_keyed``, ``call_keyed_drop``, ``call_unsafe``).
    last_synced_at = models.DateTimeField("last synced", null=True, blank=True)
    #: When ``refresh_once`` last succeeded for the account.
    last_refreshed_at = models.DateTimeField("last refreshed", null=True, blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name
