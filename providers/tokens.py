"""Offline token counting: exact for OpenAI models (tiktoken), a labeled estimate elsewhere.

tiktoken fetches its BPE files from the internet on first use. Here they come from the
pinned `bpe-openai` wheel, whose data folder ships cl100k_base and o200k_base gzip'd; they
are unpacked once into TIKTOKEN_CACHE_DIR under the names tiktoken looks for, and tiktoken
checks their SHA-256 against its own expected hashes before using them.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import hashlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import ParamSpec, TypeVar

import tiktoken
from django.conf import settings

from providers.base import ChatMessage

_ENCODING_URL = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
OFFLINE_ENCODINGS = ("cl100k_base", "o200k_base")
# OpenAI's chat format: each message costs 3 tokens of framing, the reply is primed with 3.
_TOKENS_PER_MESSAGE = 3
_REPLY_PRIMING = 3
_lock = threading.Lock()
# Counting is CPU work. Below this many characters it runs on the event loop (microseconds);
# from it on, in a worker thread (tiktoken releases the GIL while it encodes): a megabyte of
# text takes 0.3-0.8 s to count, and on the loop that stalled every request of the process.
OFF_LOOP_CHARS = 32_768

_P = ParamSpec("_P")
_T = TypeVar("_T")


def _install_encoding_files(cache_dir: Path) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    data = resources.files("bpe_openai") / "data"
    for name in OFFLINE_ENCODINGS:
        target = cache_dir / hashlib.sha1(_ENCODING_URL.format(name=name).encode()).hexdigest()
        if target.exists():
            continue
        raw = gzip.decompress((data / f"{name}.tiktoken.gz").read_bytes())
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(raw)
        tmp.replace(target)


@functools.cache
def get_encoding(name: str) -> tiktoken.Encoding:
    """An OpenAI encoding, loaded from local files only."""
    if name not in OFFLINE_ENCODINGS:
        raise ValueError(f"No offline copy of encoding {name!r}")
    with _lock:
        cache_dir = Path(settings.TIKTOKEN_CACHE_DIR)
        _install_encoding_files(cache_dir)
        # tiktoken reads its cache location from this variable and nowhere else.
        os.environ["TIKTOKEN_CACHE_DIR"] = str(cache_dir)
        return tiktoken.get_encoding(name)


def encoding_name_for(model: str) -> str | None:
    """The exact encoding of an OpenAI model, or None when the model has no public tokenizer."""
    try:
        name = tiktoken.encoding_name_for_model(model)
    except KeyError:
        return None
    return name if name in OFFLINE_ENCODINGS else None


@dataclass(frozen=True, slots=True)
class TokenCount:
    tokens: int
    exact: bool


def count_text(text: str, model: str) -> TokenCount:
    """Tokens in `text` for `model`: exact for OpenAI models, an o200k-based estimate otherwise."""
    name = encoding_name_for(model)
    encoding = get_encoding(name or "o200k_base")
    return TokenCount(len(encoding.encode(text, disallowed_special=())), exact=name is not None)


def count_messages(messages: tuple[ChatMessage, ...] | list[ChatMessage], model: str) -> TokenCount:
    """Prompt tokens for a chat request, with OpenAI's per-message framing."""
    name = encoding_name_for(model)
    encoding = get_encoding(name or "o200k_base")
    total = _REPLY_PRIMING
    for message in messages:
        total += _TOKENS_PER_MESSAGE + len(encoding.encode(message.content, disallowed_special=()))
        total += 1  # the role name
    return TokenCount(total, exact=name is not None)


async def off_loop(chars: int, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """`fn(*args, **kwargs)`, counting `chars` characters of text: on the event loop when that is
    short, in a worker thread when it is long (OFF_LOOP_CHARS), so the loop keeps serving."""
    if chars < OFF_LOOP_CHARS:
        return fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)
