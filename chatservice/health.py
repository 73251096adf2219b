"""`GET /health`: is the database reachable, and where is each provider served from."""

from __future__ import annotations

from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET

from providers.catalog import PROVIDERS
from providers.registry import provider_config


@require_GET
def health(request: HttpRequest) -> JsonResponse:
    database = "ok"
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception as exc:  # any driver error means "not reachable" here
        database = f"unreachable: {type(exc).__name__}"
    providers = {name: {"configured": True, "sandbox": provider_config(name).sandboxed} for name in PROVIDERS}
    healthy = database == "ok"
    return JsonResponse(
        {"status": "ok" if healthy else "degraded", "database": database, "providers": providers},
        status=200 if healthy else 503,
    )
