"""The shape of keyjobs' imports: dependencies run one way, and only the PostgreSQL modules load psycopg.

Read from the source with ``ast``, so that the rule holds for every module,
including ones no test imports. Two graphs: what a module imports when it is
imported (``GRAPH``), and what it imports at all, in its functions too
(``CALL_GRAPH``): an import inside a function is still a dependency, so the
layers must hold there as well. Imports under ``if TYPE_CHECKING:`` are type
hints, which never run, and count in neither.
"""

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "keyjobs"
#: The modules that may import psycopg when they are imported.
POSTGRES_MODULES = {"keyjobs.postgres", "keyjobs.store.postgres"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_time_statements(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """Return the imports among ``body`` that run when the module is imported."""
    found: list[ast.Import | ast.ImportFrom] = []
    for statement in body:
        if isinstance(statement, ast.Import | ast.ImportFrom):
            found.append(statement)
        elif isinstance(statement, ast.If):
            if not is_type_checking(statement.test):
                found += import_time_statements(statement.body)
            found += import_time_statements(statement.orelse)
        elif isinstance(statement, ast.Try):
            for block in (statement.body, *(handler.body for handler in statement.handlers),
                          statement.orelse, statement.finalbody):
                found += import_time_statements(block)
        elif isinstance(statement, ast.With | ast.ClassDef):
            found += import_time_statements(statement.body)
    return found


def every_import_statement(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Return every import of ``tree``: inside functions and under ``if TYPE_CHECKING:`` too."""
    return [node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)]


def imported_modules(name: str, *, every: bool = False) -> set[str]:
    """Return the modules that importing module ``name`` imports by name, resolved to absolute names.

    ``every``: also those it imports in its functions, or for its type hints only.
    """
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    imported = set()
    for statement in every_import_statement(tree) if every else import_time_statements(tree.body):
        imported |= resolved(statement, package)
    return imported


def resolved(statement: ast.Import | ast.ImportFrom, package: str) -> set[str]:
    """Return the absolute names of the modules ``statement``, in ``package``, imports."""
    if isinstance(statement, ast.Import):
        return {alias.name for alias in statement.names}
    base = package
    for _ in range(statement.level - 1):
        base = base.rpartition(".")[0]
    source = ".".join(filter(None, [base if statement.level else "", statement.module or ""]))
    # `from . import claim` imports the module keyjobs.claim; `from .claim import x` imports keyjobs.claim.
    return {f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source for alias in statement.names}


GRAPH = {name: {other for other in imported_modules(name) if other in MODULES and other != name} for name in MODULES}


def call_time_statements(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Return the imports of ``tree`` inside its functions, but those under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and is_type_checking(node.test):
            for child in node.orelse:
                visit(child, in_function)
            return
        if isinstance(node, ast.Import | ast.ImportFrom) and in_function:
            found.append(node)
        inside = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(tree, False)
    return found


def call_time_imports(name: str) -> set[str]:
    """Return the keyjobs modules (and psycopg) that module ``name`` imports inside its functions."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    imported = set()
    for statement in call_time_statements(ast.parse(path.read_text(), filename=str(path))):
        imported |= resolved(statement, package)
    return {other for other in imported if (other in MODULES or other.split(".")[0] == "psycopg") and other != name}


#: The imports inside functions that keyjobs allows, each with why. Any other is a dependency hidden from the
#: module-level graph, and is refused: import at module level, or move the code to the layer it belongs to.
CALL_TIME = {
    # App loading: ``keyjobs/__init__`` exports @task, current() and emit() while Django populates
    # INSTALLED_APPS, before models can be imported; these reach the models only when called.
    ("keyjobs.declare", "keyjobs.enqueue"): "app loading: Task.delay() inserts through enqueue and its models",
    ("keyjobs.firing", "keyjobs.enqueue"): "app loading: emit() is exported by keyjobs",
    ("keyjobs.firing", "keyjobs.models"): "app loading: emit() is exported by keyjobs",
    ("keyjobs.apps", "keyjobs.checks"): "app loading: the checks register once the app is ready",
    ("keyjobs.apps", "keyjobs.conf"): "app loading: settings are read once the app is ready",
    ("keyjobs.apps", "keyjobs.runlogs"): "app loading: the run logs' handler is installed once the app is ready",
    ("keyjobs.apps", "keyjobs.signals"): "app loading: the run logs' receiver is connected once the app is ready",
    # The optional psycopg: keyjobs runs on SQLite without it installed.
    ("keyjobs.store", "keyjobs.store.postgres"): "the optional psycopg: loaded for a PostgreSQL database only",
}
#: Model methods that call a service (``inv.cancel()``, ``inv.wait()``): the Django idiom, as
#: ``User.set_password()`` calls the hashers. They point up, from the models to the engine that uses
#: them, so they are out of ``CALL_GRAPH``; each is a one-line delegation to its service's function.
SERVICES = {
    ("keyjobs.models", "keyjobs.control"): "Invocation.cancel() is control.cancel() of one invocation",
    ("keyjobs.models", "keyjobs.waits"): "Invocation.wait(), get_result() and aget_result() are waits' waits",
}

CALL_GRAPH = {
    name: GRAPH[name] | {other for other in call_time_imports(name) if (name, other) not in SERVICES and other in MODULES}
    for name in MODULES
}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """Return one cycle of ``graph`` as a path that ends where it starts, or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return [*path[path.index(node):], node]
        if node in done:
            return None
        path.append(node)
        for successor in sorted(graph[node]):
            cycle = visit(successor)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start)
        if cycle:
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_relative_and_absolute_imports():
    # A guard against a parser that finds nothing and so finds no cycle.
    assert "keyjobs.exceptions" in GRAPH["keyjobs"]
    assert GRAPH["keyjobs.management.commands.prunejobs"] >= {"keyjobs.conf", "keyjobs.models"}


def test_no_import_cycle_among_keyjobs_modules():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_only_the_postgresql_modules_import_psycopg():
    offenders = {name for name in MODULES if name not in POSTGRES_MODULES
                 and any(module == "psycopg" or module.startswith("psycopg.") for module in imported_modules(name))}
    assert not offenders, f"psycopg imported at module level by {sorted(offenders)}"


def test_no_portable_module_loads_a_postgresql_module_when_imported():
    # Transitively: importing keyjobs on SQLite must not need psycopg installed.
    def reaches(name: str, seen: set[str]) -> set[str]:
        for successor in GRAPH[name] - seen:
            seen.add(successor)
            reaches(successor, seen)
        return seen

    offenders = {name: sorted(reaches(name, set()) & POSTGRES_MODULES) for name in MODULES
                 if name not in POSTGRES_MODULES and reaches(name, set()) & POSTGRES_MODULES}
    assert not offenders, f"these modules load a PostgreSQL module when imported: {offenders}"


def test_the_monitor_does_not_import_the_admin():
    # The admin mounts the monitor's views, which take any ModelAdmin of Invocation: not even a type hint back.
    monitor = [name for name in MODULES if name.startswith("keyjobs.monitor")]
    assert monitor and {name: "keyjobs.admin" for name in monitor if "keyjobs.admin" in imported_modules(name, every=True)} == {}


def test_the_call_time_graph_sees_imports_inside_functions_only():
    assert ("keyjobs.store", "keyjobs.store.postgres") in {(name, other) for name in MODULES
                                                         for other in call_time_imports(name)}
    assert "keyjobs.models" not in call_time_imports("keyjobs.current")  # a type hint only (TYPE_CHECKING)


def test_every_import_inside_a_function_is_allowed_and_says_why():
    hidden = {(name, other) for name in MODULES for other in call_time_imports(name)} - set(CALL_TIME) - set(SERVICES)
    assert not hidden, f"imports inside functions that the allow-list does not explain: {sorted(hidden)}"


def test_the_allow_list_names_only_imports_that_exist():
    found = {(name, other) for name in MODULES for other in call_time_imports(name)}
    assert not (set(CALL_TIME) | set(SERVICES)) - found


def test_no_cycle_among_keyjobs_modules_at_call_time():
    cycle = find_cycle(CALL_GRAPH)
    assert cycle is None, "import cycle, counting imports inside functions: " + " -> ".join(cycle or [])


def test_only_the_postgresql_modules_import_psycopg_even_at_call_time():
    offenders = {name for name in MODULES if name not in POSTGRES_MODULES
                 and any(module.split(".")[0] == "psycopg" for module in call_time_imports(name))}
    assert not offenders, f"psycopg imported inside a function by {sorted(offenders)}"
