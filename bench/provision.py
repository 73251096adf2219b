"""Prepare the bench database: migrate, then an enterprise user with no practical limits and a fresh key.

Run as `python -m bench.provision` with DATABASE_URL (and the gateway's other settings) in the
environment; the raw API key is printed alone on the last line, as `createapikey` does.
"""

from __future__ import annotations

import io
import os

REQUESTS_PER_HOUR = 10_000_000
TOKENS_PER_DAY = 10**13
USERNAME = "bench"


def provision() -> str:
    """Migrate the database and return a new key for the bench user (created if needed)."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatservice.settings")
    import django

    django.setup()
    from django.core.management import call_command

    from accounts.models import User

    call_command("migrate", interactive=False, verbosity=0)
    out = io.StringIO()
    call_command("createapikey", USERNAME, plan="enterprise", name="bench", stdout=out, stderr=io.StringIO())
    key = out.getvalue().strip().splitlines()[-1]
    User.objects.filter(username=USERNAME).update(
        requests_per_hour_override=REQUESTS_PER_HOUR, tokens_per_day_override=TOKENS_PER_DAY
    )
    return key


if __name__ == "__main__":
    print(provision())
