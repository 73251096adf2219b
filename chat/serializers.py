"""Serializers for reading conversations and their messages."""

from __future__ import annotations

from rest_framework import serializers

from chat.models import Conversation, Message


class ConversationSerializer(serializers.ModelSerializer):
    message_count = serializers.IntegerField(read_only=True)

    class Meta:
        model = Conversation
        fields = ["id", "title", "created_at", "updated_at", "message_count"]


class MessageSerializer(serializers.ModelSerializer):
    cost = serializers.DecimalField(max_digits=24, decimal_places=12, coerce_to_string=True)

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
