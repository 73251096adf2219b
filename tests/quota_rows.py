"""Holding a user's quota rows from another transaction, so the statements that need them wait in Postgres."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from django.db import connection, transaction

TIMEOUT_SECONDS = 60


@contextmanager
def quota_rows_held(user_id: int) -> Iterator[None]:
    """Inside the block another connection holds `user_id`'s daily quota rows (SELECT ... FOR
    UPDATE, on a thread of its own); they are let go when the block ends."""
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute("SELECT 1 FROM usage_dailytokenusage WHERE user_id = %s FOR UPDATE", [user_id])
                locked.set()
                release.wait(TIMEOUT_SECONDS)
        finally:
            connection.close()

    holder = threading.Thread(target=hold, name=f"quota-rows-{user_id}")
    holder.start()
    try:
        if not locked.wait(TIMEOUT_SECONDS):
            raise TimeoutError("the quota rows were not locked")
        yield
    finally:
        release.set()
        holder.join(TIMEOUT_SECONDS)
