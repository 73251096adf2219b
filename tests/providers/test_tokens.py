"""Offline token counting: exact for both OpenAI encodings, labeled estimates elsewhere."""

from __future__ import annotations

import socket

import pytest

from providers.base import ChatMessage
from providers.tokens import count_messages, count_text, encoding_name_for, get_encoding


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any attempt to open a non-loopback connection while counting."""
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: object) -> None:
        host = address[0] if isinstance(address, tuple) else str(address)
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"network access attempted: {address}")
        real_connect(self, address)  # type: ignore[arg-type]

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.mark.parametrize(
    ("text", "encoding", "expected"),
    [
        # Reference token ids from OpenAI's published tokenizer for these strings.
        ("hello world", "cl100k_base", [15339, 1917]),
        ("hello world", "o200k_base", [24912, 2375]),
        ("tiktoken is great!", "cl100k_base", [83, 1609, 5963, 374, 2294, 0]),
    ],
)
def test_encodings_match_openai_reference_ids(no_network: None, text: str, encoding: str, expected: list[int]) -> None:
    assert get_encoding(encoding).encode(text) == expected


def test_model_to_encoding() -> None:
    assert encoding_name_for("gpt-4o") == "o200k_base"
    assert encoding_name_for("gpt-4.1-mini") == "o200k_base"
    assert encoding_name_for("gpt-4") == "cl100k_base"
    assert encoding_name_for("gpt-3.5-turbo") == "cl100k_base"
    assert encoding_name_for("claude-sonnet-4-20250514") is None


def test_counts_are_exact_for_openai_and_estimated_elsewhere(no_network: None) -> None:
    exact = count_text("The quick brown fox jumps over the lazy dog.", "gpt-4o")
    assert exact.exact and exact.tokens == 10
    estimate = count_text("The quick brown fox jumps over the lazy dog.", "gemini-2.5-flash")
    assert not estimate.exact and estimate.tokens == 10


def test_message_framing_follows_openai_chat_format(no_network: None) -> None:
    messages = [ChatMessage("system", "You are terse."), ChatMessage("user", "hello world")]
    body = len(get_encoding("cl100k_base").encode("You are terse.")) + 2
    assert count_messages(messages, "gpt-4").tokens == body + 2 * 4 + 3


def test_offline_files_carry_tiktokens_expected_hashes(no_network: None) -> None:
    import hashlib
    from pathlib import Path

    from django.conf import settings

    expected = {
        "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    }
    for name, sha256 in expected.items():
        get_encoding(name)
        url = f"https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
        cached = Path(settings.TIKTOKEN_CACHE_DIR) / hashlib.sha1(url.encode()).hexdigest()
        assert hashlib.sha256(cached.read_bytes()).hexdigest() == sha256
