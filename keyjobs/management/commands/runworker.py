import argparse
import logging
import sys

from django.core.management.base import BaseCommand, CommandError

from keyjobs.management.arguments import positive_int, queue_list
from keyjobs.worker import Worker


class Command(BaseCommand):
    help = "Run keyjobs invocations: a pool of threads that claim, run and record them until stopped."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--threads", type=positive_int, default=1, help="Runner threads (default 1).")
        parser.add_argument("--queues", type=queue_list, default=[], help="Comma-separated queues (default: all).")
        parser.add_argument("--prefetch", type=positive_int, default=1,
                            help="Invocations a thread claims at once (default 1; more is cheaper for short work).")
        parser.add_argument("--burst", action="store_true", help="Exit once nothing is left to run.")
        parser.add_argument("--database", default=None, help="Database alias (default KEYJOBS_DATABASE).")

    def handle(self, *args: object, threads: int, queues: list[str], burst: bool, database: str | None,
               prefetch: int, verbosity: int, **options: object) -> None:
        if not logging.getLogger("keyjobs").handlers:
            # The process's stderr, where a supervisor collects a worker's log; plain, not in the style of errors.
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            logging.getLogger("keyjobs").addHandler(handler)
        logging.getLogger("keyjobs").setLevel(logging.DEBUG if verbosity > 1 else
                                              logging.INFO if verbosity == 1 else logging.WARNING)
        from django.conf import settings

        if database is not None and database not in settings.DATABASES:
            raise CommandError(f"--database {database!r} is not in settings.DATABASES")
        if settings.DEBUG:
            logging.getLogger("keyjobs").warning(
                "keyjobs: DEBUG is on, so Django times and records every query a runner makes; "
                "run workers with DEBUG off outside development"
            )
        worker = Worker(threads=threads, queues=queues, burst=burst, using=database, prefetch=prefetch)
        worker.install_signal_handlers()
        worker.run()
        if worker.lost or worker.stop_reason:
            # EX_TEMPFAIL: a supervisor should start a fresh runner (lost its lease, or a thread could not go on).
            raise SystemExit(75)
