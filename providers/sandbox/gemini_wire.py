"""The sandbox's Gemini wire protocol: generateContent, streamGenerateContent (SSE) and models.list."""

from __future__ import annotations

import hashlib
import json
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
from providers.sandbox.streaming import cut_response, hang_until_disconnect, retry_after_headers, stream_response

API_VERSION = "v1beta"
CONTEXT_LIMIT = 1_048_575  # what Gemini 2.5 reports as "the maximum number of tokens allowed"
SANDBOX_MODELS: tuple[tuple[str, str, int, int], ...] = (
    ("gemini-2.5-flash", "Gemini 2.5 Flash", 1_048_576, 65_536),
    ("gemini-2.5-pro", "Gemini 2.5 Pro", 1_048_576, 65_536),
    ("gemini-2.0-flash", "Gemini 2.0 Flash", 1_048_576, 8_192),
    ("gemini-1.0-pro", "Gemini 1.0 Pro", 32_760, 8_192),
    ("gemini-1.0-pro-vision", "Gemini 1.0 Pro Vision", 16_384, 2_048),
    ("gemini-1.0-ultra", "Gemini 1.0 Ultra", 32_760, 8_192),
)
_CONFIG_FIELD = "GenerateContentRequest.generation_config"
_SSE_END = b"\r\n\r\n"  # Google's front end frames each event with CRLF CRLF
_KEY_INVALID = "API key not valid. Please pass a valid API key."
_UNREGISTERED = (
    "Method doesn't allow unregistered callers (callers without established identity). "
    "Please use API Key or other form of API consumer identity to call this API."
)
# [[fail:CODE]] -> (HTTP status, google.rpc status, message), as Gemini answers them.
_FAULTS: dict[str, tuple[int, str, str]] = {
    "400": (400, "INVALID_ARGUMENT", "Request contains an invalid argument."),
    "401": (
        401,
        "UNAUTHENTICATED",
        "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie "
        "or other valid authentication credential.",
    ),
    "403": (403, "PERMISSION_DENIED", "The caller does not have permission"),
    "429": (
        429,
        "RESOURCE_EXHAUSTED",
        "You exceeded your current quota, please check your plan and billing details. For more "
        "information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.",
    ),
    "500": (
        500,
        "INTERNAL",
        "An internal error has occurred. Please retry or report in "
        "https://developers.generativeai.google/guide/troubleshooting",
    ),
    "502": (502, "UNAVAILABLE", "Bad Gateway"),
    "503": (503, "UNAVAILABLE", "The model is overloaded. Please try again later."),
    "529": (529, "UNAVAILABLE", "The model is overloaded. Please try again later."),
}


def _error(
    status: int,
    rpc_status: str,
    message: str,
    *,
    details: list[Any] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"code": status, "message": message, "status": rpc_status}
    if details:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _key_invalid() -> JSONResponse:
    details = [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "API_KEY_INVALID",
            "domain": "googleapis.com",
            "metadata": {"service": "generativelanguage.googleapis.com"},
        },
        {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US", "message": _KEY_INVALID},
    ]
    return _error(400, "INVALID_ARGUMENT", _KEY_INVALID, details=details)


def _auth_error(api_key: str) -> JSONResponse | None:
    """Gemini's answer to a missing (403) or rejected (400 API_KEY_INVALID) key; None when accepted."""
    if not api_key:
        return _error(403, "PERMISSION_DENIED", _UNREGISTERED)
    if api_key.startswith("invalid"):
        return _key_invalid()
    return None


_MAX_STOP_SEQUENCES = 5


@dataclass(frozen=True)
class _Call:
    model: str
    texts: list[str]  # the system instruction and every turn, for the prompt-token count
    last_user_text: str
    max_output_tokens: int | None
    stop_sequences: tuple[str, ...]


def _text_of(content: Any) -> str:
    parts = content.get("parts") if isinstance(content, dict) else None
    if not isinstance(parts, list):
        return ""
    return "".join(str(p.get("text", "")) for p in parts if isinstance(p, dict))


