"""`manage.py reapreservations`: return the tokens of expired (crashed) reservations to their daily quotas."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError

from usage.quotas import reservations_reap


class Command(BaseCommand):
    help = "Return the tokens of expired token reservations to their daily quotas and delete them."

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            reaped = reservations_reap()
        except DatabaseError as exc:  # run on a timer: one line and exit status 1, not a traceback each time
            raise CommandError(f"The database failed; reaping stopped (the next run goes on): {exc}") from None
        self.stdout.write(f"Reaped {reaped} expired reservation(s).")
