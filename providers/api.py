"""`GET /models`: the catalog as the caller's plan sees it."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.principal import Principal
from providers.catalog import CatalogEntry, catalog_entries
from providers.registry import provider_config


def model_row(entry: CatalogEntry, principal: Principal) -> dict[str, Any]:
    return {
        "id": entry.name,
        "provider": entry.provider,
        "context_window": entry.context_window,
        "max_output_tokens": entry.max_output_tokens,
        "pricing": {
            "input": str(entry.input_price),
            "cached_input": str(entry.cached_input_price),
            "output": str(entry.output_price),
        },
        "allowed": principal.allows_provider(entry.provider),
        "status": "maintenance" if entry.maintenance else "online",
        "sandbox": provider_config(entry.provider).sandboxed,
        "default_for_provider": entry.is_provider_default,
    }


_MODEL_FIELDS = inline_serializer(
    "CatalogModel",
    many=True,
    fields={
        "id": serializers.CharField(),
        "provider": serializers.CharField(),
        "context_window": serializers.IntegerField(),
        "max_output_tokens": serializers.IntegerField(),
        "pricing": inline_serializer(
            "Pricing",
            {
                "input": serializers.CharField(),
                "cached_input": serializers.CharField(),
                "output": serializers.CharField(),
            },
        ),
        "allowed": serializers.BooleanField(),
        "status": serializers.ChoiceField(choices=["online", "degraded", "offline", "maintenance"]),
        "sandbox": serializers.BooleanField(),
        "default_for_provider": serializers.BooleanField(),
    },
)


class ModelListView(APIView):
    """Every enabled model with prices (USD per million tokens, decimal strings) and plan access."""

    @extend_schema(responses=inline_serializer("ModelList", {"models": _MODEL_FIELDS}), operation_id="models_list")
    def get(self, request: Request) -> Response:
        principal: Principal = request.user  # type: ignore[assignment]
        rows = [model_row(e, principal) for e in catalog_entries() if e.enabled]
        return Response({"models": rows})
