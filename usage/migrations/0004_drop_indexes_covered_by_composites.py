"""Drop the single-column indexes that a composite index already leads with.

`usage_usagerecord.user_id` is the first column of `usage_user_time_cover` and
`usage_dailytokenusage.user_id` the first of the unique `daily_usage_user_day`, so every
lookup by user (the /usage aggregates, the quota row, the PROTECT and CASCADE checks) uses the
composite index. The ledger's index on `user_id` was written on every request for nothing.
The state changes only the fields' `db_index`; the database drops the indexes alone (Django's own
AlterField would also drop and re-add the foreign keys, which re-checks every row under a
lock), concurrently on Postgres.
"""

from django.conf import settings
from django.db import migrations, models
from django.db.models import CASCADE, PROTECT

from chatservice.migration_operations import DropFieldIndex


class Migration(migrations.Migration):
    atomic = False  # DROP INDEX CONCURRENTLY cannot run inside a transaction

    dependencies = [
        ("usage", "0003_usage_group_statistics"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        DropFieldIndex(
            "dailytokenusage",
            "user",
            models.ForeignKey(db_index=False, on_delete=CASCADE, related_name="daily_usage", to=settings.AUTH_USER_MODEL),
        ),
        DropFieldIndex(
            "usagerecord",
            "user",
            models.ForeignKey(db_index=False, on_delete=PROTECT, related_name="usage_records", to=settings.AUTH_USER_MODEL),
        ),
    ]
