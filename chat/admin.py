"""Admin for conversations and their messages (read-only transcripts)."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from chat.models import Conversation, Message


class MessageInline(admin.TabularInline):
    model = Message
    extra = 0
    can_delete = False
    fields = ("role", "content", "model", "input_tokens", "output_tokens", "cost", "incomplete", "created_at")
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj: Conversation | None = None) -> bool:
        return False


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ("id", "user", "title", "created_at", "updated_at")
    search_fields = ("id", "user__username", "title")
    readonly_fields = ("id", "user", "created_at", "updated_at")
    inlines = (MessageInline,)


import chat.filter_admin  # noqa: E402,F401
