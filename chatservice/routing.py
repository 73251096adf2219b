"""ASGI routes outside Django's URLconf: the streaming chat endpoints, the sandbox, WebSocket."""

from __future__ import annotations

from typing import Any

from channels.auth import AuthMiddlewareStack
from channels.routing import URLRouter
from django.urls import URLPattern, path, re_path

from chat.consumers import ChatConsumer
from chat.endpoints import BatchEndpoint, ChatEndpoint
from chat.openai_compat import ChatCompletions, ModelList, ModelRetrieve


def sandbox_mounted() -> bool:
    """The sandbox is served in-process when a provider without a key points at this service."""
    from providers.catalog import PROVIDERS
    from providers.registry import provider_config

    return any(provider_config(name).sandboxed for name in PROVIDERS)


def http_routes() -> list[URLPattern]:
    routes = [
        path("chat", ChatEndpoint(always_stream=False, transport="rest")),  # type: ignore[arg-type]
        path("chat/stream", ChatEndpoint(always_stream=True, transport="sse")),  # type: ignore[arg-type]
        path("chat/batch", BatchEndpoint()),  # type: ignore[arg-type]
        path("v1/chat/completions", ChatCompletions()),  # type: ignore[arg-type]
        path("v1/models", ModelList()),  # type: ignore[arg-type]
        path("v1/models/<path:model>", ModelRetrieve()),  # type: ignore[arg-type]
    ]
    if sandbox_mounted():
        from providers.sandbox.app import create_sandbox_app

        routes.append(re_path(r"^sandbox/", _strip_prefix(create_sandbox_app(), "/sandbox")))
    return routes


def _strip_prefix(app: Any, prefix: str) -> Any:
    async def mounted(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope = dict(scope)
        scope["path"] = scope["path"][len(prefix) :] or "/"
        scope["raw_path"] = scope["path"].encode()
        scope["root_path"] = ""
        await app(scope, receive, send)

    return mounted


def websocket_application() -> Any:
    # Session auth lets the web app's logged-in users connect without an API key.
    return AuthMiddlewareStack(URLRouter([path("ws/chat", ChatConsumer.as_asgi())]))
