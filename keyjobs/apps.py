from django.apps import AppConfig
from django.utils.module_loading import autodiscover_modules


class KeyjobsConfig(AppConfig):
    name = "keyjobs"
    verbose_name = "keyjobs"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the checks)
        from .conf import conf

        if conf.AUTODISCOVER:
            autodiscover_modules("tasks")
