# Waited-on work goes first: an invocation's waiters, its effective priority, and the queue's indexes on it.

import django.db.models.expressions
from django.db import migrations, models
from django.db.models import Count, OuterRef, Subquery
from django.db.models.functions import Coalesce


def count_waiters(apps, schema_editor):
    """Count the runs that wait already: from now on the store keeps the count where a wait starts or ends."""
    Invocation = apps.get_model("keyjobs", "Invocation")
    db = schema_editor.connection.alias
    waiting = (Invocation.objects.using(db).filter(waiting_on=OuterRef("pk")).order_by()
               .values("waiting_on").annotate(n=Count("pk")).values("n"))
    Invocation.objects.using(db).filter(waited_on_by__isnull=False).update(
        waiters=Coalesce(Subquery(waiting), 0))


class Migration(migrations.Migration):

    dependencies = [
        ('keyjobs', '0016_message_idempotency'),
    ]

    operations = [
        migrations.RemoveIndex(
            model_name='invocation',
            name='keyjobs_claim',
        ),
        migrations.RemoveIndex(
            model_name='invocation',
            name='keyjobs_claim_by_queue',
        ),
        migrations.RemoveIndex(
            model_name='invocation',
            name='keyjobs_waiting_by_key',
        ),
        migrations.AddField(
            model_name='invocation',
            name='waiters',
            field=models.PositiveIntegerField(default=0, help_text='Paused runs and suspended workflows waiting on it: each raises its priority by one.'),
        ),
        migrations.AddField(
            model_name='invocation',
            name='effective_priority',
            field=models.GeneratedField(db_persist=True, expression=django.db.models.expressions.CombinedExpression(models.F('priority'), '+', models.F('waiters')), output_field=models.IntegerField(), verbose_name='effective priority'),
        ),
        migrations.RunPython(count_waiters, migrations.RunPython.noop, elidable=True),
        migrations.AddIndex(
            model_name='invocation',
            index=models.Index(models.F('status'), models.OrderBy(models.F('effective_priority'), descending=True), models.F('registered_at'), models.F('id'), name='keyjobs_claim'),
        ),
        migrations.AddIndex(
            model_name='invocation',
            index=models.Index(models.F('queue'), models.F('status'), models.OrderBy(models.F('effective_priority'), descending=True), models.F('registered_at'), models.F('id'), name='keyjobs_claim_by_queue'),
        ),
        migrations.AddIndex(
            model_name='invocation',
            index=models.Index(models.F('task_name'), models.F('running_key'), models.OrderBy(models.F('effective_priority'), descending=True), models.F('id'), condition=models.Q(('status__in', ['REGISTERED', 'REROUTED', 'RETRY']), ('running_key__isnull', False)), name='keyjobs_waiting_by_key'),
        ),
    ]
