"""`manage.py seedusage --rows N`: fill the ledger with synthetic UsageRecords, fast, to measure reads at scale."""

from __future__ import annotations

import random
import time as clock
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection, transaction

from accounts.models import Plan
from accounts.services import user_get_or_create
from providers.base import Usage
from providers.catalog import CatalogEntry, catalog_entries
from providers.pricing import Prices, cost_of
from usage.models import UsageRecord

_COLUMNS = (
    "request_id",
    "created_at",
    "user_id",
    "plan",
    "transport",
    "provider",
    "model",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "cost",
    "input_price",
    "cached_input_price",
    "output_price",
    "latency_ms",
    "time_to_first_token_ms",
    "status",
    "usage_source",
    "fallback_path",
    "attempts",
    "error_code",
    "flagged",
)
_TRANSPORTS = (("rest", 50), ("sse", 30), ("websocket", 12), ("batch", 5), ("openai", 3))
_STATUSES = (("ok", 955), ("partial", 15), ("failed", 20), ("cancelled", 10))
_PLANS = (("free", 60), ("premium", 33), ("enterprise", 7))


@dataclass(frozen=True)
class _User:
    id: int
    plan: str
    models: tuple[CatalogEntry, ...]
    model_weights: tuple[float, ...]


def _weighted(pairs: tuple[tuple[str, int], ...]) -> tuple[list[str], list[int]]:
    return [name for name, _ in pairs], [weight for _, weight in pairs]


class Command(BaseCommand):
    help = "Insert synthetic usage records spread over users, plans, providers, models and days (COPY on Postgres)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--rows", type=int, default=1_000_000, help="records to insert (default 1,000,000)")
        parser.add_argument("--users", type=int, default=500, help="users to spread them over (created if missing)")
        parser.add_argument("--days", type=int, default=90, help="days back from now they span")
        parser.add_argument("--prefix", default="seed-user-", help="username prefix of the seeded users")
        parser.add_argument("--seed", type=int, default=1, help="random seed (the same seed gives the same ledger)")
        parser.add_argument("--batch-size", type=int, default=10_000, help="rows per bulk_create (non-Postgres)")

    def handle(self, *args: Any, **options: Any) -> None:
        rows: int = options["rows"]
        if rows < 1 or options["users"] < 1 or options["days"] < 1:
            raise CommandError("--rows, --users and --days must be positive.")
        rng = random.Random(options["seed"])
        entries = [e for e in catalog_entries() if e.enabled]
        if not entries:
            raise CommandError("The model catalog is empty: run migrate first.")
        started = clock.monotonic()
        users = self._users(options["users"], options["prefix"], entries, rng)
        end = datetime.now(UTC)
        start = end - timedelta(days=options["days"])
        records = _records(rows=rows, users=users, start=start, end=end, rng=rng)
        if connection.vendor == "postgresql":
            _copy(records)
        else:
            _bulk_create(records, options["batch_size"])
        if connection.vendor == "postgresql":
            # What autovacuum would soon do: planner statistics, and the visibility map that lets
            # /usage read the covering index alone (an index-only scan).
            with connection.cursor() as cursor:
                cursor.execute(f"VACUUM (ANALYZE) {UsageRecord._meta.db_table}")
        elapsed = clock.monotonic() - started
        self.stdout.write(
            f"Inserted {rows:,} usage records for {len(users)} users over {options['days']} days "
            f"in {elapsed:.1f} s ({rows / elapsed:,.0f} rows/s)."
        )

    def _users(self, count: int, prefix: str, entries: list[CatalogEntry], rng: random.Random) -> list[_User]:
        plans = {p.name: p for p in Plan.objects.all()}
        names, weights = _weighted(_PLANS)
        users: list[_User] = []
        for n in range(count):
            plan_name = rng.choices(names, weights)[0]
            plan = plans.get(plan_name) or next(iter(plans.values()))
            user, _ = user_get_or_create(username=f"{prefix}{n + 1:04d}", plan_name=plan.name)
            allowed = tuple(e for e in entries if e.provider in set(plan.allowed_providers)) or tuple(entries)
            # Provider defaults are used most, as they are in practice.
            model_weights = tuple(8.0 if e.is_provider_default else 1.0 for e in allowed)
            users.append(_User(user.pk, plan.name, allowed, model_weights))
        return users


