# keyjobs_status_finished over the finished only, so that the claim always reads keyjobs_claim in order.

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('keyjobs', '0017_waited_on_first'),
    ]

    operations = [
        migrations.RemoveIndex(
            model_name='invocation',
            name='keyjobs_status_finished',
        ),
        migrations.AddIndex(
            model_name='invocation',
            index=models.Index(condition=models.Q(('finished_at__isnull', False)), fields=['status', 'finished_at'], name='keyjobs_status_finished'),
        ),
    ]
