"""The ASGI application: streaming chat endpoints and Django over HTTP, Channels for WebSocket."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatservice.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import re_path  # noqa: E402

from chatservice import heap  # noqa: E402
from chatservice.routing import http_routes, websocket_application  # noqa: E402

django_route = re_path(r"", django_asgi_app)  # type: ignore[arg-type]
application = ProtocolTypeRouter(
    {
        "http": URLRouter([*http_routes(), django_route]),
        "websocket": websocket_application(),
    }
)

heap.settle()  # last: everything loaded so far is the startup heap
