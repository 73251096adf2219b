"""Serializers for reading conversations and their messages."""

from __future__ import annotations

from decimal import Decimal

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from chat.models import Conversation, Message
from usage.selectors import money


@extend_schema_field(OpenApiTypes.STR)
class MoneyField(serializers.Field):
    """USD as an exact decimal string ("0.000042"), as everywhere in the API."""

    def to_representation(self, value: Decimal) -> str:
        return money(Decimal(value))


class ConversationSerializer(serializers.ModelSerializer):
    message_count = serializers.IntegerField(read_only=True)

    class Meta:
        model = Conversation
        fields = ["id", "title", "created_at", "updated_at", "message_count"]


class MessageSerializer(serializers.ModelSerializer):
    cost = MoneyField(read_only=True)

    class Meta:
        model = Message
        fields = [
            "id",
            "role",
            "content",
            "created_at",
            "request_id",
            "provider",
            "model",
            "input_tokens",
            "output_tokens",
            "cost",
            "incomplete",
        ]


class ConversationDetailSerializer(ConversationSerializer):
    messages = MessageSerializer(many=True, read_only=True)

    class Meta(ConversationSerializer.Meta):
        fields = [*ConversationSerializer.Meta.fields, "system_prompt", "messages"]
