"""One request must not stall the process: long prompts are counted off the event loop.

A /v1 request may carry up to MAX_REQUEST_BYTES of messages. Counting a megabyte with tiktoken
took about 1 s of CPU, and on the event loop every other request of the process (`/health`
included) waited that long, for a request that is then refused (`context_length_exceeded`) and
so never counts toward the hourly limit. The check here is structural, not timed: while such a
prompt is being counted, the event loop goes on running other tasks.
"""

from __future__ import annotations

import asyncio
import random
import string
import sys
import threading
from pathlib import Path
from types import FrameType

import pytest

import providers.tokens
from chat.pipeline import Passthrough, prepare
from chat.schemas import ChatRequest
from chatservice.errors import ServiceError
from chatservice.request_ids import request_id_from
from providers.base import ChatMessage

pytestmark = pytest.mark.django_db(transaction=True)

_TOKENS_FILE = Path(providers.tokens.__file__).resolve()
_COUNTERS = {"count_text", "count_messages"}


def _counting_in_another_thread(loop_thread: int) -> bool:
    """Whether a thread other than the event loop's is inside providers.tokens' counters right now."""
    for ident, frame in sys._current_frames().items():
        if ident == loop_thread:
            continue
        current: FrameType | None = frame
        while current is not None:
            code = current.f_code
            if code.co_name in _COUNTERS and Path(code.co_filename).resolve() == _TOKENS_FILE:
                return True
            current = current.f_back
    return False


async def test_a_megabyte_of_v1_messages_is_counted_while_the_loop_keeps_running(make_user) -> None:
    from accounts.selectors import api_key_authenticate
    from chatservice.db import db_async

    _, key = await db_async(make_user)("enterprise")
    principal = await db_async(api_key_authenticate)(key)
    assert principal is not None
    rng = random.Random(0)
    # Lowercase letters without spaces: one long pre-token per message, the slowest text to count.
    # In assistant turns, which the content filter does not screen: this is about counting alone.
    long_turns = [ChatMessage("assistant", "".join(rng.choices(string.ascii_lowercase, k=100_000))) for _ in range(9)]
    messages = (*long_turns, ChatMessage("user", "hi"))
    loop_thread = threading.get_ident()
    seen = {"ticks": 0, "during_count": 0}
    done = asyncio.Event()

    async def other_requests() -> None:
        while not done.is_set():
            seen["ticks"] += 1
            if _counting_in_another_thread(loop_thread):
                seen["during_count"] += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(other_requests())
    try:
        with pytest.raises(ServiceError) as refused:
            await prepare(
                principal=principal,
                chat=ChatRequest(message="hi", model="gpt-4o"),
                transport="openai",
                request_id=request_id_from(None),
                passthrough=Passthrough(messages=messages),
            )
    finally:
        done.set()
        await ticker
    assert refused.value.code == "context_length_exceeded"
    assert refused.value.details["prompt_tokens"] > 128_000
    # The loop ran other tasks while the prompt was being counted (before: never, for ~1 s).
    assert seen["during_count"] > 0


def test_only_long_texts_leave_the_loop() -> None:
    """The hop to a thread is for long texts only: a typical prompt costs no thread hop."""

    async def threads() -> tuple[int, int, int]:
        short = await providers.tokens.off_loop(5, threading.get_ident)
        long = await providers.tokens.off_loop(providers.tokens.OFF_LOOP_CHARS, threading.get_ident)
        return threading.get_ident(), short, long

    loop, short, long = asyncio.run(threads())
    assert short == loop and long != loop
