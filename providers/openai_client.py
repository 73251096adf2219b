"""The OpenAI SDK client behind the provider interface; it serves DeepSeek too (same wire, another base URL)."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import httpx2
import openai
import orjson

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

logger = logging.getLogger(__name__)

_DONE = b"[DONE]"
# An in-stream `{"error": ...}` frame has no HTTP status of its own: read one off its code or type.
_ERROR_CODE_STATUS = {
    "rate_limit_exceeded": 429,
    "context_length_exceeded": 400,
    "content_policy_violation": 400,
    "invalid_api_key": 401,
    "model_not_found": 404,
}
_ERROR_TYPE_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "request_forbidden": 403,
    "not_found_error": 404,
    "rate_limit_error": 429,
    "requests": 429,
    "tokens": 429,
    "insufficient_quota": 429,
    "overloaded_error": 529,
}


# The SDK's telemetry headers (its platform, runtime and retry bookkeeping, for OpenAI's SDK
# statistics), omitted from every request. The API needs none of them; each costs a header built,
# copied and written per call, and kept with the request for as long as it streams.
_NO_TELEMETRY: dict[str, str | openai.Omit] = dict.fromkeys(
    (
        "X-Stainless-Lang",
        "X-Stainless-Package-Version",
        "X-Stainless-OS",
        "X-Stainless-Arch",
        "X-Stainless-Runtime",
        "X-Stainless-Runtime-Version",
        "X-Stainless-Async",
        "X-Stainless-Retry-Count",
        "X-Stainless-Read-Timeout",
    ),
    openai.omit,
)


class _AioHttpClient(openai.DefaultAioHttpClient):
    """The SDK's aiohttp client (`DefaultAioHttpClient`), remembering the URLs it parsed.

    The SDK hands every request its URL as a string, which httpx would parse again each time
    (about a tenth of building a request); this client only ever calls a handful of URLs.
    """

    MAX_URLS = 32

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._urls: dict[str, httpx2.URL] = {}

    def build_request(self, method: str, url: httpx2.URL | str, **kwargs: Any) -> httpx2.Request:
        if isinstance(url, str):
            parsed = self._urls.get(url)
            if parsed is None:
                parsed = httpx2.URL(url)
                if len(self._urls) < self.MAX_URLS:
                    self._urls[url] = parsed
            url = parsed
        return super().build_request(method, url, **kwargs)


def _body_reader(response: httpx2.Response) -> aiohttp.StreamReader | None:
    """The aiohttp body under `response`, when it can be read as it came: the SDK's aiohttp
    transport answered and the body has no content encoding (httpx decodes one). Else None, and the
    body is read through httpx (`aiter_bytes`), as before.

    httpx's stream around aiohttp's is three async generators, a decoder and a chunker that each
    read passes through: 16,000 of the ~246,000 instructions of a relayed chunk (bench/README.md).
    The transport's response is the SDK's own, so its errors are aiohttp's, which `_map_error` maps.
    """
    if response.headers.get("content-encoding", "identity").lower() != "identity":
        return None
    transport_stream = getattr(response.stream, "_stream", None)  # under httpx's BoundAsyncStream
    content = getattr(getattr(transport_stream, "_aiohttp_response", None), "content", None)
    return content if isinstance(content, aiohttp.StreamReader) else None


class OpenAIProvider:
    """OpenAI's chat completions API through the official SDK (`name` is "openai" or "deepseek").

    The SDK does transport, auth and status-error raising; the SSE body is parsed here with
    orjson (no SDK model object per chunk). SDK retries are off: the router retries.

    The transport is the SDK's aiohttp one (`DefaultAioHttpClient`, the `openai[aiohttp]`
    extra): httpx's own connection pool and HTTP/1.1 parser cost about twice its CPU per call
    (bench/README.md).

    `timeout` bounds connecting, sending the request and waiting for the response's headers. A
    stream's silence after them is the router's to judge (FIRST_TOKEN_TIMEOUT_SECONDS and
    STREAM_IDLE_TIMEOUT_SECONDS, one timer per stream): the SDK's read timeout is off for the
    stream, or aiohttp would cancel and set a timer again for every read of every open stream.
    """

    def __init__(self, *, name: str, api_key: str, base_url: str, timeout: float) -> None:
        self.name = name
        self._client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=base_url,
            max_retries=0,
            timeout=timeout,
            http_client=_AioHttpClient(),
        )
        # Absolute, so the SDK does not merge a relative path into its base URL on every call.
        self._completions_url = f"{self._client.base_url}chat/completions"
        self._timeout = timeout
        self._stream_timeout = openai.Timeout(timeout, read=None)

    async def stream(self, request: ProviderRequest) -> AsyncIterator[Event]:
        """Start, Deltas, Usage (only when the upstream reported it), Finish; or a ProviderError.

        A reasoning model's stream (deepseek-reasoner) also gives, for each read that carried
        reasoning, its running total so far: `Usage(0, reasoning tokens, source="estimated")`, input
        unknown (0). It covers the output before it; the answer's text after it is not in it.
        """
        state = _StreamState()
        pending = b""
        try:
            async with asyncio.timeout(self._timeout):  # to the response's headers (see the class)
                response = await self._open(request)
            try:
                reader = _body_reader(response)
                read = reader.readany if reader is not None else functools.partial(anext, response.aiter_bytes(), b"")
                while True:
                    data = await read()
                    if not data:
                        break  # the end of the body
                    lines = (pending + data).split(b"\n")
                    pending = lines.pop()
                    # The text of every chunk in this read goes on as one Delta: a burst (an
                    # upstream faster than this process, or a reply sent at once) costs one event
                    # down the pipeline, not one per chunk; a paced stream still gets one per token.
                    # The chunks are parsed in a call of their own, so none of their objects stay
                    # alive while this stream waits for its next read (500 open streams, 500 of each).
                    reasoned = state.reasoning
                    model, text, failure = self._read(lines, state)
                    if model is not None:
                        yield Start(provider=self.name, model=model or request.model)
                    if state.reasoning != reasoned:
                        # DeepSeek bills its reasoning as output, and the text does not show it: the
                        # running count goes ahead of this read's text, so a stream cut or cancelled
                        # before its usage report is billed for it (and the router sees it is alive).
                        yield Usage(input_tokens=0, output_tokens=state.reasoning, source="estimated")
                    if text:
                        yield Delta(text)
                    if failure is not None:
                        raise failure
            finally:
                await response.aclose()
            if not state.done and state.finish is None:
                raise ProviderConnectionError(self.name, "the stream ended before its last chunk")
        except ProviderError:
            raise
        except Exception as exc:
            raise self._map_error(exc) from exc
        if state.usage is not None:
            yield self._usage(state.usage)
        yield Finish(state.finish or "stop")

    def _read(self, lines: list[bytes], state: _StreamState) -> tuple[str | None, str, ProviderError | None]:
        """Parse one read's `data:` lines into `state`: the model when this read holds the first
        chunk (else None), the read's text, and the error it ends with, if any."""
        model: str | None = None
        texts: list[str] = []
        for line in lines:
            if state.done or not line.startswith(b"data:"):
                continue  # blank separators, `event:` / comment lines, anything after [DONE]
            payload = line[5:].strip()
            if payload == _DONE:
                state.done = True
                continue
            try:
                chunk = orjson.loads(payload)
            except orjson.JSONDecodeError as exc:
                return model, "".join(texts), ProviderUnavailable(self.name, f"malformed stream chunk: {exc}")
            if chunk.get("error"):
                return model, "".join(texts), self._stream_error(chunk["error"])
            if not state.started:
                state.started = True
                model = chunk.get("model") or ""
            choices = chunk.get("choices")
            if choices:
                choice = choices[0]
                delta = choice.get("delta")
                if delta:
                    text = delta.get("content")
                    if text:
                        texts.append(text)
                    elif delta.get("reasoning_content"):
                        # One token a chunk, as DeepSeek streams its reasoning: never more than it made.
                        state.reasoning += 1
                if choice.get("finish_reason"):
                    state.finish = choice["finish_reason"]
            if chunk.get("usage"):
                state.usage = chunk["usage"]
        return model, texts[0] if len(texts) == 1 else "".join(texts), None

    async def list_models(self) -> list[str]:
        """The model ids the upstream lists (a free call, used by the status probe)."""
        try:
            page = await self._client.models.list()
        except Exception as exc:
            raise self._map_error(exc) from exc
        return [model.id for model in page.data]

    async def aclose(self) -> None:
        """Close the client's connection pool."""
        await self._client.close()

    async def _open(self, request: ProviderRequest) -> httpx2.Response:
        """POST the chat completion and return the unread SSE response (a non-2xx raises the SDK's error).

        The SDK's low-level `post` (its documented way to any endpoint): the SDK builds the
        request, authenticates, sends it and raises its status errors, but skips what this
        caller does not need on the hot path: checking the params against the typed signature
        (they are built here), a random idempotency key per call (the request id serves), a
        model object per chunk, and its telemetry headers (`_NO_TELEMETRY`).
        """
        # orjson hands back its bytes in a 4 KB allocation whatever their length; the body lives
        # as long as the stream (the request holds it), so it goes as an exact-size copy.
        body = memoryview(orjson.dumps(self._params(request))).tobytes()
        return await self._client.post(
            self._completions_url,
            cast_to=httpx2.Response,
            content=body,
            options=(
                {"headers": _NO_TELEMETRY, "timeout": self._stream_timeout, "idempotency_key": request.request_id}
                if request.request_id
                else {"headers": _NO_TELEMETRY, "timeout": self._stream_timeout}
            ),
            stream=True,
        )

    def _params(self, request: ProviderRequest) -> dict[str, Any]:
        params: dict[str, Any] = {
            "model": request.model,
            "messages": [_message(m) for m in request.messages],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        # OpenAI's newer models refuse `max_tokens`; DeepSeek only knows `max_tokens`.
        params["max_tokens" if self.name == "deepseek" else "max_completion_tokens"] = request.max_tokens
        if request.temperature is not None:
            params["temperature"] = request.temperature
        if request.stop:
            params["stop"] = list(request.stop)
        return params

    def _usage(self, usage: Mapping[str, Any]) -> Usage:
        details = usage.get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens") or usage.get("prompt_cache_hit_tokens") or 0
        return Usage(
            input_tokens=int(usage.get("prompt_tokens") or 0),
            output_tokens=int(usage.get("completion_tokens") or 0),
            cached_input_tokens=int(cached),
            source="provider",
        )

    def _stream_error(self, error: object) -> ProviderError:
        """The provider error for an in-stream `{"error": ...}` frame (5xx-like unless it says otherwise)."""
        if not isinstance(error, dict):
            return ProviderUnavailable(self.name, f"error in stream: {error}")
        code, type_ = str(error.get("code") or ""), str(error.get("type") or "")
        status = _ERROR_CODE_STATUS.get(code) or _ERROR_TYPE_STATUS.get(type_) or 500
        mapped = from_status(self.name, status, _describe(error, "error in stream"))
        mapped.status = None  # the HTTP answer itself was a 200
        return mapped

    def _map_error(self, exc: Exception) -> ProviderError:
        """One ProviderError for whatever the SDK, the transport or the stream parser raised."""
        if aiohttp_cause(exc) is not None:  # the transport's own error says timeout or broken connection
            return from_transport(self.name, exc) or ProviderConnectionError(self.name, "connection failed")
        if isinstance(exc, openai.APIStatusError):
            message = _describe(exc.body, exc.message) if isinstance(exc.body, dict) else exc.message
            return from_status(self.name, exc.status_code, message, exc.response.headers)
        if isinstance(exc, openai.APITimeoutError):
            return ProviderTimeout(self.name, "request timed out")
        if isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__
            return ProviderConnectionError(self.name, f"connection failed ({type(cause or exc).__name__})")
        mapped = from_transport(self.name, exc)
        if mapped is not None:
            return mapped
        logger.warning("unexpected error from %s", self.name, exc_info=exc)
        return ProviderUnavailable(self.name, f"unexpected {type(exc).__name__}: {exc}")


class _StreamState:
    """What one upstream stream has read so far (see `OpenAIProvider.stream`)."""

    __slots__ = ("done", "finish", "reasoning", "started", "usage")

    def __init__(self) -> None:
        self.started = False
        self.done = False
        self.finish: str | None = None
        self.usage: Mapping[str, Any] | None = None
        self.reasoning = 0  # reasoning_content chunks (deepseek-reasoner), one token each


def _message(message: ChatMessage) -> dict[str, str]:
    return {"role": message.role, "content": message.content}


def _describe(error: Mapping[str, Any], fallback: str) -> str:
    """An OpenAI error object's message, with its code (which the error mapping also reads)."""
    message = str(error.get("message") or fallback)
    code = error.get("code")
    return f"{message} ({code})" if code else message
