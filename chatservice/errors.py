"""The one application error type, its JSON shape, and the DRF exception handler that emits it."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.http import Http404, HttpRequest, HttpResponseBase, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from rest_framework import exceptions as drf_exceptions
from rest_framework.response import Response


@dataclass
class ServiceError(Exception):
    """A refusal or failure a client should see: `{"error": {"code", "message", "details"}}`."""

    code: str
    message: str
    status: int = 400
    details: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return {"error": self.as_dict()}

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


def not_found(what: str = "resource") -> ServiceError:
    return ServiceError("not_found", f"The {what} was not found.", status=404)


def unauthenticated(message: str = "A valid API key is required.") -> ServiceError:
    return ServiceError("unauthenticated", message, status=401, headers={"WWW-Authenticate": "Bearer"})


_DRF_CODES: dict[type[Exception], str] = {
    drf_exceptions.ParseError: "invalid_json",
    drf_exceptions.UnsupportedMediaType: "unsupported_media_type",
    drf_exceptions.MethodNotAllowed: "method_not_allowed",
    drf_exceptions.NotAcceptable: "not_acceptable",
    drf_exceptions.PermissionDenied: "forbidden",
    drf_exceptions.NotFound: "not_found",
    drf_exceptions.Throttled: "rate_limited",
    drf_exceptions.ValidationError: "invalid_request",
}


def to_service_error(exc: Exception) -> ServiceError | None:
    """Translate a framework exception into a ServiceError; None for an unexpected one."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, Http404):
        return not_found()
    if isinstance(exc, drf_exceptions.NotAuthenticated | drf_exceptions.AuthenticationFailed):
        return unauthenticated(str(exc.detail) if exc.detail else "A valid API key is required.")
    if isinstance(exc, drf_exceptions.APIException):
        code = next((c for t, c in _DRF_CODES.items() if isinstance(exc, t)), "error")
        details: dict[str, Any] = {}
        if isinstance(exc, drf_exceptions.ValidationError):
            details = {"fields": exc.detail}
            message = "The request is invalid."
        else:
            message = str(exc.detail)
        return ServiceError(code, message, status=exc.status_code, details=details)
    return None


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF hook: every handled error leaves in the one JSON error shape."""
    error = to_service_error(exc)
    if error is None:
        return None
    response = Response(error.body(), status=error.status)
    for name, value in error.headers.items():
        response[name] = value
    return response


def json_get_only(view: Callable[..., HttpResponseBase]) -> Callable[..., HttpResponseBase]:
    """For plain Django views: GET/HEAD only, other methods get 405 in the JSON error shape
    (never Django's HTML 403 CSRF page or empty 405); no CSRF, since nothing is changed."""

    @functools.wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        if request.method not in ("GET", "HEAD"):
            error = ServiceError("method_not_allowed", f"Method {request.method} is not allowed.", status=405)
            response = JsonResponse(error.body(), status=405)
            response["Allow"] = "GET, HEAD"
            return response
        return view(request, *args, **kwargs)

    return csrf_exempt(wrapped)
