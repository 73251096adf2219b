"""Prompt assembly: the history that fits the window, in whole turns, around the system prompt and the new turn."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import override_settings

from chat.models import Conversation, Message
from chat.prompt import build_prompt
from chat.selectors import conversation_history
from providers.base import ChatMessage
from providers.catalog import catalog_entries, resolve_model
from providers.tokens import count_messages

pytestmark = pytest.mark.django_db


def test_a_reply_whose_user_turn_does_not_fit_is_dropped_with_it() -> None:
    entry = resolve_model(catalog_entries(), "gpt-4")  # an 8192-token window
    history = (
        ChatMessage("user", "Summarize this. " + "hello " * 7000),
        ChatMessage("assistant", "Sure, here is a summary."),
    )
    prompt = build_prompt(
        system_prompt="Be brief.", history=history, user_message="And in French?", entry=entry, max_tokens=2000
    )
    assert [(m.role, m.content) for m in prompt.messages] == [("system", "Be brief."), ("user", "And in French?")]
    assert prompt.tokens == count_messages(prompt.messages, entry.upstream_model).tokens


def test_whole_turns_that_fit_are_kept_newest_first() -> None:
    entry = resolve_model(catalog_entries(), "gpt-4")
    history = (
        ChatMessage("user", "hello " * 7000),
        ChatMessage("assistant", "A long answer."),
        ChatMessage("user", "Thanks! 👍 Und jetzt?"),
        ChatMessage("assistant", "日本語で答えます。"),
    )
    prompt = build_prompt(system_prompt="", history=history, user_message="Next", entry=entry, max_tokens=2000)
    assert [m.role for m in prompt.messages] == ["user", "assistant", "user"]
    assert prompt.messages[:2] == history[2:]
    assert prompt.tokens == count_messages(prompt.messages, entry.upstream_model).tokens


@override_settings(MAX_MESSAGES=3)
def test_a_history_read_that_starts_on_a_reply_does_not_open_the_prompt_with_it(make_user: Any) -> None:
    user, _ = make_user("premium")
    conversation = Conversation.objects.create(user_id=user.id, system_prompt="Be kind.")
    for role, content in [("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")]:
        Message.objects.create(conversation=conversation, role=role, content=content)
    history = conversation_history(user_id=user.id, conversation_id=conversation.id)
    assert [m.content for m in history.messages] == ["A1", "Q2", "A2"]  # the last MAX_MESSAGES rows
    entry = resolve_model(catalog_entries(), "claude-haiku-4-5")
    prompt = build_prompt(
        system_prompt=history.system_prompt, history=history.messages, user_message="Q3", entry=entry, max_tokens=100
    )
    assert [(m.role, m.content) for m in prompt.messages] == [
        ("system", "Be kind."),
        ("user", "Q2"),
        ("assistant", "A2"),
        ("user", "Q3"),
    ]
    assert prompt.tokens == count_messages(prompt.messages, entry.upstream_model).tokens
