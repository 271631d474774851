import argparse
import socket

from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError

from keyjobs.conf import conf
from keyjobs.models import Runner


class Command(BaseCommand):
    help = ("Exit 0 when this host's runners are heartbeating, 1 when one is silent or none runs: "
            "a liveness probe for a container or a process manager.")
    # A probe runs every few seconds: it asks the database one question and nothing else.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--host", default=None, help="The host whose runners to judge (default: this one).")

    def handle(self, *args: object, host: str | None, **options: object) -> None:
        host = host or socket.gethostname()
        # Liveness is RunnerQuerySet's to define (a heartbeat within the lease, on the database's clock).
        runners = Runner.objects.using(conf.DATABASE).filter(host=host)
        try:
            alive = list(runners.alive().values_list("pk", "pid"))
            silent = list(runners.silent().values_list("pk", "pid"))
        except DatabaseError as exc:
            raise CommandError(f"cannot read the runners from the database: {exc}") from None
        if silent:
            listed = ", ".join(f"runner {pk} (pid {pid})" for pk, pid in silent)
            raise CommandError(f"{listed} on {host} sent no heartbeat for over {conf.LEASE:g}s")
        if not alive:
            raise CommandError(f"no runner is running on {host}")
        self.stdout.write(f"ok: {len(alive)} runner(s) heartbeating on {host}")
