"""`GET /metrics`: Prometheus text format, optionally behind a bearer token."""

from __future__ import annotations

import hmac

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_GET
from django_prometheus.exports import ExportToDjangoView

from chatservice.errors import ServiceError, unauthenticated


@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    if not settings.ENABLE_METRICS:
        error = ServiceError("not_found", "Metrics are disabled.", status=404)
        return JsonResponse(error.body(), status=404)
    token = settings.METRICS_BEARER_TOKEN
    if token:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            error = unauthenticated("A valid metrics token is required.")
            response = JsonResponse(error.body(), status=401)
            response["WWW-Authenticate"] = "Bearer"
            return response
    return ExportToDjangoView(request)
