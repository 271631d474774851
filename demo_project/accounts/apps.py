from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "demo_project.accounts"
    label = "accounts"
    verbose_name = "Client accounts"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Connected here, in every process the site's settings start: the
        # site's (a save asks for a refresh) and each worker's (a finished call
        # stamps its account).
        from . import receivers  # noqa: F401
