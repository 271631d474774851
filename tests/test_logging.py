"""keyjobs' logs: one logger per module, named after it, so that a project routes and filters them by name."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "keyjobs"
LEVELS = {"debug", "info", "warning", "error", "exception", "critical"}


def calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def test_every_module_logs_to_a_logger_named_after_it():
    named: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for call in calls(ast.parse(path.read_text())):
            if isinstance(call.func, ast.Attribute) and call.func.attr == "getLogger" and call.args:
                named.setdefault(str(path.relative_to(PACKAGE)), set()).add(ast.unparse(call.args[0]))
    # The command configures the package's logger, above every module's, besides naming its own.
    allowed = {"management/commands/runworker.py": {"'keyjobs'", "__name__"}}
    assert named and {path: names for path, names in named.items() if names != allowed.get(path, {"__name__"})} == {}


def test_no_message_repeats_the_logger_name():
    prefixed = []
    for path in PACKAGE.rglob("*.py"):
        for call in calls(ast.parse(path.read_text())):
            if (isinstance(call.func, ast.Attribute) and call.func.attr in LEVELS and call.args
                    and isinstance(call.args[0], ast.Constant) and str(call.args[0].value).startswith("keyjobs")):
                prefixed.append(f"{path.name}:{call.lineno}")
    assert prefixed == []

