"""HTTP view of live model status: `GET /models/{model}/status`."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from accounts.authentication import authenticate_meta
from chatservice.errors import ServiceError
from providers.status import model_status


def _error_response(err: ServiceError) -> JsonResponse:
    response = JsonResponse(err.body(), status=err.status)
    for name, value in err.headers.items():
        response[name] = value
    return response


@csrf_exempt  # API-key auth, no cookie: an unsafe method gets this view's JSON 405, not the CSRF page
async def model_status_view(request: HttpRequest, model: str) -> JsonResponse:
    """The model's LLMStatus (online, degraded, offline, maintenance) from recent traffic and probes."""
    if request.method not in ("GET", "HEAD"):
        response = _error_response(
            ServiceError("method_not_allowed", f"Method {request.method} is not allowed.", status=405)
        )
        response["Allow"] = "GET, HEAD"
        return response
    try:
        await authenticate_meta(request.META)
        return JsonResponse(await model_status(model))
    except ServiceError as err:
        return _error_response(err)
