"""Reads of the model catalog: resolve what a client asked for, list what a plan may use."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

from chatservice.errors import ServiceError
from chatservice.reread_cache import ReReadCache
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


class _Catalog(ReReadCache[tuple[CatalogEntry, ...]]):
    """The catalog, re-read from the database at most every couple of seconds.

    Admin edits (prices, maintenance) take effect on requests after that.
    """

    def __init__(
        self,
        *,
        ttl: float = _CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        loader: Callable[[], tuple[CatalogEntry, ...]] | None = None,
    ) -> None:
        super().__init__(loader or _load, ttl=ttl, clock=clock, what="model catalog")


def _load() -> tuple[CatalogEntry, ...]:
    return tuple(CatalogEntry.from_model(m) for m in LLMModel.objects.all())


catalog_cache = _Catalog()


def catalog_entries() -> tuple[CatalogEntry, ...]:
    return catalog_cache.get()


async def acatalog_entries() -> tuple[CatalogEntry, ...]:
    return await catalog_cache.aget()


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
