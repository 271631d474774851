"""A task module whose import raises: what a recovery must survive (tests/test_recovery.py)."""

raise RuntimeError("this module cannot be imported")
