"""`manage.py checkproviders`: probe each provider with a free `list_models()` call and record it."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from chatservice.logging import redact
from providers.catalog import PROVIDERS
from providers.registry import provider_config, registry
from providers.status import StatusStore, get_status_store

DEFAULT_PROBE_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class ProbeResult:
    provider: str
    ok: bool
    latency: float
    detail: str
    where: str


async def probe_provider(name: str, *, limit: float, store: StatusStore) -> ProbeResult:
    """List the provider's models (costs nothing) and record the outcome in the status store."""
    try:
        config = provider_config(name)
        where = redact(f"{config.base_url}{' (sandbox)' if config.sandboxed else ''}")
    except (KeyError, AttributeError) as exc:
        where = f"unconfigured ({exc})"
    started = time.monotonic()
    try:
        async with asyncio.timeout(limit):
            models = await registry.get(name).list_models()
    except Exception as exc:  # any failure means offline; the line printed says which
        ok, detail = False, redact(f"{type(exc).__name__}: {exc}")[:200]  # redacted whole, then cut
    else:
        ok, detail = True, f"{len(models)} model{'' if len(models) == 1 else 's'}"
    latency = time.monotonic() - started
    await store.record_check(name, ok=ok, latency=latency, detail=detail)
    return ProbeResult(name, ok, latency, detail, where)


async def probe_all(providers: list[str], *, limit: float) -> list[ProbeResult]:
    store = get_status_store()
    return list(await asyncio.gather(*(probe_provider(p, limit=limit, store=store) for p in providers)))


class Command(BaseCommand):
    help = "Probe each configured LLM provider (list models) and record online/offline in the live status."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("providers", nargs="*", help=f"any of {', '.join(PROVIDERS)} (default: all)")
        parser.add_argument("--timeout", type=float, default=DEFAULT_PROBE_TIMEOUT_SECONDS)

    def handle(self, *args: Any, **options: Any) -> None:
        providers = list(options["providers"]) or list(PROVIDERS)
        unknown = sorted(set(providers) - set(PROVIDERS))
        if unknown:
            raise CommandError(f"unknown provider(s): {', '.join(unknown)}; known: {', '.join(PROVIDERS)}")
        for result in asyncio.run(probe_all(providers, limit=float(options["timeout"]))):
            state = "online" if result.ok else "offline"
            style = self.style.SUCCESS if result.ok else self.style.ERROR
            line = f"{result.provider:<9} {style(f'{state:<8}')} {result.latency * 1000:7.0f} ms  {result.detail}"
            self.stdout.write(f"{line}  [{result.where}]")
