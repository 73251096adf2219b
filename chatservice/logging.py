"""Structured logging: one JSON object per line, with provider secrets redacted."""

from __future__ import annotations

import logging
import re
from datetime import date
from typing import Any

import orjson

_STANDARD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}
# Query-string keys (Gemini's ?key=...), bearer tokens and a URL's password (user:password@host).
_SECRET_PATTERNS = [
    re.compile(r"(?i)([a-z][a-z0-9+.\-]*://[^/\s:@]*:)[^/\s@]+(?=@)"),
    re.compile(r"(?i)([?&]key=)[^&\s\"']+"),
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._\-]{8,}"),
    re.compile(r"(?i)(x-(?:goog-)?api-key['\"]?\s*[:=]\s*['\"]?)[^\s'\",}]+"),
]


def configured_secrets() -> list[str]:
    from django.conf import settings

    names = ("OPENAI_API_KEY", "CLAUDE_API_KEY", "DEEPSEEK_API_KEY", "GEMINI_API_KEY", "METRICS_BEARER_TOKEN")
    return [v for v in (getattr(settings, n, "") for n in names) if v and len(v) >= 8]


def redact(text: str) -> str:
    """Remove configured provider keys and anything shaped like a credential from `text`."""
    for secret in configured_secrets():
        text = text.replace(secret, "[REDACTED]")
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(r"\1[REDACTED]", text)
    return text


# The SDKs and their HTTP clients log request options (the prompt itself), URLs and headers at
# DEBUG and INFO. Content reaches the logs only through LOG_RESPONSES, whatever LOG_LEVEL says.
_CLIENT_LIBRARIES = frozenset({"openai", "anthropic", "google_genai", "httpx", "httpx2", "httpcore", "httpcore2"})


class RedactSecretsFilter(logging.Filter):
    """Drops the client libraries' records below WARNING; redacts secrets in message and traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING and record.name.partition(".")[0] in _CLIENT_LIBRARIES:
            return False
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def _scrubbed(value: Any) -> Any:
    """`value` with `redact` applied to every string in it (extra fields can hold anything)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {str(k): _scrubbed(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrubbed(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, date):
        return value.isoformat()
    return redact(str(value))


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, extra fields, traceback; every
    string redacted here too, since a filter only sees the message and the exception."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["exc"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            payload["exc"] = record.exc_text
        return orjson.dumps(_scrubbed(payload)).decode()
