"""OpenAPI for the endpoints drf-spectacular cannot see (ASGI apps, plain async views), added by a
postprocessing hook from the same pydantic models that validate requests; DRF operations get the
auth and error responses their views really give."""

from __future__ import annotations

import copy
from typing import Any

from django.conf import settings
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from pydantic import BaseModel

from chat.openai_compat import CompletionRequest
from chat.schemas import BatchResponse, ChatRequest, ChatResponse, ErrorBody

SECURITY: list[dict[str, list[Any]]] = [{"bearerAuth": []}, {"apiKeyHeader": []}]
SECURITY_SCHEMES = {
    "bearerAuth": {"type": "http", "scheme": "bearer"},
    "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}
# What `chat.schemas.ChatRequest` refuses beyond its JSON types: a message that is blank once
# control characters are removed, a blank model. Spelled out (not `\\s`): ECMA's `\\s`, which the
# schema's readers use, and Python's `str.strip()` disagree on a few characters.
_PY_WHITESPACE = (
    "\\t\\n\\u000b\\f\\r\\u001c-\\u001f \\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"
)
_VISIBLE_CHARACTER = f"[^{_PY_WHITESPACE}\\u0000-\\u001f\\u007f-\\u009f]"
_NOT_BLANK = f"[^{_PY_WHITESPACE}]"

CHAT_EXAMPLE = {"message": "Hello! Say hi back.", "model": "openai", "max_tokens": 64, "temperature": 0.5}

_DESCRIPTIONS = {
    "400": "Invalid request (the field is named in details), unknown model, context too long, streaming disabled",
    "401": "Missing, wrong or revoked API key",
    "403": "Model not allowed on the caller's plan",
    "404": "Not found (or not the caller's)",
    "405": "Method not allowed",
    "413": "Body too large",
    "429": "Hourly request limit or daily token quota reached (Retry-After, X-RateLimit-*)",
    "502": "The provider failed and fallback is off",
    "503": "No provider could serve the request",
    "504": "Upstream timeout or request deadline exceeded",
}
_CHAT_ERRORS = ("400", "401", "403", "404", "405", "413", "429", "502", "503", "504")


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    """`Authorization: Bearer KEY` or `X-API-Key: KEY` (either one), for DRF views."""

    target_class = "accounts.authentication.ApiKeyAuthentication"
    name = list(SECURITY_SCHEMES)

    def get_security_requirement(self, auto_schema: Any) -> list[dict[str, list[Any]]]:
        return SECURITY

    def get_security_definition(self, auto_schema: Any) -> list[dict[str, Any]]:
        return list(SECURITY_SCHEMES.values())


def register_extensions(endpoints: list[Any]) -> list[Any]:
    """drf-spectacular PREPROCESSING_HOOKS entry: importing this module registered the auth scheme."""
    return endpoints


def _component(components: dict[str, Any], model: type[BaseModel]) -> dict[str, str]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in schema.pop("$defs", {}).items():
        components.setdefault(name, definition)
    components[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(error: dict[str, Any], statuses: tuple[str, ...]) -> dict[str, Any]:
    return {status: _json(error, _DESCRIPTIONS[status]) for status in statuses}


def _post(
    operation_id: str,
    summary: str,
    request: dict[str, Any],
    ok: dict[str, Any],
    errors: dict[str, Any],
    example: dict[str, Any],
) -> dict[str, Any]:
    return {
        "post": {
            "operationId": operation_id,
            "summary": summary,
            "tags": ["chat"],
            "security": SECURITY,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": request, "example": example}},
            },
            "responses": {"200": ok, **errors},
        }
    }


def _get(operation_id: str, summary: str, tag: str, ok: dict[str, Any], errors: dict[str, Any]) -> dict[str, Any]:
    return {
        "operationId": operation_id,
        "summary": summary,
        "tags": [tag],
        "security": SECURITY,
        "responses": {"200": ok, **errors},
    }


def _chat_request_schema(components: dict[str, Any]) -> dict[str, str]:
    ref = _component(components, ChatRequest)
    message = components["ChatRequest"]["properties"]["message"]
    # Not blank once control characters are removed (chat.schemas.sanitize).
    message.update(pattern=_VISIBLE_CHARACTER, minLength=1, maxLength=settings.MAX_MESSAGE_CHARS)
    properties = components["ChatRequest"]["properties"]
    for name, extra in (
        ("model", {"pattern": _NOT_BLANK}),
        ("system_prompt", {"maxLength": settings.MAX_MESSAGE_CHARS}),
    ):
        for option in properties[name].get("anyOf", []):
            if option.get("type") == "string":
                option.update(extra)
    return ref


def _batch_request(chat_request: dict[str, Any]) -> dict[str, Any]:
    # Only the batch's own shape is refused with 400; an item that is not a valid ChatRequest
    # fails alone, as its result (status 400), and the batch still answers 200 (DESIGN.md §6).
    return {
        "type": "object",
        "required": ["requests"],
        "additionalProperties": False,
        "properties": {
            "requests": {
                "type": "array",
                "minItems": 1,
                "maxItems": settings.BATCH_MAX_ITEMS,
                "items": {
                    "description": "A ChatRequest; anything else is reported as that item's 400",
                    "anyOf": [chat_request, {}],
                },
            }
        },
    }


def _sse_events(chat_response: dict[str, Any], error: dict[str, Any]) -> dict[str, Any]:
    """`text/event-stream` whose schema describes one event (OpenAPI 3.0): its name and JSON data."""
    started = {
        "type": "object",
        "required": ["request_id", "conversation_id", "model", "provider"],
        "properties": {
            "request_id": {"type": "string"},
            "conversation_id": {"type": "string", "format": "uuid"},
            "model": {"type": "string"},
            "provider": {"type": "string"},
        },
    }
    token = {"type": "object", "required": ["delta"], "properties": {"delta": {"type": "string"}}}

    def event(name: str, payload: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "object",
            "required": ["event", "data"],
            "properties": {
                "event": {"enum": [name]},
                "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": payload},
            },
        }

    one_event = {
        "oneOf": [event("start", started), event("token", token), event("done", chat_response), event("error", error)]
    }
    return {"text/event-stream": {"schema": one_event}}


