"""`GET /health`: is the database reachable, and where is each provider served from."""

from __future__ import annotations

from django.db import connection
from django.http import HttpRequest, JsonResponse

from chatservice.errors import ServiceError, json_get_only, not_found
from providers.catalog import PROVIDERS
from providers.registry import provider_config


@json_get_only
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


def json_bad_request(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    """Django's 400 (a Host outside ALLOWED_HOSTS, too many query or form fields) in the one JSON error shape."""
    error = ServiceError("invalid_request", "The request is malformed or not addressed to this service.", status=400)
    return JsonResponse(error.body(), status=400)


def json_not_found(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    """Django's 404 in the one JSON error shape (paths no route matches)."""
    return JsonResponse(not_found().body(), status=404)


def json_server_error(request: HttpRequest) -> JsonResponse:
    """Django's 500 in the one JSON error shape; the details stay in the logs."""
    error = ServiceError("internal_error", "The request failed unexpectedly.", status=500)
    return JsonResponse(error.body(), status=500)
