"""A module whose task is registered before the module ends: the rest comes a moment later (test_declare)."""

import threading
import time

from keyjobs import task

registered = threading.Event()


@task()
def uses_a_helper_defined_below() -> str:
    return _helper()


registered.set()
time.sleep(0.5)  # another thread finds the task registered while this module is still running


def _helper() -> str:
    return "the whole module"
