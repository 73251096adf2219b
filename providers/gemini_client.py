"""The Google Gemini provider, over the official google-genai SDK (streaming generateContent)."""

from __future__ import annotations

import contextvars
import logging
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx2
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from providers.base import (
    ChatMessage,
    ContentPolicyError,
    Delta,
    Event,
    Finish,
    ProviderAuthError,
    ProviderBadRequest,
    ProviderConnectionError,
    ProviderError,
    ProviderRequest,
    ProviderUnavailable,
    Start,
    Usage,
    UsageSource,
)
from providers.errors import from_status, from_transport

logger = logging.getLogger(__name__)

API_VERSION = "v1beta"
_POLICY_FINISHES = frozenset({"SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII", "IMAGE_SAFETY", "RECITATION"})
_FINISH_REASONS = {"STOP": "stop", "MAX_TOKENS": "length"}
_KEY_IN_URL = re.compile(r"([?&]key=)[^&#\s'\"]+", re.IGNORECASE)
_RETRY_DELAY = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")
_MAX_LISTED_MODELS = 10_000
# The upstream responses opened by the current stream() call, so closing it closes them at once
# (the SDK's nested generators only close theirs when garbage collected).
_opened_responses: contextvars.ContextVar[list[httpx2.Response] | None] = contextvars.ContextVar(
    "gemini_opened_responses", default=None
)


async def _track_response(response: httpx2.Response) -> None:
    opened = _opened_responses.get()
    if opened is not None:
        opened.append(response)


class GeminiProvider:
    """Gemini through `google.genai.Client`: one client per instance, SDK retries off.

    The SDK is given its own httpx2 client (so aiohttp is never picked, and every upstream
    response can be closed when the caller stops early). The key travels in `x-goog-api-key`.
    """

    list_page_size = 100

    def __init__(
        self,
        *,
        name: str,
        api_key: str,
        base_url: str,
        timeout: float,
        http_client: httpx2.AsyncClient | None = None,
    ) -> None:
        if not api_key:
            # The SDK would fall back to GOOGLE_API_KEY / GEMINI_API_KEY from the environment.
            raise ValueError("GeminiProvider needs an explicit api_key")
        self.name = name
        self._api_key = api_key
        self._owns_http = http_client is None
        self._http = http_client or httpx2.AsyncClient(timeout=timeout)
        if _track_response not in self._http.event_hooks["response"]:
            self._http.event_hooks["response"].append(_track_response)
        self._client = genai.Client(
            api_key=api_key,
            http_options=types.HttpOptions(
                base_url=base_url,
                api_version=API_VERSION,
                timeout=max(1, round(timeout * 1000)),  # milliseconds
                retry_options=types.HttpRetryOptions(attempts=1),  # the router is the only retry loop
                httpx_async_client=self._http,
            ),
        )

    def _config(self, request: ProviderRequest) -> types.GenerateContentConfig:
        system = "\n\n".join(m.content for m in request.messages if m.role == "system" and m.content)
        return types.GenerateContentConfig(
            system_instruction=system or None,
            max_output_tokens=request.max_tokens,
            temperature=request.temperature,
            stop_sequences=list(request.stop) or None,
            automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
            automatic_continuation=False,  # no hidden follow-up requests
        )

    @staticmethod
    def _contents(messages: tuple[ChatMessage, ...]) -> list[types.Content]:
        """The turns as Gemini contents; an empty one is left out (Gemini refuses an empty text part)."""
        return [
            types.Content(role="model" if m.role == "assistant" else "user", parts=[types.Part(text=m.content)])
            for m in messages
            if m.role != "system" and m.content
        ]

    async def stream(self, request: ProviderRequest) -> AsyncIterator[Event]:
        """Start, Deltas, Usage (as Gemini reported it), Finish; failures as ProviderErrors."""
        opened: list[httpx2.Response] = []
        chunks: AsyncIterator[types.GenerateContentResponse] | None = None
        try:
            token = _opened_responses.set(opened)
            try:
                chunks = await self._client.aio.models.generate_content_stream(
                    model=request.model, contents=self._contents(request.messages), config=self._config(request)
                )
                first = await anext(chunks, None)  # the request goes out here
            finally:
                _opened_responses.reset(token)
            produced_text = False
            usage: types.GenerateContentResponseUsageMetadata | None = None
            finish: str | None = None
            chunk = first
            while chunk is not None:
                feedback = chunk.prompt_feedback
                if feedback is not None and feedback.block_reason is not None:
                    raise ContentPolicyError(self.name, f"prompt blocked: {_enum_name(feedback.block_reason)}")
                if chunk is first:
                    yield Start(provider=self.name, model=chunk.model_version or request.model)
                candidate = chunk.candidates[0] if chunk.candidates else None
                if candidate is not None:
                    for part in (candidate.content.parts if candidate.content else None) or ():
                        if part.text and not part.thought:
                            produced_text = True
                            yield Delta(part.text)
                    if candidate.finish_reason is not None:
                        finish = _enum_name(candidate.finish_reason)
                if chunk.usage_metadata is not None:
                    usage = chunk.usage_metadata
                    if usage.thoughts_token_count and finish is None:
                        # Thoughts are output the text does not show: their running total goes ahead,
                        # so a stream cut or cancelled before its end is still billed for them.
                        yield _usage(usage, source="estimated")
                chunk = await anext(chunks, None)
            if finish is None:
                raise ProviderConnectionError(self.name, "the stream ended without a finishReason")
            if finish in _POLICY_FINISHES and not produced_text:
                raise ContentPolicyError(self.name, f"response blocked: {finish}")
            if usage is not None:
                yield _usage(usage, source="provider")
            yield Finish(_finish_reason(finish))
        except ProviderError:
            raise
        except Exception as exc:
            # Once the upstream answered (`opened`), a ValueError is the SDK refusing the answer, not the request.
            raise map_error(self.name, exc, api_key=self._api_key, answered=bool(opened)) from exc
        finally:
            await _close(chunks, opened)

    async def list_models(self) -> list[str]:
        """The model ids the key may call (without the `models/` prefix), every page."""
        names: list[str] = []
        try:
            config = types.ListModelsConfig(page_size=self.list_page_size)
            pager = await self._client.aio.models.list(config=config)
            async for model in pager:
                if model.name:
                    names.append(model.name.removeprefix("models/"))
                if len(names) >= _MAX_LISTED_MODELS:
                    break
        except Exception as exc:
            raise map_error(self.name, exc, api_key=self._api_key) from exc
        return names

    async def aclose(self) -> None:
        """Close the connection pool (when this provider created it)."""
        if self._owns_http:
            await self._http.aclose()


