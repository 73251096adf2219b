"""Authentication for every transport, over the one key lookup in `accounts.selectors`."""

from __future__ import annotations

from typing import Any

from rest_framework.authentication import BaseAuthentication
from rest_framework.request import Request

from accounts.principal import Principal
from accounts.selectors import api_key_aauthenticate, api_key_authenticate, principal_for_user, raw_key_from_headers
from chatservice.db import db_async
from chatservice.errors import unauthenticated


def _lower_headers(meta: dict[str, Any]) -> dict[str, str]:
    return {
        "authorization": str(meta.get("HTTP_AUTHORIZATION", "")),
        "x-api-key": str(meta.get("HTTP_X_API_KEY", "")),
    }


class ApiKeyAuthentication(BaseAuthentication):
    """DRF: `Authorization: Bearer KEY` or `X-API-Key: KEY`; a wrong key is 401, never anonymous."""

    def authenticate(self, request: Request) -> tuple[Principal, None] | None:
        raw_key = raw_key_from_headers(_lower_headers(request.META))
        if not raw_key:
            return None
        principal = api_key_authenticate(raw_key)
        if principal is None:
            raise unauthenticated("The API key is invalid or revoked.")
        return principal, None

    def authenticate_header(self, request: Request) -> str:
        return "Bearer"


async def authenticate_meta(meta: dict[str, Any]) -> Principal:
    """Async Django views: the caller from request headers, or ServiceError 401."""
    return await authenticate_headers(_lower_headers(meta))


async def authenticate_headers(headers: dict[str, str]) -> Principal:
    """The caller from lower-cased request headers (`authorization` / `x-api-key`), or ServiceError 401."""
    raw_key = raw_key_from_headers(headers)
    if not raw_key:
        raise unauthenticated()
    principal = await api_key_aauthenticate(raw_key)
    if principal is None:
        raise unauthenticated("The API key is invalid or revoked.")
    return principal


async def authenticate_scope(scope: dict[str, Any]) -> Principal | None:
    """Channels: the caller from the handshake headers, else from the Django session user."""
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
    raw_key = raw_key_from_headers(headers)
    if raw_key:
        return await api_key_aauthenticate(raw_key)
    user = scope.get("user")
    if user is not None and getattr(user, "is_authenticated", False):
        return await db_async(principal_for_user)(user.pk)
    return None
