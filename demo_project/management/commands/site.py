import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import connections
from django.utils import timezone

from demo_project import scenarios, tasks
from demo_project.management import hold_seconds, port_number, positive_int
from demo_project.provider import DEFAULT_HOLD, DEFAULT_PORT
from keyjobs.conf import conf
from keyjobs.models import Schedule
from keyjobs.schedules import plan

HOST = "127.0.0.1"


class Command(BaseCommand):
    help = (
        "Run the demo site: the provider, a worker and runserver together on this database, with a demo user "
        "whose password is printed. Ctrl-C stops all three."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--port", type=port_number, default=8000, help="The site's port (default %(default)s).")
        parser.add_argument("--provider-port", type=port_number, default=DEFAULT_PORT,
                            help="The provider's port, 0 for any free one (default %(default)s).")
        parser.add_argument("--hold", type=hold_seconds, default=DEFAULT_HOLD,
                            help="Seconds the provider holds each call (default %(default)s).")
        parser.add_argument("--threads", type=positive_int, default=8, help="The worker's threads (default %(default)s).")
        parser.add_argument("--user", default="demo", help="The demo user, a superuser (default %(default)s).")
        parser.add_argument("--password", default=None, help="Its password (default: a new random one each start).")

    def handle(self, *args: Any, port: int, provider_port: int, hold: float, threads: int, user: str,
               password: str | None, **options: Any) -> None:
        call_command("migrate", verbosity=0)
        password = password or secrets.token_urlsafe(9)
        demo_user(user, password)
        demo_schedule()
        if in_use(port):
            raise CommandError(f"port {port} on {HOST} is already in use; stop what uses it, or pass --port")
        # A kill stops what was started, as a Ctrl-C does; and a Ctrl-C does even when the
        # command was started in the background, with SIGINT ignored.
        previous = {number: signal.signal(number, signal.default_int_handler)
                    for number in (signal.SIGINT, signal.SIGTERM)}
        try:
            with scenarios.Stack(port=provider_port, hold=hold, threads=threads, workers=1) as stack:
                server = subprocess.Popen(
                    # No autoreloader: it would fork a child that outlives a stop of this one.
                    [sys.executable, "manage.py", "runserver", "--noreload", f"{HOST}:{port}"],
                    cwd=scenarios.ROOT, env={**os.environ, "PROVIDER_URL": stack.url, "PYTHONUNBUFFERED": "1"},
                    text=True, start_new_session=True,
                )
                try:
                    self.serve(server, stack, port=port, user=user, password=password, hold=hold, threads=threads)
                finally:
                    # The site first, so that no request enqueues while the worker stops.
                    stop(server)
        except KeyboardInterrupt:
            self.stdout.write("stopped: the site, the worker and the provider")
        except scenarios.DemoError as exc:
            raise CommandError(str(exc)) from None
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def serve(self, server: subprocess.Popen[str], stack: scenarios.Stack, *, port: int, user: str, password: str,
              hold: float, threads: int) -> None:
        """Say where the site is and who may log in once it listens; return when it exits, by raising."""
        database = connections[conf.DATABASE].settings_dict
        wait_until_listening(server, port)
        self.stdout.write(
            f"\nThe demo site is running:\n"
            f"  URL       http://{HOST}:{port}/\n"
            f"  user      {user}\n"
            f"  password  {password}\n"
            f"  provider  {stack.url}, holding each call {hold:.2f}s; runworker with {threads} thread(s); "
            f"database {database['ENGINE'].rsplit('.', 1)[-1]} {database['NAME']}\n"
            f"Log in, press the buttons of an account twice, quickly, and watch its row. Ctrl-C stops it all.\n"
        )
        self.stdout.flush()
        status = server.wait()
        raise CommandError(f"runserver exited with status {status}; the provider and the worker are stopped")


#: The demo's schedule: the monitor's Schedules page, timeline ticks and run logs have something to show.
SCHEDULE = "demo: sync and report on acme every 2 minutes"


def demo_schedule() -> None:
    """Add the demo's schedule (an admin one, pausable there) unless it exists."""
    if Schedule.objects.filter(name=SCHEDULE).exists():
        return
    schedule = Schedule(name=SCHEDULE, task_name=tasks.sync_report.name, kwargs={"account_id": "acme"},
                        interval=timedelta(minutes=2))
    plan(schedule, timezone.now())
    schedule.save()


def demo_user(name: str, password: str) -> None:
    """Create the superuser ``name``, or give it ``password`` if it exists."""
    users = get_user_model()
    user = users.objects.filter(username=name).first()
    if user is None:
        users.objects.create_superuser(name, email="", password=password)
    else:
        user.set_password(password)
        user.is_active = user.is_staff = user.is_superuser = True
        user.save()


def in_use(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex((HOST, port)) == 0


def wait_until_listening(server: subprocess.Popen[str], port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not in_use(port):
        if server.poll() is not None:
            raise CommandError(f"runserver exited with status {server.returncode} before it listened on {port}")
        if time.monotonic() >= deadline:
            raise CommandError(f"runserver did not listen on {port} within {timeout:g}s")
        time.sleep(0.1)


def stop(server: subprocess.Popen[str], grace: float = 10.0) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
