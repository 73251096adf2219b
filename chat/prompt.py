"""Prompt assembly: system prompt, as much recent history as fits, then the user's message."""

from __future__ import annotations

from dataclasses import dataclass

from chatservice.errors import ServiceError
from providers.base import ChatMessage
from providers.catalog import CatalogEntry
from providers.tokens import count_messages, count_text

_MESSAGE_FRAMING = 4


@dataclass(frozen=True)
class Prompt:
    messages: tuple[ChatMessage, ...]
    tokens: int


def build_prompt(
    *, system_prompt: str, history: tuple[ChatMessage, ...], user_message: str, entry: CatalogEntry, max_tokens: int
) -> Prompt:
    """Fit the prompt into the model's context window, dropping the oldest history first.

    400 `context_length_exceeded`, naming the counts, when even the bare message does not fit.
    """
    model = entry.upstream_model
    head = (ChatMessage("system", system_prompt),) if system_prompt else ()
    tail = (ChatMessage("user", user_message),)
    base = count_messages(head + tail, model)
    budget = entry.context_window - max_tokens
    if base.tokens > budget:
        raise _too_long(base.tokens, max_tokens, entry)
    kept: list[tuple[ChatMessage, int]] = []
    used = base.tokens
    for message in reversed(history):
        cost = count_text(message.content, model).tokens + _MESSAGE_FRAMING
        if used + cost > budget:
            break
        kept.append((message, cost))
        used += cost
    kept.reverse()
    # A reply whose user turn did not fit (or was not read) is no context: the model would see an
    # answer to a question it was never asked. The kept history starts with a user turn.
    while kept and kept[0][0].role == "assistant":
        used -= kept.pop(0)[1]
    return Prompt(messages=head + tuple(m for m, _ in kept) + tail, tokens=used)


def exact_prompt(*, messages: tuple[ChatMessage, ...], entry: CatalogEntry, max_tokens: int) -> Prompt:
    """The messages exactly as given; 400 `context_length_exceeded` when they do not fit."""
    count = count_messages(messages, entry.upstream_model)
    if count.tokens + max_tokens > entry.context_window:
        raise _too_long(count.tokens, max_tokens, entry)
    return Prompt(messages=messages, tokens=count.tokens)


def _too_long(prompt_tokens: int, max_tokens: int, entry: CatalogEntry) -> ServiceError:
    return ServiceError(
        "context_length_exceeded",
        f"The prompt needs {prompt_tokens} tokens plus max_tokens {max_tokens}, "
        f"over {entry.name}'s context window of {entry.context_window}.",
        status=400,
        details={
            "prompt_tokens": prompt_tokens,
            "max_tokens": max_tokens,
            "context_window": entry.context_window,
            "model": entry.name,
        },
    )
