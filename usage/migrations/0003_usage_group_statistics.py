"""Extended statistics for the ledger's GROUP BY (provider, model, UTC day) — Postgres 14+ only.

Without them the planner multiplies the columns' distinct counts, expects about one group per
row, and sorts a heavy user's month of records (~30k rows) instead of hashing them: the /usage
query took about twice as long. With them it expects a few thousand groups and hashes.
"""

from django.db import migrations

STATISTICS = [
    ("usage_record_provider_model", "(ndistinct) ON provider, model"),
    ("usage_record_utc_day", "ON ((created_at AT TIME ZONE 'UTC')::date)"),
]


def _supported(schema_editor) -> bool:
    connection = schema_editor.connection
    return connection.vendor == "postgresql" and connection.pg_version >= 140000


def create(apps, schema_editor):
    if not _supported(schema_editor):
        return
    for name, definition in STATISTICS:
        schema_editor.execute(f"CREATE STATISTICS IF NOT EXISTS {name} {definition} FROM usage_usagerecord")
    schema_editor.execute("ANALYZE usage_usagerecord")


def drop(apps, schema_editor):
    if not _supported(schema_editor):
        return
    for name, _ in STATISTICS:
        schema_editor.execute(f"DROP STATISTICS IF EXISTS {name}")


class Migration(migrations.Migration):
    dependencies = [("usage", "0002_usage_user_time_covering")]
    operations = [migrations.RunPython(create, drop)]