def _parse_call(model: str, body: Any) -> _Call | JSONResponse:
    """The request's texts and generation settings, or Gemini's 400 for a malformed request."""
    if not isinstance(body, dict):
        return _error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        return _error(400, "INVALID_ARGUMENT", "* GenerateContentRequest.contents: contents is not specified\n")
    texts: list[str] = []
    last_user = ""
    for content in contents:
        role = content.get("role", "user") if isinstance(content, dict) else None
        if role not in ("user", "model"):
            return _error(400, "INVALID_ARGUMENT", "Please use a valid role: user, model.")
        if not _text_of(content):
            return _error(
                400,
                "INVALID_ARGUMENT",
                "Unable to submit request because it has an empty text parameter. "
                "Add a value to the parameter and try again.",
            )
        texts.append(_text_of(content))
        if role == "user":
            last_user = texts[-1]
    system = body.get("systemInstruction")
    if system is not None:
        texts.insert(0, _text_of(system))
    config = body.get("generationConfig") or {}
    max_tokens = config.get("maxOutputTokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        return _error(400, "INVALID_ARGUMENT", f"* {_CONFIG_FIELD}.max_output_tokens: must be positive")
    temperature = config.get("temperature")
    if temperature is not None and not (isinstance(temperature, int | float) and 0 <= temperature <= 2):
        return _error(400, "INVALID_ARGUMENT", f"* {_CONFIG_FIELD}.temperature: must be in [0, 2]")
    if len(config.get("stopSequences") or ()) > _MAX_STOP_SEQUENCES:
        return _error(
            400, "INVALID_ARGUMENT", f"* {_CONFIG_FIELD}.stop_sequences: at most {_MAX_STOP_SEQUENCES} are allowed"
        )
    stops = tuple(str(s) for s in config.get("stopSequences") or () if s)
    return _Call(model, texts, last_user, max_tokens, stops)


def _fault_response(call: _Call, faults: Faults, stream: bool) -> Response:
    """The failure `[[fail:CODE]]` asks for, in Gemini's shape."""
    code = faults.fail or "500"
    if code == "conn":
        return cut_response(200, "text/event-stream" if stream else "application/json")
    if code == "context":
        counted = CONTEXT_LIMIT + count_prompt_tokens(call.texts)
        message = f"The input token count ({counted}) exceeds the maximum number of tokens allowed ({CONTEXT_LIMIT})."
        return _error(400, "INVALID_ARGUMENT", message)
    if code == "policy":
        return _blocked(call, stream)
    if code == "404":
        message = (
            f"models/{call.model} is not found for API version {API_VERSION}, or is not supported for "
            "generateContent. Call ListModels to see the list of available models and their supported methods."
        )
        return _error(404, "NOT_FOUND", message)
    other = (int(code) if code.isdigit() else 500, "INTERNAL", "Internal error encountered.")
    status, rpc_status, message = _FAULTS.get(code, other)
    headers = retry_after_headers(faults, status)
    details: list[Any] = []
    if status == 429:
        details.append({"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": []})
    if "retry-after" in headers:
        delay = f"{headers['retry-after']}s"
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay})
    return _error(status, rpc_status, message, details=details, headers=headers)


def _usage(call: _Call, output_tokens: int | None, thoughts: int = 0) -> dict[str, Any]:
    """usageMetadata, cumulative; a thinking model's thoughts came before its first chunk, and count as output."""
    prompt = count_prompt_tokens(call.texts)
    total = prompt + (output_tokens or 0) + thoughts
    usage: dict[str, Any] = {"promptTokenCount": prompt, "totalTokenCount": total}
    if output_tokens is not None:
        usage["candidatesTokenCount"] = output_tokens
    usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": prompt}]
    if thoughts:
        usage["thoughtsTokenCount"] = thoughts
    return usage


def _response_id(call: _Call) -> str:
    return hashlib.sha256(f"{call.model}\x00{call.last_user_text}".encode()).hexdigest()[:22]


def _envelope(call: _Call, candidates: list[dict[str, Any]] | None, usage: dict[str, Any]) -> dict[str, Any]:
    answer: dict[str, Any] = {}
    if candidates is not None:
        answer["candidates"] = candidates
    answer.update(usageMetadata=usage, modelVersion=call.model, responseId=_response_id(call))
    return answer


def _candidate(text: str, finish_reason: str | None) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}}
    if finish_reason is not None:
        candidate["finishReason"] = finish_reason
    candidate["index"] = 0
    return candidate


def _blocked(call: _Call, stream: bool) -> Response:
    """What Gemini sends for a refused prompt: 200, promptFeedback.blockReason, no candidates."""
    answer = _envelope(call, None, _usage(call, None))
    answer = {"promptFeedback": {"blockReason": "SAFETY", "safetyRatings": []}, **answer}
    if stream:
        return Response(_sse(answer), media_type="text/event-stream")
    return JSONResponse(answer)


