"""The shape of keyjobs' imports: dependencies run one way, and only the PostgreSQL modules load psycopg.

Read from the source with ``ast``, so that the rule holds for every module,
including ones no test imports. Only what runs when a module is imported
counts: imports inside functions, and under ``if TYPE_CHECKING:``, do not.
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


def imported_modules(name: str) -> set[str]:
    """Return the modules that importing module ``name`` imports by name, resolved to absolute names."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    imported = set()
    for statement in import_time_statements(ast.parse(path.read_text(), filename=str(path)).body):
        if isinstance(statement, ast.Import):
            imported.update(alias.name for alias in statement.names)
            continue
        base = package
        for _ in range(statement.level - 1):
            base = base.rpartition(".")[0]
        source = ".".join(filter(None, [base if statement.level else "", statement.module or ""]))
        for alias in statement.names:
            # `from . import claim` imports the module keyjobs.claim; `from .claim import x` imports keyjobs.claim.
            submodule = f"{source}.{alias.name}"
            imported.add(submodule if submodule in MODULES else source)
    return imported


GRAPH = {name: {other for other in imported_modules(name) if other in MODULES and other != name} for name in MODULES}


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
