"""Reads of the model catalog: resolve what a client asked for, list what a plan may use."""

from __future__ import annotations

import time
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

    Admin edits (prices, maintenance) take effect on requests after that.
    """

    def __init__(self) -> None:
        self._loaded_at = -1e9
        self._entries: tuple[CatalogEntry, ...] = ()

    def entries(self) -> tuple[CatalogEntry, ...]:
        if time.monotonic() - self._loaded_at > _CACHE_SECONDS:
            self._entries = tuple(CatalogEntry.from_model(m) for m in LLMModel.objects.all())
            self._loaded_at = time.monotonic()
        return self._entries

    def fresh(self) -> tuple[CatalogEntry, ...] | None:
        """The entries if they are fresh, None if they are due for a re-read; never reads the database.

        One look at the clock: the async path must not decide "fresh" and then read the entries
        with `entries()`, which may find them stale a moment later and query from the event loop.
        """
        return self._entries if time.monotonic() - self._loaded_at <= _CACHE_SECONDS else None

    def invalidate(self) -> None:
        self._loaded_at = -1e9


catalog_cache = _Catalog()


def catalog_entries() -> tuple[CatalogEntry, ...]:
    return catalog_cache.entries()


async def acatalog_entries() -> tuple[CatalogEntry, ...]:
    entries = catalog_cache.fresh()
    if entries is not None:
        return entries
    return await db_async(catalog_cache.entries)()


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