def _reply(call: _Call, faults: Faults) -> tuple[list[str], str]:
    """The reply tokens and finishReason: MAX_TOKENS when capped, STOP otherwise (stop sequences honored)."""
    wanted = DEFAULT_REPLY_TOKENS if faults.tokens is None else faults.tokens
    count = wanted if call.max_output_tokens is None else min(wanted, call.max_output_tokens)
    tokens = reply_tokens(call.last_user_text, count)
    finish = "MAX_TOKENS" if count < wanted else "STOP"
    full = "".join(tokens)
    cut = min((p for p in (full.find(s) for s in call.stop_sequences) if p >= 0), default=-1)
    if cut < 0:
        return tokens, finish
    kept: list[str] = []
    used = 0
    for token in tokens:
        if used + len(token) >= cut:
            if cut > used:
                kept.append(token[: cut - used])
            break
        kept.append(token)
        used += len(token)
    return kept, "STOP"


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + _SSE_END


def _stream(state: SandboxState, call: _Call, faults: Faults, tokens: list[str], finish: str) -> Response:
    thoughts = faults.thoughts
    content = [
        _sse(_envelope(call, [_candidate(t, None)], _usage(call, i + 1, thoughts))) for i, t in enumerate(tokens)
    ]
    tail = [_sse(_envelope(call, [_candidate("", finish)], _usage(call, len(tokens), thoughts)))]

    def error_frame() -> bytes:
        code, status, message = _FAULTS["503"]
        return _sse({"error": {"code": code, "message": message, "status": status}})

    return stream_response(state=state, faults=faults, head=[], content=content, tail=tail, error_frame=error_frame)


def _api_key(request: Request) -> str:
    return request.headers.get("x-goog-api-key") or request.query_params.get("key") or ""


def routes(state: SandboxState, provider: str = "gemini") -> list[BaseRoute]:
    """Gemini's v1beta routes, answering from `state` (mounted under /gemini)."""

    def log(request: Request, model: str, stream: bool, status: int) -> None:
        state.log(RequestLog(provider, request.url.path, model, stream, status, _api_key(request)))

    async def generate(request: Request) -> Response:
        target = request.path_params["target"]
        model, _, method = target.rpartition(":")
        stream = method == "streamGenerateContent"
        if method not in ("generateContent", "streamGenerateContent") or not model:
            log(request, model or target, stream, 404)
            return _error(404, "NOT_FOUND", f"Method not found: {target}")
        if (refused := _auth_error(_api_key(request))) is not None:
            log(request, model, stream, refused.status_code)
            return refused
        try:
            body = json.loads(await request.body() or b"null")
        except json.JSONDecodeError:
            body = None
        call = _parse_call(model, body)
        if isinstance(call, JSONResponse):
            log(request, model, stream, call.status_code)
            return call
        faults = parse_faults(call.last_user_text, provider)
        if faults.hang:
            await hang_until_disconnect(request)
            log(request, model, stream, 504)
            return _error(504, "DEADLINE_EXCEEDED", "Deadline expired before operation could complete.")
        if state.should_fail(faults, provider, call.last_user_text):
            failed = _fault_response(call, faults, stream)
            log(request, model, stream, failed.status_code)
            return failed
        tokens, finish = _reply(call, faults)
        log(request, model, stream, 200)
        if stream:
            return _stream(state, call, faults, tokens, finish)
        if faults.drop_after is not None:
            return cut_response()
        if faults.error_after is not None:
            code, status, message = _FAULTS["503"]
            return _error(code, status, message)
        usage = _usage(call, len(tokens), faults.thoughts)
        return JSONResponse(_envelope(call, [_candidate("".join(tokens), finish)], usage))

    async def list_models(request: Request) -> Response:
        if (refused := _auth_error(_api_key(request))) is not None:
            log(request, "", False, refused.status_code)
            return refused
        try:
            size = max(1, min(int(request.query_params.get("pageSize", "50")), 1000))
            start = int(request.query_params.get("pageToken") or 0)
        except ValueError:
            log(request, "", False, 400)
            return _error(400, "INVALID_ARGUMENT", "Invalid pageSize or pageToken.")
        page = SANDBOX_MODELS[start : start + size]
        models = [
            {
                "name": f"models/{name}",
                "version": "001",
                "displayName": display,
                "inputTokenLimit": input_limit,
                "outputTokenLimit": output_limit,
                "supportedGenerationMethods": ["generateContent", "countTokens"],
            }
            for name, display, input_limit, output_limit in page
        ]
        answer: dict[str, Any] = {"models": models}
        if start + size < len(SANDBOX_MODELS):
            answer["nextPageToken"] = str(start + size)
        log(request, "", False, 200)
        return JSONResponse(answer)

    return [
        Route(f"/{API_VERSION}/models", list_models, methods=["GET"]),
        Route(f"/{API_VERSION}/models/{{target}}", generate, methods=["POST"]),
    ]
