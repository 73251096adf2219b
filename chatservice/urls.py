"""URL routes served by Django. The chat endpoints themselves are ASGI apps (chatservice.routing)."""

from django.contrib import admin
from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from chat.views import ConversationDetail, ConversationList
from chatservice import health, metrics_view
from providers.api import ModelListView
from providers.views import model_status_view
from usage.views import UsageView

handler400 = "chatservice.health.json_bad_request"
handler404 = "chatservice.health.json_not_found"
handler500 = "chatservice.health.json_server_error"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("health", health.health, name="health"),
    path("metrics", metrics_view.metrics, name="metrics"),
    path("models", ModelListView.as_view(), name="models"),
    path("models/<path:model>/status", model_status_view, name="model-status"),
    path("usage", UsageView.as_view(), name="usage"),
    path("history", ConversationList.as_view(), name="history"),
    # <str:>, not <uuid:>: Django's uuid converter matches lower case only, and a UUID in upper
    # case names the same conversation; the view parses it (400 when it is no UUID).
    path("history/<str:conversation_id>", ConversationDetail.as_view(), name="conversation"),
    path("schema/", SpectacularAPIView.as_view(permission_classes=[], authentication_classes=[]), name="schema"),
    path(
        "docs/",
        SpectacularSwaggerView.as_view(url_name="schema", permission_classes=[], authentication_classes=[]),
        name="docs",
    ),
]
