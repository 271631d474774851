"""Running ``manage.py`` commands as a person would, in a process of their own."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def assert_usage_error(command: str, arguments: list[str], message: str) -> None:
    """Run ``manage.py command arguments``; assert it exits 2 with argparse's usage and one line naming ``message``."""
    result = subprocess.run([sys.executable, "manage.py", command, *arguments], cwd=ROOT,
                            capture_output=True, text=True, env={"DJANGO_SETTINGS_MODULE": "tests.settings",
                                                                 "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2, result.stderr
    *usage, last_line = result.stderr.strip().splitlines()
    assert last_line.startswith(f"manage.py {command}: error: {message}"), result.stderr
    assert all(line.startswith(("usage:", " ")) for line in usage), result.stderr
