"""The provider interface: a request, the normalized events a provider streams, and its errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

Role = Literal["system", "user", "assistant"]
UsageSource = Literal["provider", "estimated"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    """What a provider client needs for one upstream call.

    `model` is the upstream model id (the catalog's `upstream_id`). `messages` holds the
    system prompt (if any) first, then the conversation in order, ending with the user's turn.
    """

    model: str
    messages: tuple[ChatMessage, ...]
    max_tokens: int
    temperature: float | None = None
    stop: tuple[str, ...] = ()
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class Start:
    provider: str
    model: str


@dataclass(frozen=True, slots=True)
class Delta:
    text: str


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    source: UsageSource = "provider"


@dataclass(frozen=True, slots=True)
class Finish:
    reason: str  # "stop", "length", "content_filter", "tool_calls", ...


Event = Start | Delta | Usage | Finish


@runtime_checkable
class Provider(Protocol):
    """One LLM backend. `stream` yields Start, then Deltas, then Usage once, then Finish.

    A provider whose output holds tokens the text does not show (Gemini's thoughts, DeepSeek's
    reasoning) may also yield its running total along the way, marked estimated; the last Usage
    is the one that counts. A running total covers the output streamed before it (text after it
    is counted on top), and may leave input_tokens at 0 when the provider has not said it.

    Closing the generator early (aclose) must close the upstream HTTP response.
    Failures raise a `ProviderError` subclass, before or after some deltas.
    """

    name: str

    def stream(self, request: ProviderRequest) -> AsyncIterator[Event]: ...

    async def list_models(self) -> list[str]: ...


# --- errors -------------------------------------------------------------------------------


@dataclass
class ProviderError(Exception):
    """An upstream failure, mapped from whatever the SDK or transport raised."""

    provider: str
    message: str
    status: int | None = None  # the upstream HTTP status, when there was one
    retry_after: float | None = None
    code: str = field(default="provider_error", init=False)
    retryable: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        super().__init__(f"{self.provider}: {self.message}")


@dataclass
class RetryableError(ProviderError):
    """Worth another try (same provider after a pause, or the next one)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.retryable = True


@dataclass
class RateLimited(RetryableError):
    def __post_init__(self) -> None:
        super().__post_init__()
        self.code = "provider_rate_limited"


@dataclass
class ProviderUnavailable(RetryableError):
    """5xx, Anthropic's 529 overloaded, or an error event in the middle of a stream."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.code = "provider_unavailable"


@dataclass
class ProviderConnectionError(RetryableError):
    """Refused, reset or cut connections (raw transport errors included)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.code = "provider_connection_error"


@dataclass
class ProviderTimeout(RetryableError):
    def __post_init__(self) -> None:
        super().__post_init__()
        self.code = "upstream_timeout"


@dataclass
class FinalError(ProviderError):
    """Another try would fail the same way."""


@dataclass
class ProviderAuthError(FinalError):
    def __post_init__(self) -> None:
        super().__post_init__()
        self.code = "provider_auth_error"


@dataclass
class ProviderBadRequest(FinalError):
    def __post_init__(self) -> None:
        super().__post_init__()
        self.code = "provider_bad_request"


@dataclass
class ContextLengthExceeded(FinalError):
    def __post_init__(self) -> None:
        super().__post_init__()
        self.code = "context_length_exceeded"


@dataclass
class ContentPolicyError(FinalError):
    def __post_init__(self) -> None:
        super().__post_init__()
        self.code = "content_policy"


@dataclass
class ModelNotFound(FinalError):
    def __post_init__(self) -> None:
        super().__post_init__()
        self.code = "provider_model_not_found"


@dataclass
class DeadlineExceeded(FinalError):
    """The request's overall deadline passed across all attempts and fallbacks."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.code = "deadline_exceeded"


@dataclass
class AllProvidersFailed(FinalError):
    """Every candidate failed or was skipped (open circuit, maintenance, plan)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.code = "no_provider_available"


@dataclass
class ProviderSaturated(FinalError):
    """The priority lane's wait ran out: too many in-flight calls to this provider."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.code = "provider_saturated"
