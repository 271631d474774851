"""What the demo's commands share: their option types, their common options, and how they report.

Each type turns bad input into an ``argparse.ArgumentTypeError``, so that it
is refused in one line while the options are parsed, before anything starts.
"""

import argparse
from collections.abc import Callable
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from demo_project.provider import MAX_HOLD, check_hold
from demo_project.scenarios import ACCOUNTS, APIS, OPS, SCENARIOS, DemoError, Scenario, Summary
from keyjobs.management.arguments import positive_int


def scenario_choice(text: str) -> list[Scenario]:
    """Return the scenarios named by ``text``: one letter, or ``all``."""
    if text.lower() == "all":
        return list(SCENARIOS.values())
    try:
        return [SCENARIOS[text.upper()]]
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown scenario {text!r}; choose {', '.join(SCENARIOS)} or all") from None


def hold_seconds(text: str) -> float:
    try:
        return check_hold(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds from 0 to {MAX_HOLD:g}, not {text!r}") from None


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    # Written so that nan, which compares false with everything, is refused too.
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return value


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be from 0 to 65535, not {port}")
    return port


class ScenarioCommand(BaseCommand):
    """A command that runs scenarios and prints their summaries."""

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        # argparse prints the usage above an error; --help still shows it.
        parser.print_usage = lambda file=None: None  # type: ignore[method-assign]
        return parser

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--accounts", type=positive_int, default=len(ACCOUNTS),
                            help="Accounts to call the provider for (default %(default)s).")
        parser.add_argument("--ops", type=positive_int, default=len(OPS), help="Ops to call per account (default %(default)s).")
        parser.add_argument("--timeout", type=positive_seconds, default=None,
                            help="Seconds to wait for a scenario's invocations to end (default: well over what it needs).")
        parser.add_argument("--no-log", action="store_true", help="Leave out the provider's call logs.")
        parser.add_argument("--api", choices=APIS, default="keyjobs",
                            help="Enqueue with keyjobs' delay() or through Django's tasks framework, "
                            "django.tasks (default %(default)s).")

    def through(self, chosen: list[Scenario], api: str) -> list[Scenario]:
        """Return the scenarios chosen, enqueued through ``api``: all of them that can be, for a choice of all."""
        if api == "keyjobs":
            return chosen
        if len(chosen) > 1:
            # "all": the scenarios that have a task declared for that API.
            chosen = [scenario for scenario in chosen if _can(scenario, api)] or chosen
        try:
            return [scenario.through(api) for scenario in chosen]
        except DemoError as exc:
            raise CommandError(str(exc)) from None

    def reporter(self, *, log: bool) -> Callable[[Summary], None]:
        """Return a function that prints a summary as soon as it is in."""

        def report(summary: Summary) -> None:
            self.stdout.write(summary.report(log=log) + "\n")
            # Now, not when a buffer fills: the workers write to the same terminal.
            self.stdout.flush()

        return report

    def judge(self, summaries: list[Summary]) -> None:
        """Raise CommandError, and so exit non-zero, if any scenario went wrong."""
        problems = [problem for summary in summaries for problem in summary.problems()]
        if problems:
            raise CommandError("; ".join(problems))


def _can(scenario: Scenario, api: str) -> bool:
    try:
        scenario.through(api)
    except DemoError:
        return False
    return True
