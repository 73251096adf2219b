"""The sandbox's Anthropic Messages API: POST /v1/messages (JSON and SSE) and GET /v1/models."""

from __future__ import annotations

import contextlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from providers.sandbox.faults import (
    DEFAULT_REPLY_TOKENS,
    Faults,
    RequestLog,
    SandboxState,
    count_prompt_tokens,
    parse_faults,
    reply_tokens,
)
from providers.sandbox.streaming import (
    cut_response,
    hang_until_disconnect,
    retry_after_headers,
    stream_response,
)

MAX_CONTEXT_TOKENS = 200_000
MODELS: tuple[tuple[str, str, str], ...] = (
    ("claude-sonnet-4-20250514", "Claude Sonnet 4", "2025-05-14T00:00:00Z"),
    ("claude-haiku-4-5-20251001", "Claude Haiku 4.5", "2025-10-01T00:00:00Z"),
    ("claude-3-opus-20240229", "Claude Opus 3", "2024-02-29T00:00:00Z"),
    ("claude-3-sonnet-20240229", "Claude Sonnet 3", "2024-02-29T00:00:00Z"),
    ("claude-3-haiku-20240307", "Claude Haiku 3", "2024-03-07T00:00:00Z"),
)
# Anthropic's error type and a message in its words, per HTTP status.
_STATUS_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "sandbox: invalid request"),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "Not found"),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of requests has exceeded your per-minute rate limit."),
    500: ("api_error", "Internal server error"),
    502: ("api_error", "Bad gateway"),
    503: ("api_error", "Service unavailable"),
    504: ("timeout_error", "Request timeout"),
    529: ("overloaded_error", "Overloaded"),
}
POLICY_MESSAGE = "Output blocked by content filtering policy"


@dataclass(frozen=True)
class _MessagesCall:
    model: str
    texts: list[str]  # the system prompt (when given), then each message's text
    last_user: str
    max_tokens: int
    stop_sequences: list[str]
    stream: bool


def error_response(status: int, message: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error answer with Anthropic's body: {"type": "error", "error": {"type", "message"}, "request_id"}."""
    error_type, default_message = _STATUS_ERRORS.get(status, ("api_error", f"Error {status}"))
    request_id = f"req_{uuid.uuid4().hex[:24]}"
    body = {
        "type": "error",
        "error": {"type": error_type, "message": message or default_message},
        "request_id": request_id,
    }
    return JSONResponse(body, status_code=status, headers={"request-id": request_id, **(headers or {})})


def _text_of(content: object) -> str | None:
    """The text of a message's `content`: a string, or the text blocks of a block list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text"]
        return "".join(p for p in parts if isinstance(p, str))
    return None


def _parse_call(body: Any) -> _MessagesCall | str:
    """The request's fields, or the message of the 400 a real Messages API would answer."""
    if not isinstance(body, dict):
        return "body: Input should be an object"
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return "model: Field required"
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        return "max_tokens: Field required"
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        return "max_tokens: Input should be a positive integer"
    temperature = body.get("temperature")
    if temperature is not None and (not isinstance(temperature, int | float) or not 0 <= temperature <= 1):
        return "temperature: range: 0..1"
    stops = body.get("stop_sequences") or []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        return "stop_sequences: Input should be a list of strings"
    if any(not s.strip() for s in stops):
        return "stop_sequences: each stop sequence must contain non-whitespace"
    texts: list[str] = []
    system = body.get("system")
    if system is not None:
        system_text = _text_of(system)
        if system_text is None:
            return "system: Input should be a string or a list of text blocks"
        if system_text and not system_text.strip():
            return "system: text content blocks must contain non-whitespace text"
        if system_text:
            texts.append(system_text)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    last_user = ""
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        text = _text_of(message.get("content")) if isinstance(message, dict) else None
        if role == "system":
            return (
                'messages: Unexpected role "system". The Messages API accepts a top-level `system` parameter, '
                'not "system" as an input message role.'
            )
        if role not in ("user", "assistant") or text is None:
            return f"messages.{index}: Input should be a user or assistant message with content"
        final_assistant = role == "assistant" and index == len(messages) - 1
        if not text and not final_assistant:
            return (
                f"messages.{index}: all messages must have non-empty content "
                "except for the optional final assistant message"
            )
        if text and not text.strip():
            return "messages: text content blocks must contain non-whitespace text"
        texts.append(text)
        if role == "user":
            last_user = text
    return _MessagesCall(model, texts, last_user, max_tokens, stops, bool(body.get("stream")))


def api_key_of(request: Request) -> str:
    """The caller's key: `x-api-key`, or `Authorization: Bearer` (how newer SDKs send an API key)."""
    api_key = request.headers.get("x-api-key", "")
    if not api_key:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        api_key = token.strip() if scheme.lower() == "bearer" else ""
    return api_key


def _auth_failure(request: Request) -> JSONResponse | None:
    api_key = api_key_of(request)
    if not api_key:
        return error_response(401, "x-api-key header is required")
    if api_key.startswith("invalid"):
        return error_response(401, "invalid x-api-key")
    if not request.headers.get("anthropic-version"):
        return error_response(400, "anthropic-version: header is required")
    return None


def _fault_failure(faults: Faults, call: _MessagesCall, input_tokens: int) -> Response:
    code = faults.fail or ""
    if code == "conn":
        return cut_response()
    if code == "context":
        over = MAX_CONTEXT_TOKENS + input_tokens
        return error_response(400, f"prompt is too long: {over} tokens > {MAX_CONTEXT_TOKENS} maximum")
    if code == "policy":
        return error_response(400, POLICY_MESSAGE)
    status = int(code) if code.isdigit() else 500
    message = f"model: {call.model}" if status == 404 else None
    return error_response(status, message, retry_after_headers(faults, status))


def _reply(call: _MessagesCall, faults: Faults) -> tuple[list[str], str, str | None]:
    """The reply tokens, the stop reason and the stop sequence that ended it (if any)."""
    wanted = DEFAULT_REPLY_TOKENS if faults.tokens is None else faults.tokens
    tokens = reply_tokens(call.last_user, min(wanted, call.max_tokens))
    text = ""
    for index, token in enumerate(tokens):
        text += token
        hit = next((s for s in call.stop_sequences if s and s in text), None)
        if hit is not None:
            return tokens[:index], "stop_sequence", hit
    return tokens, ("max_tokens" if wanted > call.max_tokens else "end_turn"), None


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _usage(input_tokens: int, output_tokens: int) -> dict[str, int]:
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output_tokens,
    }