def _openai_error() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                },
            }
        },
    }


def _openai_sse(error: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's stream: `data:` lines (no event names) of chunk or error JSON, then `data: [DONE]`."""
    chunk = {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {"object": {"enum": ["chat.completion.chunk"]}, "choices": {"type": "array"}},
    }
    json_data = {
        "type": "string",
        "not": {"enum": ["[DONE]"]},
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [chunk, error]},
    }
    one_event = {
        "type": "object",
        "required": ["event", "data"],
        "properties": {"event": {"enum": ["message"]}, "data": {"anyOf": [{"enum": ["[DONE]"]}, json_data]}},
    }
    return {"text/event-stream": {"schema": one_event}}


def _openai_paths(components: dict[str, Any]) -> dict[str, Any]:
    error = _openai_error()
    completion_request = _component(components, CompletionRequest)
    completion = {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "chat.completion"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array"},
            "usage": {
                "type": "object",
                "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
                "properties": {
                    "prompt_tokens": {"type": "integer"},
                    "completion_tokens": {"type": "integer"},
                    "total_tokens": {"type": "integer"},
                },
            },
        },
    }
    model = {
        "type": "object",
        "required": ["id", "object", "created", "owned_by"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "model"},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
        },
    }
    model_list = {
        "type": "object",
        "required": ["object", "data"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": model}},
    }
    ok = {
        "description": "The completion (`data:` chunks as Server-Sent Events when stream is true)",
        "content": {"application/json": {"schema": completion}, **_openai_sse(error)},
    }
    chat = _post(
        "v1_chat_completions",
        "OpenAI-compatible chat completion (OpenAI's error body)",
        completion_request,
        ok,
        _errors(error, _CHAT_ERRORS),
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32},
    )
    chat["post"]["tags"] = ["openai"]
    models = _get("v1_models_list", "The catalog in OpenAI's list shape", "openai", _json(model_list, "Models"), {})
    models["responses"].update(_errors(error, ("401", "405")))
    summary = "One model in OpenAI's shape (a provider name: its default model)"
    one = _get("v1_models_retrieve", summary, "openai", _json(model, "Model"), {})
    one["parameters"] = [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]
    one["responses"].update(_errors(error, ("401", "404", "405")))
    return {"/v1/chat/completions": chat, "/v1/models": {"get": models}, "/v1/models/{model}": {"get": one}}


def _usage_path(error: dict[str, Any]) -> dict[str, Any]:
    totals = {
        "requests": {"type": "integer"},
        "input_tokens": {"type": "integer"},
        "output_tokens": {"type": "integer"},
        "cost": {"type": "string"},
    }

    def rows(key: str) -> dict[str, Any]:
        return {
            "type": "array",
            "items": {
                "type": "object",
                "required": [key, *totals],
                "properties": {key: {"type": "string"}, **totals},
            },
        }

    usage = {
        "type": "object",
        "required": ["period", *totals, "by_provider", "by_model", "by_day", "quota"],
        "properties": {
            "period": {
                "type": "object",
                "required": ["from", "to"],
                "properties": {"from": {"type": "string"}, "to": {"type": "string"}},
            },
            **totals,
            "by_provider": rows("provider"),
            "by_model": rows("model"),
            "by_day": rows("day"),
            "quota": {"type": "object", "required": ["requests_per_hour", "tokens_per_day"]},
        },
    }
    operation = _get("usage_retrieve", "The caller's usage and quotas", "usage", _json(usage, "Usage"), {})
    operation["parameters"] = [
        {"name": "from", "in": "query", "schema": {"type": "string", "format": "date"}},
        {"name": "to", "in": "query", "schema": {"type": "string", "format": "date"}},
        {"name": "period", "in": "query", "schema": {"enum": ["day", "week", "month"]}},
        {
            "name": "user",
            "in": "query",
            "description": "Another user's name (staff only)",
            "schema": {"type": "string"},
        },
    ]
    operation["responses"].update(_errors(error, ("400", "401", "404", "405")))
    return {"get": operation}


