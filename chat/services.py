"""Writes for chat outside the ledger: deleting a conversation."""

from __future__ import annotations

from django.db import transaction

from chat.models import Conversation


def conversation_delete(*, conversation: Conversation) -> None:
    """Delete the conversation and its messages.

    Its row is locked first: a reply settling meanwhile (`usage.services`) either committed before,
    and its messages are deleted too, or waits and finds the conversation gone, and is recorded
    without its exchange. Unlocked, its messages could land between the deletes of the messages and
    of the conversation, and the DELETE failed on the foreign key (a 500).
    """
    with transaction.atomic():
        list(Conversation.objects.select_for_update().filter(pk=conversation.pk).values_list("pk", flat=True))
        conversation.delete()
