"""The Claude provider: Anthropic's Messages API through the official `anthropic` SDK, streamed."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anthropic
from anthropic.types import (
    AssistantMessageParam,
    MessageParam,
    RawContentBlockDeltaEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
    RawMessageStreamEvent,
    TextDelta,
    UserMessageParam,
)

from providers.base import (
    ChatMessage,
    Delta,
    Event,
    Finish,
    ProviderConnectionError,
    ProviderError,
    ProviderRequest,
    ProviderTimeout,
    ProviderUnavailable,
    Start,
    Usage,
)
from providers.errors import aiohttp_cause, from_status, from_transport

# Anthropic's stop reasons in the service's finish vocabulary.
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "refusal": "content_filter",
    "tool_use": "tool_calls",
}
# The HTTP status Anthropic answers with each error type; an in-stream `error` event has
# only the type (its response status was 200), so it is mapped through this.
ERROR_TYPE_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 403,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}


def map_error(provider: str, exc: BaseException) -> ProviderError:
    """The provider error for anything the SDK or its transport raised."""
    if isinstance(exc, ProviderError):
        return exc
    if aiohttp_cause(exc) is not None:  # the transport's own error says timeout or broken connection
        return from_transport(provider, exc) or ProviderConnectionError(provider, "connection failed")
    if isinstance(exc, anthropic.APIStatusError):
        message = exc.api_message or exc.message
        if exc.status_code >= 400:
            return from_status(provider, exc.status_code, message, dict(exc.response.headers))
        status = ERROR_TYPE_STATUS.get(str(exc.type or ""), 500)  # an `error` event mid-stream
        return from_status(provider, status, f"in-stream {exc.type or 'error'}: {message}")
    if isinstance(exc, anthropic.APITimeoutError):
        return ProviderTimeout(provider, "request timed out")
    if isinstance(exc, anthropic.APIConnectionError):
        return ProviderConnectionError(provider, f"connection failed: {exc.message}")
    transport = from_transport(provider, exc)
    if transport is not None:
        return transport
    # A malformed stream (bad JSON, an unexpected shape) is the upstream's failure, not ours.
    return ProviderUnavailable(provider, f"unexpected upstream response ({type(exc).__name__}: {exc})")


def _split(messages: tuple[ChatMessage, ...]) -> tuple[str, list[MessageParam]]:
    """System messages joined into Anthropic's `system`; the rest as the conversation.

    A message of whitespace alone (or none) is left out: the Messages API refuses one ("all
    messages must have non-empty content", "text content blocks must contain non-whitespace
    text"), and it carries no text.
    """
    system = "\n\n".join(m.content for m in messages if m.role == "system" and m.content.strip())
    turns: list[MessageParam] = [
        AssistantMessageParam(role="assistant", content=m.content)
        if m.role == "assistant"
        else UserMessageParam(role="user", content=m.content)
        for m in messages
        if m.role != "system" and m.content.strip()
    ]
    return system, turns


class _Tally:
    """What the stream reported so far: the usage parts and the stop reason."""

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.input_tokens: int | None = None
        self.cache_read = 0
        self.cache_creation = 0
        self.output_tokens: int | None = None
        self.stop_reason: str | None = None
        self.stopped = False

    def usage(self) -> Usage | None:
        if self.input_tokens is None or self.output_tokens is None:
            return None  # never invent numbers the upstream did not send
        total_input = self.input_tokens + self.cache_read + self.cache_creation
        return Usage(total_input, self.output_tokens, cached_input_tokens=self.cache_read)

    def take(self, event: RawMessageStreamEvent) -> Event | None:
        """Record `event`; the normalized event it stands for, if any."""
        if isinstance(event, RawMessageStartEvent):
            usage = event.message.usage
            self.input_tokens = usage.input_tokens
            self.cache_read = usage.cache_read_input_tokens or 0
            self.cache_creation = usage.cache_creation_input_tokens or 0
            return Start(provider=self.provider, model=event.message.model)
        if isinstance(event, RawContentBlockDeltaEvent):
            if isinstance(event.delta, TextDelta) and event.delta.text:
                return Delta(event.delta.text)
            return None
        if isinstance(event, RawMessageDeltaEvent):
            delta_usage = event.usage
            self.output_tokens = delta_usage.output_tokens
            # Newer streams repeat the input counts here, final values included.
            if delta_usage.input_tokens is not None:
                self.input_tokens = delta_usage.input_tokens
            if delta_usage.cache_read_input_tokens is not None:
                self.cache_read = delta_usage.cache_read_input_tokens
            if delta_usage.cache_creation_input_tokens is not None:
                self.cache_creation = delta_usage.cache_creation_input_tokens
            self.stop_reason = event.delta.stop_reason or self.stop_reason
            return None
        if isinstance(event, RawMessageStopEvent):
            self.stopped = True
        return None


class AnthropicProvider:
    """Claude through `anthropic.AsyncAnthropic`: one client per instance, SDK retries off, on the
    SDK's aiohttp transport (`DefaultAioHttpClient`), as the OpenAI client is."""

    def __init__(self, *, name: str, api_key: str, base_url: str, timeout: float) -> None:
        self.name = name
        self._client = anthropic.AsyncAnthropic(
            api_key=api_key,
            base_url=base_url,
            max_retries=0,
            timeout=timeout,
            http_client=anthropic.DefaultAioHttpClient(),
        )

    async def stream(self, request: ProviderRequest) -> AsyncIterator[Event]:
        """Start, Deltas, Usage (when the upstream reported it), Finish; failures as ProviderError."""
        system, turns = _split(request.messages)
        try:
            upstream = await self._client.messages.create(
                model=request.model,
                messages=turns,
                max_tokens=request.max_tokens,
                system=system or anthropic.omit,
                stop_sequences=list(request.stop) or anthropic.omit,
                stream=True,
                # This SDK no longer types `temperature`; the Messages API still takes it.
                extra_body=None if request.temperature is None else {"temperature": request.temperature},
            )
        except Exception as exc:
            raise map_error(self.name, exc) from exc
        tally = _Tally(self.name)
        try:
            while True:
                try:
                    event = await upstream.__anext__()
                except StopAsyncIteration:
                    break
                except Exception as exc:
                    raise map_error(self.name, exc) from exc
                normalized = tally.take(event)
                if normalized is not None:
                    yield normalized
        finally:
            await upstream.close()  # early aclose, an error or the end: the HTTP response goes now
        if not tally.stopped:
            raise ProviderConnectionError(self.name, "stream ended before message_stop")
        usage = tally.usage()
        if usage is not None:
            yield usage
        reason = tally.stop_reason or "end_turn"
        yield Finish(FINISH_REASONS.get(reason, reason))

    async def list_models(self) -> list[str]:
        """The model ids the upstream lists (GET /v1/models, every page)."""
        try:
            return [model.id async for model in self._client.models.list()]
        except Exception as exc:
            raise map_error(self.name, exc) from exc

    async def aclose(self) -> None:
        """Close the SDK client's connection pool."""
        await self._client.close()
