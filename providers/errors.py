"""Mapping of upstream failures onto the provider error hierarchy, shared by every SDK client.

Each client turns its SDK's exceptions into (status, message, headers) and calls
`from_status`; raw transport errors (httpx2 / httpcore2 / sockets) go through
`from_transport`, since a connection cut mid-stream often surfaces as one of those.
"""

from __future__ import annotations

import asyncio
import email.utils
import re
import time
from collections.abc import Mapping

import aiohttp
import httpx2

from providers.base import (
    ContentPolicyError,
    ContextLengthExceeded,
    ModelNotFound,
    ProviderAuthError,
    ProviderBadRequest,
    ProviderConnectionError,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)

_CONTEXT_LENGTH = re.compile(
    r"context[_ ]length|context window|maximum context|too many tokens|prompt is too long|"
    r"input token count|exceeds the maximum number of tokens|exceed context limit",
    re.IGNORECASE,
)
# DeepSeek refuses content with a bare 400 "Content Exists Risk" (type and code invalid_request_error).
_CONTENT_POLICY = re.compile(
    r"content[_ ]policy|content[_ ]filter|safety|blocked|harmful|content exists risk", re.IGNORECASE
)
MAX_RETRY_AFTER_SECONDS = 3600.0


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (seconds or an HTTP date); None if absent."""
    if not headers:
        return None
    lowered = {k.lower(): v for k, v in headers.items()}
    raw_ms = lowered.get("retry-after-ms")
    if raw_ms:
        try:
            return min(max(float(raw_ms) / 1000, 0.0), MAX_RETRY_AFTER_SECONDS)
        except ValueError:
            pass
    raw = lowered.get("retry-after")
    if not raw:
        return None
    try:
        return min(max(float(raw), 0.0), MAX_RETRY_AFTER_SECONDS)
    except ValueError:
        try:
            parsed = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError):  # neither seconds nor an HTTP date: as if absent
            return None
        return min(max(parsed.timestamp() - time.time(), 0.0), MAX_RETRY_AFTER_SECONDS)


def from_status(provider: str, status: int, message: str, headers: Mapping[str, str] | None = None) -> ProviderError:
    """The provider error for an HTTP error answer."""
    retry_after = parse_retry_after(headers)
    if status == 429:
        return RateLimited(provider, message, status=status, retry_after=retry_after)
    if status in (401, 403):
        return ProviderAuthError(provider, message, status=status)
    if status == 404:
        return ModelNotFound(provider, message, status=status)
    if status in (400, 413, 422):
        if _CONTEXT_LENGTH.search(message):
            return ContextLengthExceeded(provider, message, status=status)
        if _CONTENT_POLICY.search(message):
            return ContentPolicyError(provider, message, status=status)
        return ProviderBadRequest(provider, message, status=status)
    if status == 408:
        return ProviderTimeout(provider, message, status=status, retry_after=retry_after)
    if status >= 500:  # 500, 502, 503, 504 and Anthropic's 529 "overloaded"
        return ProviderUnavailable(provider, message, status=status, retry_after=retry_after)
    return ProviderBadRequest(provider, message, status=status)


def aiohttp_cause(exc: BaseException) -> aiohttp.ClientError | None:
    """The aiohttp error under an SDK or httpx error, if that is what it wraps.

    With the SDKs' aiohttp transport, the SDK's error wraps httpx's, which wraps aiohttp's; the
    transport maps every aiohttp connection error, a refused or a dropped connection included,
    to httpx's ConnectTimeout, so only the innermost error tells a timeout from a broken connection.
    """
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, aiohttp.ClientError):
            return cause
        cause = cause.__cause__
    return None


def from_transport(provider: str, exc: BaseException) -> ProviderError | None:
    """The provider error for a raw transport failure, or None when `exc` is not one."""
    if isinstance(exc, ProviderError):
        return exc
    exc = aiohttp_cause(exc) or exc
    if isinstance(exc, httpx2.TimeoutException | asyncio.TimeoutError | TimeoutError):
        return ProviderTimeout(provider, f"timed out ({type(exc).__name__})")
    if isinstance(exc, httpx2.TransportError | ConnectionError | OSError | aiohttp.ClientError):
        return ProviderConnectionError(provider, f"connection failed ({type(exc).__name__})")
    try:
        import httpcore2
    except ImportError:  # pragma: no cover - httpcore2 ships with httpx2
        return None
    if isinstance(exc, httpcore2.TimeoutException):
        return ProviderTimeout(provider, f"timed out ({type(exc).__name__})")
    if isinstance(exc, httpcore2.NetworkError | httpcore2.ProtocolError):
        return ProviderConnectionError(provider, f"connection failed ({type(exc).__name__})")
    return None
