"""`GET /usage`: the caller's ledger statistics and live quota state (staff may ask for anyone)."""

from __future__ import annotations

from typing import Any

from asgiref.sync import async_to_sync
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.models import User
from accounts.principal import Principal
from accounts.selectors import principal_for_user
from chatservice.errors import not_found
from usage.limiter import limit_peek
from usage.quotas import quota_state
from usage.selectors import period_from_params, usage_summary


class UsageView(APIView):
    def get(self, request: Request) -> Response:
        caller: Principal = request.user  # type: ignore[assignment]
        target = caller
        wanted = request.query_params.get("user")
        if wanted is not None and wanted != caller.username:
            user = User.objects.filter(username=wanted).only("id").first() if caller.is_staff else None
            found = principal_for_user(user.pk) if user else None
            if found is None:
                raise not_found("user")
            target = found
        params = {k: str(v) for k, v in request.query_params.items() if k in ("from", "to", "period")}
        summary = usage_summary(user_id=target.user_id, period=period_from_params(params))
        limit = async_to_sync(limit_peek)(target)
        quota = quota_state(user_id=target.user_id, limit=target.tokens_per_day)
        body: dict[str, Any] = {
            **summary,
            "quota": {
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
            },
        }
        return Response(body)
