"""The documentation (docs/, README.md, CHANGELOG.md) against the code.

- The generated reference pages (``docs/_ext/keyjobs_reference.py``) show
  everything the code declares: each test reads the code by another route
  than the generator (the source text, Django's registries, the parsers) and
  fails when a page lacks something.
- Every Python snippet runs, in order with its page's others, or is marked
  ``<!-- illustrative: reason -->`` just above it.
- The choices the docs name are the parsers', the changelog lists every
  migration, and the README stays a short front door.
"""

import argparse
import importlib
import importlib.metadata
import importlib.util
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.core.checks.registry import registry
from django.core.management import get_commands, load_command_class
from django.dispatch import Signal

import keyjobs
from demo_project import scenarios
from keyjobs import exceptions, status
from keyjobs import registry as registry_of_tasks
from keyjobs.declare import Task

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS / "_ext"))

import keyjobs_reference as reference  # noqa: E402

PACKAGE = ROOT / "keyjobs"


def package_source() -> Iterator[tuple[Path, str]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        if "migrations" not in path.parts:
            yield path, path.read_text()


# -- the generated reference ---------------------------------------------------------------------------


def accepted_task_options() -> set[str]:
    """Return what @task takes: Task.__init__'s keyword parameters, and TaskOptions' keys once it exists."""
    import inspect
    import typing

    accepted = {name for name, parameter in inspect.signature(Task.__init__).parameters.items()
                if parameter.kind is parameter.KEYWORD_ONLY}
    if importlib.util.find_spec("keyjobs.options") is not None:
        from keyjobs import options  # type: ignore[attr-defined,unused-ignore]

        accepted |= set(typing.get_type_hints(options.TaskOptions))
    return accepted


def test_every_task_option_is_documented_with_its_type_and_default() -> None:
    accepted = accepted_task_options()
    page = reference.task_options_page()

    missing = sorted(name for name in accepted if f"| `{name}` |" not in page)

    assert accepted and not missing, f"@task options missing from the reference: {missing}"
    assert all(option.type and option.default for option in reference.task_options())


def test_every_task_option_has_a_description_once_options_are_declared() -> None:
    if importlib.util.find_spec("keyjobs.options") is None:
        return  # Until TaskOptions lands, the reference reads Task.__init__, which has no descriptions (not a skip: CI fails those).

    undescribed = [option.name for option in reference.task_options() if not option.description]

    assert not undescribed, f"options without a description in keyjobs.options.TaskOptions: {undescribed}"


def test_every_setting_keyjobs_reads_is_documented() -> None:
    read = {name for _, text in package_source() for name in re.findall(r"\"(KEYJOBS_[A-Z_]+)\"", text)}
    page = reference.settings_page()

    missing = sorted(name for name in read if f"| `{name}` |" not in page)

    assert read and not missing, f"settings read by keyjobs but missing from the reference: {missing}"


def test_every_system_check_id_is_documented() -> None:
    ids = {found for _, text in package_source() for found in re.findall(r"id=\"(keyjobs\.[EW]\d{3})\"", text)}
    page = reference.checks_page()

    missing = sorted(identifier for identifier in ids if f"| `{identifier}` |" not in page)

    assert ids and not missing, f"check ids in the code but missing from the reference: {missing}"


def test_every_system_check_message_has_an_id_of_its_own() -> None:
    found = reference.checks()
    ids = [check.id for check in found]

    shared = [(check.id, check.message) for check in found if ids.count(check.id) > 1]

    assert found and not shared, f"check ids given to more than one message: {shared}"


def test_every_registered_check_of_keyjobs_has_its_messages_documented() -> None:
    registered = {f"{check.__module__}.{check.__name__}" for check in registry.get_checks(include_deployment_checks=True)
                  if check.__module__.split(".")[0] == "keyjobs"}
    documented = {check.function for check in reference.checks()}
    page = reference.checks_page()

    # A registered check documents itself, or the helper it returns the messages of.
    silent = sorted(name for name in registered
                    if name not in documented and not any(doc.rsplit(".", 1)[0] == name.rsplit(".", 1)[0] for doc in documented))

    assert registered and not silent, f"registered checks with no message in the reference: {silent}"
    assert all(check.message for check in reference.checks()), page


def test_every_status_and_every_legal_change_is_documented() -> None:
    page = reference.statuses_page()

    statuses = [member.value for member in status.Status if f"| `{member.value}` |" not in page]
    changes = [(source.value, target.value) for source, targets in status.TRANSITIONS.items() for target in targets
               if f"| `{source.value}` | `{target.value}` |" not in page]

    assert not statuses and not changes, f"missing from the statuses page: {statuses} {changes}"
    assert all(meaning for meaning in reference.status_comments().values()), "a status without its comment in status.py"


def test_the_lifecycle_diagram_draws_every_status_and_every_change() -> None:
    svg = reference.transitions_svg()

    boxes = re.findall(r">([A-Z_]+)</text>", svg)
    arrows = svg.count('marker-end="url(#arrow)"')

    assert sorted(boxes) == sorted(member.value for member in status.Status)
    assert arrows == sum(len(targets) for targets in status.TRANSITIONS.values())


def test_every_signal_is_documented() -> None:
    declared = {name for name, value in vars(keyjobs.signals).items() if isinstance(value, Signal)}
    declared |= {name for _, text in package_source() for name in re.findall(r"^(\w+) = Signal\(", text, re.M)}
    page = reference.signals_page()

    missing = sorted(name for name in declared if f"keyjobs.signals.{name}`" not in page)

    assert declared and not missing, f"signals missing from the reference: {missing}"
    assert all(text for _, text in reference.signals()), "a signal without its #: comment in keyjobs/signals.py"


def test_every_exception_keyjobs_exports_or_defines_is_documented() -> None:
    exported = {name for name in keyjobs.__all__
                if isinstance(getattr(keyjobs, name), type) and issubclass(getattr(keyjobs, name), BaseException)}
    defined = {name for name, value in vars(exceptions).items()
               if isinstance(value, type) and issubclass(value, BaseException) and value.__module__ == exceptions.__name__}
    page = reference.exceptions_page()

    missing = sorted(name for name in exported | defined if f".{name}` |" not in page)

    assert exported and not missing, f"exceptions missing from the reference: {missing}"
    assert all(text for _, _, text in reference.exceptions()), "an exception without a docstring"


def _own_options(parser: argparse.ArgumentParser) -> list[str]:
    return [option for action in parser._actions
            if action.help != argparse.SUPPRESS and not set(action.option_strings) & reference.DJANGO_OPTIONS
            for option in action.option_strings]


@pytest.mark.parametrize("name", sorted(name for name, app in get_commands().items()
                                        if app.split(".")[0] in ("keyjobs", "demo_project")))
def test_every_management_command_and_each_of_its_options_is_documented(name: str) -> None:
    app = get_commands()[name]
    parser = load_command_class(app, name).create_parser("manage.py", name)
    page = reference.commands_page()
    section = page.split(f"### `{name}`\n", 1)[1].split("\n### ", 1)[0] if f"### `{name}`\n" in page else ""

    missing = [option for option in _own_options(parser) if f"`{option}`" not in section]

    assert section, f"the command {name} is missing from the reference"
    assert not missing, f"options of {name} missing from the reference: {missing}"


def test_every_command_module_of_keyjobs_is_a_command_the_reference_lists() -> None:
    modules = {path.stem for path in (PACKAGE / "management" / "commands").glob("*.py") if path.stem != "__init__"}

    assert modules <= set(reference.commands().get("keyjobs", []))


def test_every_monitor_url_is_documented_with_what_it_shows() -> None:
    from django.urls import reverse

    page = reference.monitor_urls_page()
    own = [url for url in reference.monitor_urls() if not url.name.endswith(reference.ADMIN_PAGES)]

    undescribed = [url.name for url in own if not url.description]
    missing = [url.name for url in own if f"`{url.name}`" not in page]

    assert {"admin:keyjobs_invocation_timeline", "admin:keyjobs_invocation_dashboard"} <= {url.name for url in own}
    assert reverse("admin:keyjobs_invocation_timeline") in page
    assert not undescribed, f"monitor views without a docstring saying what they show: {undescribed}"
    assert not missing


@pytest.mark.django_db
def test_every_metric_the_endpoint_writes_is_documented_with_its_type() -> None:
    """Run the endpoint's writer (when there is one) and read its TYPE lines: the page shows each, with that type."""
    page = reference.metrics_page()
    if importlib.util.find_spec(reference.METRICS_MODULE) is None:
        assert "no metrics endpoint" in page
        return
    module = importlib.import_module(reference.METRICS_MODULE)

    written = dict(re.findall(r"^# TYPE (\w+) (\w+)$", "".join(module.lines("default")), re.M))
    missing = {name: kind for name, kind in written.items() if f"| `{name}` | {kind} |" not in page}

    assert written and not missing, f"metrics written but missing from the reference: {missing}"
    assert all(metric.help for metric in reference.metrics())


def test_every_logger_of_keyjobs_is_on_the_logging_page() -> None:
    page = (DOCS / "reference" / "logging.md").read_text()
    loggers = {".".join(path.relative_to(ROOT).with_suffix("").parts) for path, text in package_source()
               if re.search(r"getLogger\(__name__\)", text)}

    missing = sorted(name for name in loggers if f"`{name}`" not in page)

    assert loggers and not missing, f"loggers missing from docs/reference/logging.md: {missing}"


def test_every_name_keyjobs_exports_is_in_the_api_reference() -> None:
    api = (DOCS / "reference" / "api.md").read_text()
    elsewhere = reference.exceptions_page() + (DOCS / "reference" / "statuses.md").read_text()

    missing = [name for name in keyjobs.__all__
               if f"keyjobs.{name}\n" not in api and f"keyjobs.{name}`" not in api + elsewhere]

    assert not missing, f"exported by keyjobs but in no reference page: {missing} (add an autodoc line to reference/api.md)"


def test_the_benchmark_tables_show_every_row_of_every_committed_result_file_with_its_date_and_machine() -> None:
    import json

    page = reference.bench_page()
    snapshots = sorted(reference.BENCH_SNAPSHOTS.glob("*.json"))

    for path in snapshots:
        data = json.loads(path.read_text())
        assert data["date"][:10] in page and data["machine"]["cpu"] in page
        assert all(f"| {row['case']} | {row['db']} | {row['system']} |" in page for row in data["results"]), path.name
    assert snapshots, "a snapshot of python -m bench is committed under docs/explanation/bench-results/"


# -- snippets --------------------------------------------------------------------------------------------

FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<language>\S*)\s*$")
ILLUSTRATIVE = re.compile(r"<!--\s*illustrative:\s*(?P<reason>\S.*?)\s*-->")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(path for path in DOCS.rglob("*.md")
                                       if "_build" not in path.parts and "generated" not in path.parts)]


