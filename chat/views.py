"""History: `GET /history`, `GET|DELETE /history/{conversation_id}` — the caller's own only."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db.models import Count, QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import generics
from rest_framework.exceptions import NotFound
from rest_framework.pagination import Cursor, CursorPagination
from rest_framework.request import Request

from accounts.principal import Principal
from chat.models import Conversation
from chat.schemas import parse_conversation_id
from chat.serializers import ConversationDetailSerializer, ConversationSerializer
from chat.services import conversation_delete
from chatservice.errors import not_found


def _caller(request: Request) -> int:
    principal: Principal = request.user  # type: ignore[assignment]
    return principal.user_id


class RecentFirst(CursorPagination):
    """Most recently active first; the id breaks ties so no conversation is skipped or repeated."""

    ordering = ("-updated_at", "-id")
    page_size = 20
    max_page_size = 100
    page_size_query_param = "page_size"

    def decode_cursor(self, request: Request) -> Cursor | None:
        """DRF's decoding, plus a check that the position is a time: the cursor comes from the
        client, and a position the ORM cannot read would otherwise fail the query (a 500)."""
        cursor: Cursor | None = super().decode_cursor(request)
        if cursor is not None and cursor.position is not None:
            try:
                Conversation._meta.get_field("updated_at").to_python(cursor.position)
            except ValidationError:
                raise NotFound(self.invalid_cursor_message) from None
        return cursor


class ConversationList(generics.ListAPIView):
    """The caller's conversations, most recently active first, cursor-paginated."""

    serializer_class = ConversationSerializer
    pagination_class = RecentFirst

    def get_queryset(self) -> QuerySet[Conversation]:
        return Conversation.objects.filter(user_id=_caller(self.request)).annotate(message_count=Count("messages"))


_CONVERSATION_ID = OpenApiParameter("conversation_id", OpenApiTypes.UUID, OpenApiParameter.PATH)


@extend_schema_view(
    get=extend_schema(parameters=[_CONVERSATION_ID]), delete=extend_schema(parameters=[_CONVERSATION_ID])
)
class ConversationDetail(generics.RetrieveDestroyAPIView):
    """One conversation with its messages (model, tokens and cost of each reply); DELETE removes it.

    The ledger keeps its UsageRecords: they reference the conversation by id only. Another
    user's conversation is a 404, exactly like a missing one.
    """

    serializer_class = ConversationDetailSerializer
    lookup_field = "id"
    lookup_url_kwarg = "conversation_id"

    def get_queryset(self) -> QuerySet[Conversation]:
        conversations = Conversation.objects.filter(user_id=_caller(self.request))
        if self.request.method != "GET":
            return conversations
        return conversations.annotate(message_count=Count("messages")).prefetch_related("messages")

    def get_object(self) -> Conversation:
        conversation_id = parse_conversation_id(self.kwargs[self.lookup_url_kwarg])
        conversation = self.get_queryset().filter(id=conversation_id).first()
        if conversation is None:
            raise not_found("conversation")
        return conversation

    def perform_destroy(self, instance: Conversation) -> None:
        conversation_delete(conversation=instance)
