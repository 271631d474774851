from django.contrib import admin

from .models import Account


@admin.register(Account)
class AccountAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Accounts, editable: each save asks for a refresh through the model's post_save receiver."""

    list_display = ["name", "plan", "last_synced_at", "last_refreshed_at"]
    list_filter = ["plan"]
    search_fields = ["name"]
    # Stamped by the workers when a call succeeds, never by hand.
    readonly_fields = ["last_synced_at", "last_refreshed_at"]
