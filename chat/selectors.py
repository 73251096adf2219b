"""Reads for chat: a user's conversation and its history, as the prompt builder needs them."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from django.conf import settings

from chat.models import Conversation, Message
from chatservice.errors import not_found
from providers.base import ChatMessage


@dataclass(frozen=True)
class History:
    system_prompt: str
    messages: tuple[ChatMessage, ...]  # oldest first


def conversation_history(*, user_id: int, conversation_id: uuid.UUID) -> History:
    """The caller's own conversation (404 for a missing or foreign one), last messages first-to-last."""
    conversation = Conversation.objects.filter(id=conversation_id, user_id=user_id).only("system_prompt").first()
    if conversation is None:
        raise not_found("conversation")
    rows = list(
        Message.objects.filter(conversation_id=conversation_id)
        .order_by("-id")
        .values_list("role", "content")[: settings.MAX_MESSAGES]
    )
    rows.reverse()
    return History(
        system_prompt=conversation.system_prompt,
        messages=tuple(ChatMessage(role, content) for role, content in rows),  # type: ignore[arg-type]
    )