def map_error(provider: str, exc: Exception, *, api_key: str, answered: bool = False) -> ProviderError:
    """The provider error for whatever the SDK or the transport raised, with `api_key` redacted.

    `answered`: the upstream's response had arrived (so a ValueError is the SDK refusing its body).
    """
    if isinstance(exc, genai_errors.APIError):
        return _from_api_error(provider, exc, api_key)
    if isinstance(exc, genai_errors.UnknownApiResponseError):
        return ProviderUnavailable(provider, "malformed response from upstream")
    if (error := from_transport(provider, exc)) is not None:
        return error
    described = _redact(f"{type(exc).__name__}: {exc}", api_key)
    if isinstance(exc, ValueError | TypeError):
        if answered:  # a response the SDK's models refuse (pydantic's ValidationError is a ValueError)
            return ProviderUnavailable(provider, f"malformed response from upstream ({described})")
        # the SDK refused the request before sending it
        return ProviderBadRequest(provider, f"request rejected by the client library ({described})")
    return ProviderError(provider, f"unexpected client error ({described})")


def _from_api_error(provider: str, exc: genai_errors.APIError, api_key: str) -> ProviderError:
    """Gemini's error answer (HTTP or in-stream): API_KEY_INVALID is an auth error; RetryInfo a Retry-After."""
    details = _error_details(exc.details)
    status = exc.status or ""
    text = f"{status}: {exc.message}" if status and exc.message else str(exc.message or status or exc.code)
    message = _redact(text, api_key)
    code = exc.code if isinstance(exc.code, int) else 502
    if any(d.get("reason") == "API_KEY_INVALID" for d in details):
        return ProviderAuthError(provider, message, status=code)
    headers = _headers_of(exc.response)
    if "retry-after" not in {k.lower() for k in headers}:
        delays = (_RETRY_DELAY.match(str(d.get("retryDelay", ""))) for d in details)
        delay = next((m for m in delays if m is not None), None)
        if delay is not None:
            headers["retry-after"] = delay.group(1)
    return from_status(provider, code, message, headers)


def _usage(metadata: types.GenerateContentResponseUsageMetadata, *, source: UsageSource) -> Usage:
    """Gemini's usage (cumulative): thoughts are billed as output; cached content is part of the prompt."""
    return Usage(
        input_tokens=metadata.prompt_token_count or 0,
        output_tokens=(metadata.candidates_token_count or 0) + (metadata.thoughts_token_count or 0),
        cached_input_tokens=metadata.cached_content_token_count or 0,
        source=source,
    )


def _redact(text: str, api_key: str) -> str:
    text = _KEY_IN_URL.sub(r"\1[redacted]", text)
    return text.replace(api_key, "[redacted]") if api_key else text


def _enum_name(value: Any) -> str:
    return str(getattr(value, "value", value))


def _finish_reason(finish: str) -> str:
    if finish in _POLICY_FINISHES:
        return "content_filter"
    return _FINISH_REASONS.get(finish, finish.lower())


def _error_details(body: Any) -> list[dict[str, Any]]:
    error = body.get("error", body) if isinstance(body, Mapping) else None
    details = error.get("details") if isinstance(error, Mapping) else None
    return [d for d in details if isinstance(d, dict)] if isinstance(details, list) else []


def _headers_of(response: Any) -> dict[str, str]:
    headers = getattr(response, "headers", None)
    if headers is None:
        return {}
    return {str(k): str(v) for k, v in headers.items()}


async def _close(chunks: AsyncIterator[Any] | None, opened: list[httpx2.Response]) -> None:
    """Close every upstream response the stream opened, then the SDK's generator (idempotent).

    A failure while closing is logged, never raised: it would hide the error being reported.
    """
    try:
        for response in opened:
            await response.aclose()
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    except Exception:
        logger.debug("closing a gemini stream failed", exc_info=True)
