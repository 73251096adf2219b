"""Users, the plans they are on, and their API keys (stored as a lookup prefix and a hash)."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.models import AbstractUser
from django.core.exceptions import ValidationError
from django.db import DatabaseError, models

from providers.models import ProviderName


def validate_provider_names(value: object) -> None:
    """A plan's allowed providers: a list of known provider names (anything else broke its users' requests)."""
    known = ", ".join(ProviderName.values)
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise ValidationError(f'Enter a list of provider names such as ["deepseek", "gemini"]; known: {known}.')
    unknown = [name for name in value if name not in ProviderName.values]
    if unknown:
        raise ValidationError(f"Unknown provider(s): {', '.join(unknown)}; known: {known}.")


class Plan(models.Model):
    """What a user may do: request rate, daily tokens, allowed providers, queue priority."""

    FREE = "free"
    PREMIUM = "premium"
    ENTERPRISE = "enterprise"

    name = models.SlugField(max_length=32, unique=True)
    # Null means "the deployment default": FREE|PREMIUM|ENTERPRISE_REQUESTS_PER_HOUR.
    requests_per_hour = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_day = models.PositiveBigIntegerField()
    allowed_providers = models.JSONField(
        default=list, validators=[validate_provider_names], help_text='e.g. ["deepseek", "gemini"]'
    )
    priority = models.PositiveSmallIntegerField(default=0, help_text="Higher is served first.")

    class Meta:
        ordering = ["priority", "name"]

    def __str__(self) -> str:
        return self.name

    @property
    def effective_requests_per_hour(self) -> int:
        if self.requests_per_hour is not None:
            return self.requests_per_hour
        default = getattr(settings, f"{self.name.upper()}_REQUESTS_PER_HOUR", None)
        return int(default) if default is not None else settings.FREE_REQUESTS_PER_HOUR


def default_plan_id() -> int | None:
    """New users start on the free plan (None before the plans table exists, as in checks)."""
    try:
        plan = Plan.objects.filter(name=Plan.FREE).only("id").first()
    except DatabaseError:
        return None
    return plan.pk if plan else None


class User(AbstractUser):
    """A person or service that calls the gateway; limits come from the plan unless overridden."""

    plan = models.ForeignKey(Plan, on_delete=models.PROTECT, related_name="users", default=default_plan_id)
    requests_per_hour_override = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_day_override = models.PositiveBigIntegerField(null=True, blank=True)

    @property
    def requests_per_hour(self) -> int:
        if self.requests_per_hour_override is not None:
            return self.requests_per_hour_override
        return self.plan.effective_requests_per_hour

    @property
    def tokens_per_day(self) -> int:
        if self.tokens_per_day_override is not None:
            return self.tokens_per_day_override
        return self.plan.tokens_per_day


class ApiKey(models.Model):
    """A bearer credential. The raw key is shown once; only its prefix and SHA-256 are kept."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=16, unique=True)
    key_hash = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.user})"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None
