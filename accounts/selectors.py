"""Reads for accounts: the one API-key lookup every transport authenticates with."""

from __future__ import annotations

import asyncio
import functools
import hmac
import time
import weakref
from collections import OrderedDict
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from accounts.models import ApiKey
from accounts.principal import Principal
from accounts.services import KEY_PREFIX, hash_key
from chatservice.db import db_async

_LAST_USED_GRANULARITY = timedelta(seconds=60)
_CACHE_MAX_ENTRIES = 10_000


class _KeyCache:
    """A small bounded TTL cache of verified keys, so a hot key costs no database round trip.

    Revocation and plan changes take effect after at most `API_KEY_CACHE_SECONDS`.
    """

    def __init__(self) -> None:
        self._entries: OrderedDict[str, tuple[float, Principal]] = OrderedDict()

    def get(self, key_hash: str) -> Principal | None:
        entry = self._entries.get(key_hash)
        if entry is None:
            return None
        expires, principal = entry
        if expires < time.monotonic():
            self._entries.pop(key_hash, None)
            return None
        return principal

    def put(self, key_hash: str, principal: Principal) -> None:
        ttl = float(settings.API_KEY_CACHE_SECONDS)
        if ttl <= 0:
            return
        self._entries[key_hash] = (time.monotonic() + ttl, principal)
        self._entries.move_to_end(key_hash)
        while len(self._entries) > _CACHE_MAX_ENTRIES:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


key_cache = _KeyCache()


def principal_for_user(user_id: int, api_key_id: int | None = None) -> Principal | None:
    """Build the Principal of an active user (used for session-authenticated callers too)."""
    from accounts.models import User

    user = User.objects.select_related("plan").filter(pk=user_id, is_active=True).first()
    if user is None:
        return None
    return Principal(
        user_id=user.pk,
        username=user.username,
        is_staff=user.is_staff,
        plan=user.plan.name,
        priority=user.plan.priority,
        allowed_providers=frozenset(user.plan.allowed_providers),
        requests_per_hour=user.requests_per_hour,
        tokens_per_day=user.tokens_per_day,
        api_key_id=api_key_id,
    )


def _parse_prefix(raw_key: str) -> str | None:
    parts = raw_key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1]


def _cached(raw_key: str) -> tuple[str | None, Principal | None]:
    """The key's hash (None for a key too malformed to look up) and its cached caller, if any."""
    if not raw_key or len(raw_key) > 200:
        return None, None
    key_hash = hash_key(raw_key)
    return key_hash, key_cache.get(key_hash)


def api_key_authenticate(raw_key: str) -> Principal | None:
    """Return the caller behind `raw_key`, or None for a malformed, unknown or revoked key."""
    key_hash, cached = _cached(raw_key)
    if key_hash is None or cached is not None:
        return cached
    prefix = _parse_prefix(raw_key)
    if prefix is None:
        return None
    api_key = (
        ApiKey.objects.filter(prefix=prefix).only("id", "user_id", "key_hash", "revoked_at", "last_used_at").first()
    )
    if api_key is None or api_key.revoked_at is not None:
        return None
    if not hmac.compare_digest(api_key.key_hash, key_hash):
        return None
    principal = principal_for_user(api_key.user_id, api_key.pk)
    if principal is None:
        return None
    now = timezone.now()
    if api_key.last_used_at is None or now - api_key.last_used_at > _LAST_USED_GRANULARITY:
        ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=now)
    key_cache.put(key_hash, principal)
    return principal


# The lookups on their way, per event loop and key hash: requests that miss the cache for the
# same key at once (a burst, or every request in flight when a hot key's entry expires) wait for
# one lookup rather than each taking a thread and a query.
_lookups: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Future[Principal | None]]] = (
    weakref.WeakKeyDictionary()
)


async def api_key_aauthenticate(raw_key: str) -> Principal | None:
    """Async face of `api_key_authenticate`: a cache hit costs no thread hop, and concurrent
    misses for one key share one lookup (which none of them cancels by leaving)."""
    key_hash, cached = _cached(raw_key)
    if key_hash is None or cached is not None:
        return cached
    lookups = _lookups.setdefault(asyncio.get_running_loop(), {})
    lookup = lookups.get(key_hash)
    if lookup is None:
        lookup = lookups[key_hash] = asyncio.ensure_future(db_async(api_key_authenticate)(raw_key))
        lookup.add_done_callback(functools.partial(_lookup_done, lookups, key_hash))
    return await asyncio.shield(lookup)


def _lookup_done(
    lookups: dict[str, asyncio.Future[Principal | None]], key_hash: str, lookup: asyncio.Future[Principal | None]
) -> None:
    if lookups.get(key_hash) is lookup:
        del lookups[key_hash]
    if not lookup.cancelled():
        lookup.exception()  # retrieved here too, for when every waiter has gone


def raw_key_from_headers(headers: dict[str, str]) -> str:
    """Extract the key from `Authorization: Bearer KEY` or `X-API-Key: KEY` (lower-case names)."""
    authorization = headers.get("authorization", "")
    if authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return headers.get("x-api-key", "").strip()
