"""The model catalog: what each model costs, how much it holds, and whether it may be used."""

from __future__ import annotations

from decimal import Decimal

from django.core.validators import MinValueValidator
from django.db import models

# A price below zero would credit the caller for every token; a window of 0 holds nothing.
_NOT_NEGATIVE = [MinValueValidator(Decimal(0))]
_AT_LEAST_ONE = [MinValueValidator(1)]


class ProviderName(models.TextChoices):
    OPENAI = "openai", "OpenAI"
    CLAUDE = "claude", "Anthropic Claude"
    DEEPSEEK = "deepseek", "DeepSeek"
    GEMINI = "gemini", "Google Gemini"


class LLMModel(models.Model):
    """One model a provider serves. Prices are USD per million tokens, exact decimals."""

    name = models.CharField(max_length=100, unique=True, help_text="The id clients ask for.")
    provider = models.CharField(max_length=16, choices=ProviderName.choices)
    upstream_id = models.CharField(
        max_length=100, blank=True, help_text="The id sent to the provider (defaults to the name)."
    )
    context_window = models.PositiveIntegerField(validators=_AT_LEAST_ONE)
    max_output_tokens = models.PositiveIntegerField(validators=_AT_LEAST_ONE)
    input_price = models.DecimalField(max_digits=12, decimal_places=6, validators=_NOT_NEGATIVE)
    cached_input_price = models.DecimalField(max_digits=12, decimal_places=6, validators=_NOT_NEGATIVE)
    output_price = models.DecimalField(max_digits=12, decimal_places=6, validators=_NOT_NEGATIVE)
    supports_streaming = models.BooleanField(default=True)
    supports_vision = models.BooleanField(default=False)
    is_provider_default = models.BooleanField(
        default=False, help_text="Served when a client names the provider instead of a model."
    )
    enabled = models.BooleanField(default=True)
    maintenance = models.BooleanField(default=False, help_text="Skipped by selection and fallback.")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["provider", "name"]
        verbose_name = "LLM model"
        constraints = [
            models.UniqueConstraint(
                fields=["provider"],
                condition=models.Q(is_provider_default=True),
                name="one_default_model_per_provider",
            )
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def upstream_model(self) -> str:
        return self.upstream_id or self.name
