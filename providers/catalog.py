"""Reads of the model catalog: resolve what a client asked for, list what a plan may use."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

from chatservice.db import db_async
from chatservice.errors import ServiceError
from providers.models import LLMModel, ProviderName

PROVIDERS: tuple[str, ...] = tuple(ProviderName.values)
_CACHE_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    name: str
    provider: str
    upstream_model: str
    context_window: int
    max_output_tokens: int
    input_price: Decimal
    cached_input_price: Decimal
    output_price: Decimal
    supports_streaming: bool
    is_provider_default: bool
    enabled: bool
    maintenance: bool

    @classmethod
    def from_model(cls, m: LLMModel) -> CatalogEntry:
        return cls(
            name=m.name,
            provider=m.provider,
            upstream_model=m.upstream_model,
            context_window=m.context_window,
            max_output_tokens=m.max_output_tokens,
            input_price=m.input_price,
            cached_input_price=m.cached_input_price,
            output_price=m.output_price,
            supports_streaming=m.supports_streaming,
            is_provider_default=m.is_provider_default,
            enabled=m.enabled,
            maintenance=m.maintenance,
        )


class _Catalog:
    """The catalog, re-read from the database at most every couple of seconds.

    Admin edits (prices, maintenance) take effect on requests after that. One re-read at a
    time: while it runs, the entries in hand keep serving the requests that find them stale
    (they neither queue behind it nor re-read in parallel); only a first read is waited for.
    """

    def __init__(
        self,
        *,
        ttl: float = _CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        loader: Callable[[], tuple[CatalogEntry, ...]] | None = None,
    ) -> None:
        self.ttl = ttl
        self.clock = clock
        self.loader = loader or _load
        self._entries: tuple[CatalogEntry, ...] | None = None
        self._loaded_at = 0.0
        self._reload = threading.Lock()

    def entries(self) -> tuple[CatalogEntry, ...]:
        """The entries, re-read first when they are stale (sync: it may query the database)."""
        fresh = self.fresh()
        return fresh if fresh is not None else self.load()

    def fresh(self) -> tuple[CatalogEntry, ...] | None:
        """The entries if they are fresh, None if they are due for a re-read; never reads the database.

        One look at the clock: the async path must not decide "fresh" and then read the entries
        with `entries()`, which may find them stale a moment later and query from the event loop.
        """
        entries = self._entries
        return entries if entries is not None and self.clock() - self._loaded_at <= self.ttl else None

    def stale(self) -> tuple[CatalogEntry, ...] | None:
        """The entries in hand however old (None before the first read)."""
        return self._entries

    @property
    def reloading(self) -> bool:
        return self._reload.locked()

    def load(self) -> tuple[CatalogEntry, ...]:
        """Re-read the catalog. When another thread is already re-reading it, return the entries in
        hand at once (or, before the first read, wait for that one)."""
        in_hand = self._entries
        if not self._reload.acquire(blocking=in_hand is None):
            return in_hand  # type: ignore[return-value]  # acquire only fails when not blocking
        try:
            if in_hand is None and (fresh := self.fresh()) is not None:
                return fresh  # the read we waited for
            entries = self.loader()
            self._entries, self._loaded_at = entries, self.clock()
            return entries
        finally:
            self._reload.release()

    def invalidate(self) -> None:
        """Make the next request re-read the catalog (and wait for it)."""
        self._entries = None


def _load() -> tuple[CatalogEntry, ...]:
    return tuple(CatalogEntry.from_model(m) for m in LLMModel.objects.all())


catalog_cache = _Catalog()


def catalog_entries() -> tuple[CatalogEntry, ...]:
    return catalog_cache.entries()


async def acatalog_entries() -> tuple[CatalogEntry, ...]:
    entries = catalog_cache.fresh()
    if entries is not None:
        return entries
    in_hand = catalog_cache.stale()
    if in_hand is not None and catalog_cache.reloading:
        return in_hand
    return await db_async(catalog_cache.load)()


def provider_default(entries: tuple[CatalogEntry, ...], provider: str) -> CatalogEntry | None:
    return next((e for e in entries if e.provider == provider and e.is_provider_default and e.enabled), None)


def resolve_model(entries: tuple[CatalogEntry, ...], requested: str) -> CatalogEntry:
    """The enabled catalog entry for a model id or a provider name; 400 `unknown_model` otherwise."""
    wanted = requested.strip()
    if wanted in PROVIDERS:
        entry = provider_default(entries, wanted)
    else:
        entry = next((e for e in entries if e.name == wanted and e.enabled), None)
    if entry is None:
        known = sorted({e.name for e in entries if e.enabled} | set(PROVIDERS))
        raise ServiceError(
            "unknown_model",
            f"Unknown model {requested!r}.",
            status=400,
            details={"model": requested, "known_models": known},
        )
    return entry
