"""Prepare the bench database: migrate, then enterprise users with no practical limits and fresh keys.

Run as `python -m bench.provision [--users N]` with DATABASE_URL (and the gateway's other
settings) in the environment; the raw API keys are printed on the last N lines, one per user
(`bench`, then `bench-2` ... `bench-N`), as `createapikey` prints one.
"""

from __future__ import annotations

import argparse
import io
import os

REQUESTS_PER_HOUR = 10_000_000
TOKENS_PER_DAY = 10**13
USERNAME = "bench"


def provision(users: int = 1) -> list[str]:
    """Migrate the database and return a new key for each of `users` bench users (created if needed)."""
    if users < 1:
        raise ValueError("users must be at least 1")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatservice.settings")
    import django

    django.setup()
    from django.core.management import call_command

    from accounts.models import User

    call_command("migrate", interactive=False, verbosity=0)
    keys = []
    for n in range(1, users + 1):
        username = USERNAME if n == 1 else f"{USERNAME}-{n}"
        out = io.StringIO()
        call_command("createapikey", username, plan="enterprise", name="bench", stdout=out, stderr=io.StringIO())
        keys.append(out.getvalue().strip().splitlines()[-1])
        User.objects.filter(username=username).update(
            requests_per_hour_override=REQUESTS_PER_HOUR, tokens_per_day_override=TOKENS_PER_DAY
        )
    return keys


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.provision", description=__doc__)
    parser.add_argument("--users", type=int, default=1, help="how many bench users (one key each)")
    print("\n".join(provision(parser.parse_args().users)))
