"""The ledger (one UsageRecord per request) and the daily token quota with its reservations."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models


class UsageStatus(models.TextChoices):
    OK = "ok", "ok"
    PARTIAL = "partial", "partial"
    FAILED = "failed", "failed"
    CANCELLED = "cancelled", "cancelled"


class UsageSourceChoice(models.TextChoices):
    PROVIDER = "provider", "provider"
    ESTIMATED = "estimated", "estimated"


class UsageRecord(models.Model):
    """What one request used and cost. Written once, by `usage.services.usage_settle`."""

    request_id = models.UUIDField(unique=True)
    created_at = models.DateTimeField(db_index=True)
    # Indexed by `usage_user_time_cover` (user first): an index of its own would only cost writes.
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="usage_records", db_index=False
    )
    api_key = models.ForeignKey("accounts.ApiKey", null=True, blank=True, on_delete=models.SET_NULL)
    plan = models.CharField(max_length=32)
    conversation_id = models.UUIDField(null=True, blank=True)
    transport = models.CharField(max_length=16)
    provider = models.CharField(max_length=16, blank=True)
    model = models.CharField(max_length=100, blank=True)
    input_tokens = models.PositiveIntegerField(default=0)
    cached_input_tokens = models.PositiveIntegerField(default=0)
    output_tokens = models.PositiveIntegerField(default=0)
    cost = models.DecimalField(max_digits=24, decimal_places=12, default=0)
    input_price = models.DecimalField(max_digits=12, decimal_places=6, null=True, blank=True)
    cached_input_price = models.DecimalField(max_digits=12, decimal_places=6, null=True, blank=True)
    output_price = models.DecimalField(max_digits=12, decimal_places=6, null=True, blank=True)
    latency_ms = models.PositiveIntegerField(default=0)
    time_to_first_token_ms = models.PositiveIntegerField(null=True, blank=True)
    status = models.CharField(max_length=16, choices=UsageStatus.choices)
    usage_source = models.CharField(max_length=16, choices=UsageSourceChoice.choices)
    fallback_path = models.JSONField(default=list, blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    error_code = models.CharField(max_length=64, blank=True)
    flagged = models.BooleanField(default=False)

    class Meta:
        indexes = [
            # Covering: /usage aggregates a user's period with an index-only scan (no heap reads).
            models.Index(
                fields=["user", "created_at"],
                name="usage_user_time_cover",
                include=["provider", "model", "input_tokens", "output_tokens", "cost"],
            ),
            models.Index(fields=["provider", "created_at"], name="usage_provider_time"),
        ]

    def __str__(self) -> str:
        return f"{self.request_id} {self.model} {self.status}"


class DailyTokenUsage(models.Model):
    """Tokens a user used and has reserved on one UTC day; the row the quota UPDATE guards."""

    # Indexed by `daily_usage_user_day` (user first).
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="daily_usage", db_index=False
    )
    day = models.DateField()
    used = models.BigIntegerField(default=0)
    reserved = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "day"], name="daily_usage_user_day"),
            models.CheckConstraint(condition=models.Q(reserved__gte=0), name="daily_usage_reserved_gte_0"),
        ]

    def __str__(self) -> str:
        return f"{self.user_id} {self.day}: {self.used} used, {self.reserved} reserved"


class TokenReservation(models.Model):
    """Tokens held for one in-flight request; settled, released, or reaped after `expires_at`."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    day = models.DateField()
    tokens = models.BigIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return f"{self.tokens} tokens for {self.user_id} on {self.day}"
