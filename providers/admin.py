"""Admin for the model catalog: prices, context windows, enabled and maintenance flags."""

from __future__ import annotations

from django.contrib import admin

from providers.models import LLMModel


@admin.register(LLMModel)
class LLMModelAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "provider",
        "upstream_id",
        "context_window",
        "max_output_tokens",
        "input_price",
        "cached_input_price",
        "output_price",
        "is_provider_default",
        "enabled",
        "maintenance",
    )
    list_editable = ("enabled", "maintenance")
    list_filter = ("provider", "enabled", "maintenance")
    search_fields = ("name", "upstream_id")
