"""`manage.py reapreservations`: return the tokens of expired (crashed) reservations to their daily quotas."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from usage.quotas import reservations_reap


class Command(BaseCommand):
    help = "Return the tokens of expired token reservations to their daily quotas and delete them."

    def handle(self, *args: Any, **options: Any) -> None:
        reaped = reservations_reap()
        self.stdout.write(f"Reaped {reaped} expired reservation(s).")