def _message(call: _MessagesCall, text: str, stop: tuple[str | None, str | None], usage: dict[str, int]) -> dict:
    return {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": call.model,
        "content": [{"type": "text", "text": text}] if text else [],
        "stop_reason": stop[0],
        "stop_sequence": stop[1],
        "usage": usage,
    }


def _streamed(state: SandboxState, faults: Faults, call: _MessagesCall, input_tokens: int) -> Response:
    tokens, stop_reason, stop_sequence = _reply(call, faults)
    start = _message(call, "", (None, None), _usage(input_tokens, 1))
    head = [
        _sse("message_start", {"type": "message_start", "message": start}),
        _sse(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        _sse("ping", {"type": "ping"}),
    ]
    content = [
        _sse(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}},
        )
        for t in tokens
    ]
    tail = [
        _sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                "usage": {"output_tokens": len(tokens)},
            },
        ),
        _sse("message_stop", {"type": "message_stop"}),
    ]

    def error_frame() -> bytes:
        return _sse("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})

    return stream_response(state=state, faults=faults, head=head, content=content, tail=tail, error_frame=error_frame)


def _model_info(model_id: str, display_name: str, created_at: str) -> dict[str, str]:
    return {"type": "model", "id": model_id, "display_name": display_name, "created_at": created_at}


def routes(state: SandboxState, provider: str = "claude") -> list[BaseRoute]:
    """The Messages API routes, recording each request in `state` under `provider`."""

    def log(request: Request, model: str, stream: bool, status: int) -> None:
        state.log(RequestLog(provider, request.url.path, model, stream, status, api_key_of(request)))

    async def messages(request: Request) -> Response:
        try:
            body: Any = json.loads(await request.body() or b"null")
        except ValueError:
            body = None
        model = str(body.get("model", "")) if isinstance(body, dict) else ""
        stream = bool(body.get("stream")) if isinstance(body, dict) else False
        response: Response | None = _auth_failure(request)
        if response is None:
            parsed = _parse_call(body)
            if isinstance(parsed, str):
                response = error_response(400, parsed)
            else:
                response = await _answer(request, parsed)
        log(request, model, stream, response.status_code)
        return response

    async def _answer(request: Request, call: _MessagesCall) -> Response:
        faults = parse_faults(call.last_user, provider)
        input_tokens = count_prompt_tokens(call.texts)
        if faults.hang:
            with contextlib.suppress(TimeoutError):  # the client stayed the whole HANG_SECONDS
                await hang_until_disconnect(request)
            return error_response(504)
        if state.should_fail(faults, provider, call.last_user):
            return _fault_failure(faults, call, input_tokens)
        if call.stream:
            return _streamed(state, faults, call, input_tokens)
        if faults.drop_after is not None:
            return cut_response()
        tokens, stop_reason, stop_sequence = _reply(call, faults)
        usage = _usage(input_tokens, len(tokens))
        return JSONResponse(_message(call, "".join(tokens), (stop_reason, stop_sequence), usage))

    async def list_models(request: Request) -> Response:
        response: Response | None = _auth_failure(request)
        if response is None:
            data = [_model_info(*m) for m in MODELS]
            response = JSONResponse(
                {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}
            )
        log(request, "", False, response.status_code)
        return response

    async def get_model(request: Request) -> Response:
        response: Response | None = _auth_failure(request)
        model_id = request.path_params["model_id"]
        if response is None:
            found = [
                {"type": "model", "id": i, "display_name": n, "created_at": c} for i, n, c in MODELS if i == model_id
            ]
            response = JSONResponse(found[0]) if found else error_response(404, f"model: {model_id}")
        log(request, model_id, False, response.status_code)
        return response

    return [
        Route("/v1/messages", messages, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model_id:str}", get_model, methods=["GET"]),
    ]