def _timeline(*, rows: int, start: datetime, end: datetime, rng: random.Random) -> Iterator[datetime]:
    """`rows` instants in [start, end), ascending: traffic grows over the span and dips on (UTC) weekends."""
    slots: list[tuple[datetime, datetime]] = []
    day = start.date()
    while datetime.combine(day, time.min, tzinfo=UTC) < end:
        midnight = datetime.combine(day, time.min, tzinfo=UTC)
        slots.append((max(start, midnight), min(end, midnight + timedelta(days=1))))
        day += timedelta(days=1)
    weights = []
    for n, (lo, hi) in enumerate(slots):
        weekend = 0.55 if lo.weekday() >= 5 else 1.0
        weights.append((1 + 0.8 * n / len(slots)) * weekend * rng.uniform(0.9, 1.1) * ((hi - lo) / timedelta(days=1)))
    total = sum(weights)
    counts = [int(rows * w / total) for w in weights]
    counts[-1] += rows - sum(counts)
    for (lo, hi), count in zip(slots, counts, strict=True):
        length = (hi - lo).total_seconds()
        for i in range(count):
            yield lo + timedelta(seconds=length * (i + rng.random()) / count)


def _records(*, rows: int, users: list[_User], start: datetime, end: datetime, rng: random.Random) -> Iterator[tuple]:
    """Rows in time order (as a ledger grows), users interleaved; a few heavy users, a long tail."""
    timeline = _timeline(rows=rows, start=start, end=end, rng=rng)
    user_weights = [1.0 / (rank + 1) ** 0.8 for rank in range(len(users))]
    transports, transport_weights = _weighted(_TRANSPORTS)
    statuses, status_weights = _weighted(_STATUSES)
    prices = {}
    for user in users:
        for entry in user.models:
            prices[entry.name] = Prices.of(entry)
    chunk = 4096
    for first in range(0, rows, chunk):
        size = min(chunk, rows - first)
        picked = rng.choices(users, user_weights, k=size)
        for user in picked:
            created_at = next(timeline)
            entry = rng.choices(user.models, user.model_weights)[0]
            status = rng.choices(statuses, status_weights)[0]
            input_tokens = int(rng.lognormvariate(6.0, 1.0)) + 5
            cached = input_tokens // 2 if rng.random() < 0.2 else 0
            output_tokens = 0 if status == "failed" else int(rng.lognormvariate(5.5, 0.9)) + 1
            if status == "failed":
                input_tokens = cached = 0
            price = prices[entry.name]
            cost = cost_of(Usage(input_tokens, output_tokens, cached), price)
            latency = int(rng.lognormvariate(7.0, 0.6))
            yield (
                uuid.UUID(int=rng.getrandbits(128), version=4),
                created_at,
                user.id,
                user.plan,
                rng.choices(transports, transport_weights)[0],
                entry.provider,
                entry.name,
                input_tokens,
                cached,
                output_tokens,
                cost,
                price.input,
                price.cached_input,
                price.output,
                latency,
                None if status == "failed" else max(1, latency // 5),
                status,
                "provider" if status == "ok" else "estimated",
                "[]",
                1,
                "provider_error" if status == "failed" else "",
                False,
            )


def _copy(records: Iterator[tuple]) -> None:
    """Postgres COPY: about an order of magnitude faster than INSERTs."""
    table = UsageRecord._meta.db_table
    with transaction.atomic(), connection.cursor() as cursor:
        raw = cursor.cursor  # the psycopg cursor under Django's wrapper
        with raw.copy(f"COPY {table} ({', '.join(_COLUMNS)}) FROM STDIN") as copy:
            for row in records:
                copy.write_row(row)


def _bulk_create(records: Iterator[tuple], batch_size: int) -> None:
    batch: list[UsageRecord] = []
    for row in records:
        values = dict(zip(_COLUMNS, row, strict=True))
        values["fallback_path"] = []
        batch.append(UsageRecord(**values))
        if len(batch) >= batch_size:
            UsageRecord.objects.bulk_create(batch)
            batch.clear()
    if batch:
        UsageRecord.objects.bulk_create(batch)
