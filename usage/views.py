"""`GET /usage`: the caller's ledger statistics and live quota state (staff may ask for anyone).

An async view: the ledger aggregate and the quota row run on the database thread pool while the
hourly window is read from Redis, concurrently, without holding Django's one sync-view thread.
"""

from __future__ import annotations

import asyncio
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import View
from django.views.decorators.csrf import csrf_exempt

from accounts.authentication import authenticate_meta
from accounts.models import User
from accounts.principal import Principal
from accounts.selectors import principal_for_user
from chatservice.db import db_async
from chatservice.errors import ServiceError, not_found
from usage.limiter import LimitState, limit_peek
from usage.quotas import QuotaState, quota_state
from usage.selectors import period_from_params, usage_summary

PERIOD_PARAMS = ("from", "to", "period")


def _target_user(caller: Principal, wanted: str | None) -> Principal:
    """The caller, or (staff only) the user named by `?user=`; anyone else's data is a 404, not a 403."""
    if wanted is None or wanted == caller.username:
        return caller
    user_id = User.objects.filter(username=wanted).values_list("id", flat=True).first() if caller.is_staff else None
    found = principal_for_user(user_id) if user_id is not None else None
    if found is None:
        raise not_found("user")
    return found


def quota_body(limit: LimitState, quota: QuotaState) -> dict[str, Any]:
    """The `quota` object of `/usage`: the hourly request window and today's tokens."""
    return {
        "requests_per_hour": {
            "limit": limit.limit,
            "used": limit.used,
            "remaining": limit.remaining,
            "reset_seconds": limit.reset_seconds,
        },
        "tokens_per_day": {
            "limit": quota.limit,
            "used": quota.used,
            "reserved": quota.reserved,
            "remaining": quota.remaining,
            "reset_seconds": quota.reset_seconds,
        },
    }


class UsageView(View):
    http_method_names = ["get", "head", "options"]

    @classmethod
    def as_view(cls, **initkwargs: Any) -> Any:
        # Callers authenticate with an API key, never a cookie: no CSRF token applies (as in DRF views).
        return csrf_exempt(super().as_view(**initkwargs))

    async def get(self, request: HttpRequest) -> HttpResponse:
        try:
            caller = await authenticate_meta(request.META)
            params = {name: request.GET[name] for name in PERIOD_PARAMS if name in request.GET}
            period = period_from_params(params)
            target = await db_async(_target_user)(caller, request.GET.get("user"))
            summary, limit, quota = await asyncio.gather(
                db_async(usage_summary)(user_id=target.user_id, period=period),
                limit_peek(target),
                db_async(quota_state)(user_id=target.user_id, limit=target.tokens_per_day),
            )
        except ServiceError as error:
            return error_response(error)
        return JsonResponse({**summary, "quota": quota_body(limit, quota)})

    async def http_method_not_allowed(  # type: ignore[override]  # async view: Django awaits it
        self, request: HttpRequest, *args: Any, **kwargs: Any
    ) -> HttpResponse:
        response = error_response(ServiceError("method_not_allowed", "Use GET.", status=405))
        response["Allow"] = "GET, HEAD, OPTIONS"
        return response


def error_response(error: ServiceError) -> JsonResponse:
    """A ServiceError in the one JSON error shape, with its headers."""
    response = JsonResponse(error.body(), status=error.status)
    for name, value in error.headers.items():
        response[name] = value
    return response
