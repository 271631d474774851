import pytest

from keyjobs.concurrency import MAX_KEY_LENGTH, Mode, key_label, make_key
from tests import jobs


def arguments(task, *args, **kwargs):
    bound = task.signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def test_disabled_has_no_key():
    assert make_key(Mode.DISABLED, {"a": 1}, ()) is None


def test_task_scope_is_one_key_for_every_call():
    assert make_key(Mode.TASK, {"a": 1}, ()) == make_key(Mode.TASK, {"a": 2}, ()) == "{}"


def test_arguments_scope_binds_positional_and_keyword_alike():
    positional = make_key(Mode.ARGUMENTS, arguments(jobs.add, 1), ())
    keyword = make_key(Mode.ARGUMENTS, arguments(jobs.add, a=1, b=0), ())
    assert positional == keyword == '{"a":1,"b":0}'


def test_arguments_scope_tells_different_arguments_apart():
    assert make_key(Mode.ARGUMENTS, {"a": 1}, ()) != make_key(Mode.ARGUMENTS, {"a": "1"}, ())


def test_keys_scope_looks_only_at_key_arguments():
    first = make_key(Mode.KEYS, {"account_id": "acme", "op": "a"}, ("account_id",))
    second = make_key(Mode.KEYS, {"account_id": "acme", "op": "b"}, ("account_id",))
    assert first == second == '{"account_id":"acme"}'


def test_a_long_key_is_stored_as_a_digest():
    key = make_key(Mode.ARGUMENTS, {"blob": "x" * 1000}, ())
    assert key.startswith("sha256:") and len(key) <= MAX_KEY_LENGTH


@pytest.mark.parametrize(
    ("key", "label"),
    [(None, ""), ("{}", "*"), ('{"account_id":"acme"}', "acme"), ('{"a":1,"b":"x"}', "1, x")],
)
def test_key_label_is_readable(key, label):
    assert key_label(key) == label
