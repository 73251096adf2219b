"""`GET /metrics`: Prometheus text format, summed over every server process, optionally behind a bearer token."""

from __future__ import annotations

import hmac
import os

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from chatservice.errors import ServiceError, json_get_only, unauthenticated


def metrics_registry() -> CollectorRegistry:
    """This process's registry, or — with PROMETHEUS_MULTIPROC_DIR set (several server processes) —
    a fresh one that reads and sums every process's metric files, so any process answers for all."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return registry
    return REGISTRY


def _error(error: ServiceError) -> JsonResponse:
    response = JsonResponse(error.body(), status=error.status)
    for name, value in error.headers.items():
        response[name] = value
    return response


@json_get_only
def metrics(request: HttpRequest) -> HttpResponse:
    if not settings.ENABLE_METRICS:
        return _error(ServiceError("not_found", "Metrics are disabled.", status=404))
    token = settings.METRICS_BEARER_TOKEN
    if token:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return _error(unauthenticated("A valid metrics token is required."))
    return HttpResponse(generate_latest(metrics_registry()), content_type=CONTENT_TYPE_LATEST)
