
import pytest
from django.core.management import CommandError, call_command

from tests.commands import assert_usage_error


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--threads", "0"], "argument --threads: must be at least 1, not 0"),
        (["--threads", "eight"], "argument --threads: 'eight' is not a whole number"),
        (["--queues", "a,,b"], "argument --queues: 'a,,b' has an empty queue name"),
        (["--processes", "0"], "argument --processes: must be at least 1, not 0"),
        (["--processes", "2", "--threads", "0"], "argument --threads: must be at least 1, not 0"),
        (["--processes", "2", "--max-tasks-per-child", "-1"], "argument --max-tasks-per-child: must be 0 or more, not -1"),
    ],
)
def test_bad_arguments_get_a_one_line_error_and_a_non_zero_exit(arguments, message):
    assert_usage_error("runworker", arguments, message)


def test_an_unknown_database_is_refused():
    with pytest.raises(CommandError, match=r"--database 'nope' is not in settings\.DATABASES"):
        call_command("runworker", "--database", "nope", "--burst")


def test_max_tasks_per_child_needs_processes():
    with pytest.raises(CommandError, match=r"--max-tasks-per-child needs --processes"):
        call_command("runworker", "--max-tasks-per-child", "5", "--burst", "--noreload")
