from django.apps.registry import Apps
from django.db import migrations
from django.db.backends.base.schema import BaseDatabaseSchemaEditor

#: The accounts of the demo's scenarios, on one plan each.
SEED = {"acme": "team", "globex": "enterprise", "initech": "free"}


def seed(apps: Apps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    # The historical model sends no signal our receivers listen to: seeding asks for no refresh.
    Account = apps.get_model("accounts", "Account")
    Account.objects.using(schema_editor.connection.alias).bulk_create(
        [Account(name=name, plan=plan) for name, plan in SEED.items()]
    )


def unseed(apps: Apps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    Account = apps.get_model("accounts", "Account")
    Account.objects.using(schema_editor.connection.alias).filter(name__in=SEED).delete()


class Migration(migrations.Migration):
    dependencies = [("accounts", "0001_initial")]

    operations = [migrations.RunPython(seed, unseed)]