def _model_status_path(error: dict[str, Any]) -> dict[str, Any]:
    status = {
        "type": "object",
        "required": ["provider", "model", "status", "response_time_avg", "error_rate", "last_check"],
        "properties": {
            "provider": {"type": "string"},
            "model": {"type": "string"},
            "status": {"enum": ["online", "degraded", "offline", "maintenance"]},
            "response_time_avg": {"type": "number"},
            "error_rate": {"type": "number"},
            "last_check": {"type": ["string", "null"]},
        },
    }
    operation = _get("models_status_retrieve", "A model's live status", "models", _json(status, "Status"), {})
    operation["parameters"] = [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]
    operation["responses"].update(_errors(error, ("401", "404", "405")))
    return {"get": operation}


def _document_drf_operations(paths: dict[str, Any], error: dict[str, Any]) -> None:
    """The DRF views authenticate with an API key and answer errors in the one JSON shape:
    drf-spectacular knows neither (the key class has no OpenAPI extension)."""
    for path, operations in paths.items():
        for method, operation in operations.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            operation["security"] = SECURITY
            statuses = ["401", "405"]
            has_cursor = any(p.get("name") == "cursor" for p in operation.get("parameters", []))
            if "{" in path or (method == "get" and has_cursor):
                statuses.append("404")  # not the caller's, or an invalid cursor
            if "{" in path:  # the view parses the id itself: any case names it, anything else is refused
                operation["responses"].setdefault("400", _json(error, "Invalid request: the id in the path is no UUID"))
            for status in statuses:
                operation["responses"].setdefault(status, _json(error, _DESCRIPTIONS[status]))
            for parameter in operation.get("parameters", []):
                if parameter.get("name") == "page_size" and parameter.get("in") == "query":
                    # DRF's pagination reads it leniently: anything but a positive integer means the
                    # default page, more than the maximum means the maximum. Say so, rather than
                    # promise a refusal the API does not make.
                    parameter["schema"] = {"type": "string"}
                    parameter["description"] = (
                        "Results per page (a positive integer, at most 100); any other value means the default, 20."
                    )


def add_chat_endpoints(result: dict[str, Any], generator: Any, request: Any, public: bool) -> dict[str, Any]:
    """drf-spectacular POSTPROCESSING_HOOKS entry."""
    components = result.setdefault("components", {}).setdefault("schemas", {})
    result["components"].setdefault("securitySchemes", {}).update(SECURITY_SCHEMES)
    chat_request = _chat_request_schema(components)
    chat_response = _component(components, ChatResponse)
    error = _component(components, ErrorBody)
    paths = result.setdefault("paths", {})
    _document_drf_operations(paths, error)
    sse = _sse_events(chat_response, error)
    paths["/chat"] = _post(
        "chat_create",
        "Chat (JSON; Server-Sent Events when stream is true)",
        chat_request,
        {"description": "The reply", "content": {"application/json": {"schema": chat_response}, **sse}},
        _errors(error, _CHAT_ERRORS),
        CHAT_EXAMPLE,
    )
    paths["/chat/stream"] = _post(
        "chat_stream_create",
        "Chat, streamed as Server-Sent Events: start, token (one per delta), then exactly one of done or error",
        chat_request,
        {"description": "The event stream", "content": copy.deepcopy(sse)},
        _errors(error, _CHAT_ERRORS),
        CHAT_EXAMPLE,
    )
    paths["/chat/batch"] = _post(
        "chat_batch_create",
        "Several chat requests, each admitted and billed on its own",
        _batch_request(chat_request),
        _json(_component(components, BatchResponse), "Results in request order"),
        _errors(error, ("400", "401", "405", "413")),
        {"requests": [CHAT_EXAMPLE, {"message": "And in French?", "model": "claude"}]},
    )
    paths["/usage"] = _usage_path(error)
    paths["/models/{model}/status"] = _model_status_path(error)
    paths.update(_openai_paths(components))
    return result
