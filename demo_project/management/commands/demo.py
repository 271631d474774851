import argparse
import signal
from typing import Any

from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connections

from demo_project import scenarios
from demo_project.management import ScenarioCommand, hold_seconds, port_number, positive_int, scenario_choice
from demo_project.provider import DEFAULT_HOLD, DEFAULT_PORT
from keyjobs.conf import conf


class Command(ScenarioCommand):
    help = (
        "Run the demo end to end: start the provider and the workers, run the scenarios, print what the "
        "provider and the database saw, and stop what was started."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "scenario", nargs="?", type=scenario_choice, default="all", metavar=scenarios.CHOICES,
            help="The scenario to run (default: all, in order).",
        )
        super().add_arguments(parser)
        parser.add_argument("--hold", type=hold_seconds, default=DEFAULT_HOLD,
                            help="Seconds the provider holds each call (default %(default)s).")
        parser.add_argument("--threads", type=positive_int, default=8, help="Threads per worker (default %(default)s).")
        parser.add_argument("--workers", type=positive_int, default=1, help="Worker processes (default %(default)s).")
        parser.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                            help="The provider's port, 0 for any free one (default %(default)s).")

    def handle(self, *args: Any, scenario: list[scenarios.Scenario], accounts: int, ops: int, hold: float,
               threads: int, workers: int, port: int, timeout: float | None, no_log: bool, api: str,
               **options: Any) -> None:
        scenario = self.through(scenario, api)
        call_command("migrate", verbosity=0)
        database = connections[conf.DATABASE].settings_dict
        # A kill of the demo stops what it started, as a Ctrl-C does; and a Ctrl-C does even when the demo was
        # started in the background, with SIGINT ignored (as `make site` does).
        previous = {number: signal.signal(number, signal.default_int_handler)
                    for number in (signal.SIGINT, signal.SIGTERM)}
        try:
            with scenarios.Stack(port=port, hold=hold, threads=threads, workers=workers) as stack:
                self.stdout.write(
                    f"provider at {stack.url} holding each call {hold:.2f}s; runworker × {workers} with "
                    f"{threads} thread(s) each; database {database['ENGINE'].rsplit('.', 1)[-1]} {database['NAME']}\n"
                )
                self.stdout.flush()
                with scenarios.ProviderClient(stack.url) as provider:
                    summaries = scenarios.run_all(
                        scenario, provider, load=scenarios.Load.scaled(accounts, ops),
                        threads=threads * workers, timeout=timeout, report=self.reporter(log=not no_log),
                    )
        except KeyboardInterrupt:
            raise CommandError("interrupted; the provider and the workers are stopped", returncode=130) from None
        except scenarios.DemoError as exc:
            hint = "; stop what uses it, or pass --port 0 for any free port" if "already in use" in str(exc) else ""
            raise CommandError(f"{exc}{hint}") from None
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
        self.judge(summaries)