def snippets(path: Path) -> list[tuple[int, str, str | None]]:
    """Return the page's Python snippets: (line, code, the reason it is illustrative, or None)."""
    found = []
    lines = path.read_text().splitlines()
    number = 0
    while number < len(lines):
        fence = FENCE.match(lines[number])
        if not fence or not fence["language"]:
            number += 1
            continue
        indent, start = fence["indent"], number
        end = next(row for row in range(start + 1, len(lines)) if lines[row].strip() == "```")
        if fence["language"] == "python":
            body = "\n".join(line[len(indent):] for line in lines[start + 1:end])
            above = next((lines[row] for row in range(start - 1, -1, -1) if lines[row].strip()), "")
            marked = ILLUSTRATIVE.search(above)
            found.append((start + 1, body, marked["reason"] if marked else None))
        number = end + 1
    return found


@pytest.mark.parametrize("page", [path for path in pages() if snippets(path)], ids=lambda path: str(path.relative_to(ROOT)))
@pytest.mark.django_db
def test_every_python_snippet_runs_or_says_why_it_is_illustrative(page: Path) -> None:
    """Run the page's snippets in order, in one fresh module: a task they declare is a module-level function."""
    name = "docs_snippets." + re.sub(r"\W", "_", str(page.relative_to(ROOT).with_suffix("")))
    module = types.ModuleType(name)
    sys.modules[name] = module
    declared = registry_of_tasks.all_tasks()
    try:
        for line, body, reason in snippets(page):
            if reason is not None:
                continue
            try:
                exec(compile(body, f"{page.relative_to(ROOT)}:{line}", "exec"), module.__dict__)
            except Exception as error:
                pytest.fail(f"{page.relative_to(ROOT)}, the snippet at line {line} fails: {error!r}; "
                            "fix it, or mark it <!-- illustrative: why --> just above its fence")
    finally:
        del sys.modules[name]
        # The snippets' tasks leave with their module: a worker of a later test must not sync their schedules.
        registry_of_tasks._tasks.clear()
        registry_of_tasks._tasks.update(declared)
        registry_of_tasks._generation += 1


