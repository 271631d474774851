import argparse
import logging
import os
import sys

from django.core.management.base import BaseCommand, CommandError

from keyjobs import registry
from keyjobs.management.arguments import positive_int, queue_list, whole_number
from keyjobs.supervisor import RECYCLED, Supervisor, serve, watch_parent
from keyjobs.worker import Worker

logger = logging.getLogger(__name__)

class Command(BaseCommand):
    help = "Run keyjobs invocations: a pool of threads that claim, run and record them until stopped."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--threads", type=positive_int, default=1, help="Runner threads per process (default 1).")
        parser.add_argument("--processes", type=positive_int, default=None,
                            help="Worker processes, started and kept running by a supervisor (default: this "
                                 "process runs the threads itself). Needed for kill_on_timeout.")
        parser.add_argument("--max-tasks-per-child", type=whole_number, default=None,
                            help="With --processes: replace a worker process after this many runs (0: never).")
        parser.add_argument("--queues", type=queue_list, default=[], help="Comma-separated queues (default: all).")
        parser.add_argument("--prefetch", type=positive_int, default=1,
                            help="Invocations a thread claims at once (default 1; more is cheaper for short work).")
        parser.add_argument("--burst", action="store_true",
                            help="Exit once nothing it could claim is left (rows another transaction locks do not count).")
        parser.add_argument("--database", default=None, help="Database alias (default KEYJOBS_DATABASE).")
        parser.add_argument("--reload", action="store_true", default=None, dest="reload",
                            help="Restart when code changes (default: on when DEBUG is true, without --burst).")
        parser.add_argument("--noreload", action="store_false", dest="reload", help="Do not restart on code changes.")
        # The runner id of the supervisor that started this process (keyjobs.supervisor); not for people.
        parser.add_argument("--supervisor", type=positive_int, default=None, help=argparse.SUPPRESS)

    def handle(self, *args: object, threads: int, processes: int | None, max_tasks_per_child: int | None,
               queues: list[str], burst: bool, database: str | None, prefetch: int, reload: bool | None,
               supervisor: int | None, verbosity: int, **options: object) -> None:
        if supervisor is not None:
            # A supervisor's worker process: a terminal's Ctrl-C reaches the supervisor alone, which passes it on.
            os.setpgrp()
        package = logging.getLogger("keyjobs")  # every keyjobs module's logger is below it
        if not package.handlers:
            # The process's stderr, where a supervisor collects a worker's log; plain, not in the style of errors.
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
            package.addHandler(handler)
        package.setLevel(logging.DEBUG if verbosity > 1 else logging.INFO if verbosity == 1 else logging.WARNING)
        from django.conf import settings

        if database is not None and database not in settings.DATABASES:
            raise CommandError(f"--database {database!r} is not in settings.DATABASES")
        if max_tasks_per_child and processes is None and supervisor is None:
            raise CommandError("--max-tasks-per-child needs --processes: a supervisor replaces the worker processes")
        if settings.DEBUG and supervisor is None:
            logger.warning(
                "DEBUG is on, so Django times and records every query a runner makes; "
                "run workers with DEBUG off outside development"
            )
        runner: Worker | Supervisor
        if processes is not None:
            runner = Supervisor(processes=processes, threads=threads, queues=queues, prefetch=prefetch, burst=burst,
                                using=database, max_tasks_per_child=max_tasks_per_child or None, verbosity=verbosity)
        else:
            runner = Worker(threads=threads, queues=queues, burst=burst, using=database, prefetch=prefetch,
                            max_runs=max_tasks_per_child or None, supervisor=supervisor)
            if supervisor is not None:
                watch_parent(runner, os.getppid())
            else:
                hard = sorted(name for name, spec in registry.all_tasks().items() if spec.kill_on_timeout)
                if hard:
                    logger.warning("%s declare kill_on_timeout, but only runworker --processes can kill a "
                                   "run at its limit; here a run past it is flagged OVERDUE and keeps its key until "
                                   "it returns", ", ".join(hard))
        serve(runner, reload=settings.DEBUG and not burst if reload is None else reload)
        if isinstance(runner, Worker) and (runner.lost or runner.stop_reason):
            # EX_TEMPFAIL: a supervisor should start a fresh runner (lost its lease, or a thread could not go on).
            raise SystemExit(75)
        if isinstance(runner, Worker) and runner.max_runs is not None and runner.runs >= runner.max_runs:
            raise SystemExit(RECYCLED)
