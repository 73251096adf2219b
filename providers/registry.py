"""Which client serves each provider, where it points, and whether that is the sandbox.

One client object per provider and event loop is kept and reused (connection pooling).
A provider whose API key is unset talks to the sandbox upstream at SANDBOX_URL.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from dataclasses import dataclass

from django.conf import settings

from providers.base import Provider

logger = logging.getLogger(__name__)

SANDBOX_KEY = "sandbox-key"
_SANDBOX_PATHS = {"openai": "/openai/v1", "deepseek": "/deepseek", "claude": "/anthropic", "gemini": "/gemini"}
_KEY_SETTINGS = {
    "openai": "OPENAI_API_KEY",
    "claude": "CLAUDE_API_KEY",
    "deepseek": "DEEPSEEK_API_KEY",
    "gemini": "GEMINI_API_KEY",
}
_DEFAULT_BASE_URLS = {
    "openai": "https://api.openai.com/v1",
    "deepseek": "https://api.deepseek.com",
    "claude": "https://api.anthropic.com",
    "gemini": "https://generativelanguage.googleapis.com",
}


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    name: str
    api_key: str
    base_url: str
    sandboxed: bool


def provider_config(name: str) -> ProviderConfig:
    """Where `name` is served from, per the settings (sandbox when its key is unset)."""
    api_key = str(getattr(settings, _KEY_SETTINGS[name]))
    explicit = str(getattr(settings, f"{_KEY_SETTINGS[name].removesuffix('_API_KEY')}_BASE_URL", ""))
    if api_key:
        return ProviderConfig(name, api_key, explicit or _DEFAULT_BASE_URLS[name], sandboxed=False)
    base = explicit or f"{settings.SANDBOX_URL}{_SANDBOX_PATHS[name]}"
    return ProviderConfig(name, SANDBOX_KEY, base, sandboxed=True)


def build_provider(config: ProviderConfig) -> Provider:
    timeout = float(settings.PROVIDER_TIMEOUT_SECONDS)
    if config.name in ("openai", "deepseek"):
        from providers.openai_client import OpenAIProvider

        return OpenAIProvider(name=config.name, api_key=config.api_key, base_url=config.base_url, timeout=timeout)
    if config.name == "claude":
        from providers.anthropic_client import AnthropicProvider

        return AnthropicProvider(name=config.name, api_key=config.api_key, base_url=config.base_url, timeout=timeout)
    if config.name == "gemini":
        from providers.gemini_client import GeminiProvider

        return GeminiProvider(name=config.name, api_key=config.api_key, base_url=config.base_url, timeout=timeout)
    raise KeyError(config.name)


class ProviderRegistry:
    """Clients per event loop (an SDK's connection pool belongs to the loop that opened it)."""

    def __init__(self) -> None:
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Provider]] = (
            weakref.WeakKeyDictionary()
        )
        self._overrides: dict[str, Provider] = {}

    def get(self, name: str) -> Provider:
        if name in self._overrides:
            return self._overrides[name]
        clients = self._clients.setdefault(asyncio.get_running_loop(), {})
        if name not in clients:
            clients[name] = build_provider(provider_config(name))
        return clients[name]

    def override(self, name: str, provider: Provider) -> None:
        """Serve `name` with `provider` (tests use a scripted provider this way)."""
        self._overrides[name] = provider

    def reset(self) -> None:
        """Forget every client and override, so changed settings take effect.

        The forgotten clients' connection pools are closed on their own event loop while it
        runs (this one, or a server's in another thread); a stopped loop's pools go with it."""
        dropped, self._clients = self._clients, weakref.WeakKeyDictionary()
        self._overrides.clear()
        for loop, clients in list(dropped.items()):
            _close_on(loop, list(clients.values()))


_CLOSE_TIMEOUT_SECONDS = 5.0


async def _aclose_all(clients: list[Provider]) -> None:
    for client in clients:
        aclose = getattr(client, "aclose", None)
        if aclose is not None:
            await aclose()


def _close_on(loop: asyncio.AbstractEventLoop, clients: list[Provider]) -> None:
    if loop.is_closed() or not clients:
        return
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        loop.create_task(_aclose_all(clients))
    elif loop.is_running():  # another thread's loop (a server's): wait, boundedly, for the close
        closing = asyncio.run_coroutine_threadsafe(_aclose_all(clients), loop)
        try:
            closing.result(timeout=_CLOSE_TIMEOUT_SECONDS)
        except Exception:
            logger.warning("closing the forgotten provider clients failed", exc_info=True)


registry = ProviderRegistry()