def test_the_snippet_finder_sees_every_python_fence() -> None:
    fences = sum(len(re.findall(r"^[ ]*```python\s*$", path.read_text(), re.M)) for path in pages())

    assert fences == sum(len(snippets(path)) for path in pages()) > 10


# -- what the docs name ----------------------------------------------------------------------------------


def test_the_scenarios_the_docs_name_are_the_demo_commands_choices() -> None:
    expected = ", ".join(scenarios.SCENARIOS)
    named = [(path.name, found) for path in pages() for found in re.findall(r"\b([A-Z](?:, [A-Z])+) or all\b", path.read_text())]

    assert named, "the docs name the demo's scenarios somewhere"
    assert all(found == expected for _, found in named), f"the demo's scenarios are {expected}: {named}"
    for command in ("demo", "enqueue"):
        parser = load_command_class("demo_project", command).create_parser("manage.py", command)
        [scenario] = [action for action in parser._actions if action.dest == "scenario"]
        assert scenario.metavar == "|".join([*scenarios.SCENARIOS, "all"])


def test_the_changelog_lists_every_migration() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    migrations = sorted(path.stem for path in (PACKAGE / "migrations").glob("0*.py"))

    missing = [name for name in migrations if f"`{name}`" not in changelog]

    assert migrations and not missing, f"migrations missing from CHANGELOG.md (list each under its release): {missing}"


def test_the_changelog_has_a_section_for_the_version() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    version = importlib.metadata.version("keyjobs")

    section = "## [Unreleased]" if ".dev" in version else f"## [{version}]"

    assert section in changelog


def test_the_readme_is_a_short_front_door_with_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()

    assert len(readme.splitlines()) <= 200
    assert "make demo   #" in readme and "make test   #" in readme
