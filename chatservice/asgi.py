"""The ASGI application: Django for HTTP, Channels for WebSocket, the sandbox at /sandbox."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatservice.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.sessions import CookieMiddleware, SessionMiddleware  # noqa: E402
from channels.auth import AuthMiddleware  # noqa: E402
from django.urls import path, re_path  # noqa: E402

from chatservice.routing import http_routes, websocket_application  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": URLRouter([*http_routes(), re_path(r"", django_asgi_app)]),
        "websocket": websocket_application(),
    }
)
