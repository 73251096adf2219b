"""URL routes of the HTTP API; streaming and WebSocket routes are in `chatservice.asgi`."""

from django.contrib import admin
from django.urls import path

from chatservice import health

urlpatterns = [
    path("admin/", admin.site.urls),
    path("health", health.health, name="health"),
]
