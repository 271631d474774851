import argparse
from datetime import timedelta

from django.core.management.base import BaseCommand
from django.db.models.functions import Now

from keyjobs import rollup
from keyjobs.conf import conf
from keyjobs.management.arguments import duration, positive_int
from keyjobs.models import Invocation, Runner, Value
from keyjobs.store import store


class Command(BaseCommand):
    help = ("Delete finished invocations (and their history) older than a given age, long-stopped runners, the "
            "stored large values no invocation refers to any more, and the statistics' minutes past their keeping "
            "(KEYJOBS_ROLLUP_KEEP, KEYJOBS_KEY_ROLLUP_KEEP).")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--older-than", type=duration, default=timedelta(days=7),
                            help="Age of the finish time past which to delete: 30d, 12h, 45m, 90s, 1:30:00 "
                            "or P1DT2H (default 7d).")
        parser.add_argument("--batch", type=positive_int, default=5000,
                            help="Rows deleted per transaction (default 5000).")
        parser.add_argument("--dry-run", action="store_true", help="Only count what would be deleted.")

    def handle(self, *args: object, older_than: timedelta, batch: int, dry_run: bool, **options: object) -> None:
        using = conf.DATABASE
        old = Invocation.objects.using(using).finished().filter(finished_at__lt=Now() - older_than)
        if dry_run:
            self.stdout.write(f"{old.count()} finished invocation(s) would be deleted, and "
                              f"{Value.objects.using(using).unreferenced().count()} stored value(s) no "
                              "invocation refers to")
            return
        deleted = 0
        while True:
            # In batches, so that a big prune neither holds long locks nor builds one huge transaction.
            ids = list(old.order_by("pk").values_list("pk", flat=True)[:batch])
            if not ids:
                break
            Invocation.objects.using(using).filter(pk__in=ids).delete()
            deleted += len(ids)
        stale_runners = Runner.objects.using(using).filter(stopped_at__lt=Now() - older_than, invocations__isnull=True)
        runners, _ = stale_runners.delete()
        # Then the values those invocations (or any before) referred to: each batch skips a value a concurrent
        # delay() holds, and the foreign keys refuse the rest (``Store.prune_values``).
        values = 0
        while pruned := store(using).prune_values(batch):
            values += pruned
        # And the statistics' minutes past their keeping (KEYJOBS_ROLLUP_KEEP, KEYJOBS_KEY_ROLLUP_KEEP).
        minutes = 0
        while pruned := rollup.prune(using=using, batch=batch):
            minutes += pruned
        self.stdout.write(f"deleted {deleted} finished invocation(s), {runners} stopped runner(s) and {values} "
                          f"stored value(s) no invocation refers to; {minutes} rollup minute(s) past their keeping")
