import argparse
from typing import Any

from django.conf import settings
from django.core.management.base import CommandError

from demo_project import scenarios
from demo_project.management import ScenarioCommand, hold_seconds, scenario_choice


class Command(ScenarioCommand):
    help = (
        "Run demo scenarios on the provider at settings.PROVIDER_URL and the workers already running, "
        "and print what the provider and the database saw."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("scenario", type=scenario_choice, metavar=scenarios.CHOICES, help="The scenario to run, or all in order.")
        super().add_arguments(parser)
        parser.add_argument("--hold", type=hold_seconds, default=None,
                            help="Change the provider's hold to this many seconds (default: keep it).")

    def handle(self, *args: Any, scenario: list[scenarios.Scenario], accounts: int, ops: int, hold: float | None,
               timeout: float | None, no_log: bool, api: str, **options: Any) -> None:
        scenario = self.through(scenario, api)
        if not scenarios.live_threads():
            self.stderr.write("no worker is running: the invocations wait for one (python manage.py runworker --threads 8)")
        try:
            with scenarios.ProviderClient(settings.PROVIDER_URL) as provider:
                summaries = scenarios.run_all(
                    scenario, provider, load=scenarios.Load.scaled(accounts, ops), hold=hold, timeout=timeout,
                    report=self.reporter(log=not no_log),
                )
        except scenarios.DemoError as exc:
            raise CommandError(str(exc)) from None
        self.judge(summaries)
