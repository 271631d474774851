import subprocess
import sys

import pytest
from django.core.management import CommandError, call_command

from tests.conftest import ROOT


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--threads", "0"], "argument --threads: must be at least 1, not 0"),
        (["--threads", "eight"], "argument --threads: 'eight' is not a whole number"),
        (["--queues", "a,,b"], "argument --queues: 'a,,b' has an empty queue name"),
    ],
)
def test_bad_arguments_get_a_one_line_error_and_a_non_zero_exit(arguments, message):
    result = subprocess.run([sys.executable, "manage.py", "runworker", *arguments], cwd=ROOT,
                            capture_output=True, text=True, env={"DJANGO_SETTINGS_MODULE": "tests.settings",
                                                                 "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2, result.stderr
    *usage, last_line = result.stderr.strip().splitlines()
    assert last_line.startswith(f"manage.py runworker: error: {message}"), result.stderr
    assert all(line.startswith(("usage:", " ")) for line in usage), result.stderr


def test_an_unknown_database_is_refused():
    with pytest.raises(CommandError, match=r"--database 'nope' is not in settings\.DATABASES"):
        call_command("runworker", "--database", "nope", "--burst")
