"""How an upstream failure reads to the client: code, status and Retry-After (DESIGN.md §6)."""

from __future__ import annotations

import math

from django.conf import settings

from chatservice.errors import ServiceError
from providers.base import (
    AllProvidersFailed,
    ContentPolicyError,
    ContextLengthExceeded,
    DeadlineExceeded,
    ProviderAuthError,
    ProviderBadRequest,
    ProviderError,
    ProviderSaturated,
    ProviderTimeout,
)

_MESSAGES = {
    "upstream_timeout": "The provider did not answer in time.",
    "deadline_exceeded": "The request ran past its deadline.",
    "context_length_exceeded": "The conversation is longer than the model's context window.",
    "content_policy": "The provider refused the request under its content policy.",
    "provider_bad_request": "The provider rejected the request.",
    "no_provider_available": "No provider could serve the request right now.",
    "provider_saturated": "The provider is at capacity; try again shortly.",
}


def error_for_provider_failure(exc: ProviderError) -> ServiceError:
    """The client-facing error for a failure the router gave up on.

    Provider messages are not passed through verbatim (they can echo prompts or account
    details); the provider and its HTTP status go in `details`.
    """
    details: dict[str, object] = {"provider": exc.provider}
    if exc.status is not None:
        details["upstream_status"] = exc.status
    headers: dict[str, str] = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    if isinstance(exc, ProviderTimeout | DeadlineExceeded):
        status = 504
    elif isinstance(exc, ContextLengthExceeded | ContentPolicyError | ProviderBadRequest):
        status = 400
    elif isinstance(exc, AllProvidersFailed | ProviderSaturated):
        status = 503
        headers.setdefault("Retry-After", str(math.ceil(settings.CIRCUIT_COOLDOWN_SECONDS)))
    elif isinstance(exc, ProviderAuthError):
        status = 502
    else:
        status = 502 if not settings.ENABLE_FALLBACK else 503
    message = _MESSAGES.get(exc.code, "The provider failed to answer.")
    return ServiceError(exc.code, message, status=status, details=details, headers=headers)
