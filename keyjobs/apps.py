from django.apps import AppConfig
from django.utils.module_loading import autodiscover_modules


class KeyjobsConfig(AppConfig):
    name = "keyjobs"
    verbose_name = "keyjobs"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import (
            checks,  # noqa: F401  (registers the checks)
            runlogs,
            signals,
        )
        from .conf import conf

        # What a task logs while it runs is kept with its invocation (keyjobs.runlogs).
        runlogs.install()
        signals.invocation_finished.connect(runlogs.flush_run, dispatch_uid="keyjobs.runlogs.flush_run")

        if conf.AUTODISCOVER:
            autodiscover_modules("tasks")
