"""OpenAPI for the chat endpoints, which are ASGI apps outside DRF: added to drf-spectacular's
document by a postprocessing hook, from the same pydantic models that validate requests."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from chat.schemas import BatchRequest, BatchResponse, ChatRequest, ChatResponse, ErrorBody

_ERRORS = {
    "400": "Invalid request (field named in details), unknown model, context too long, streaming disabled",
    "401": "Missing, wrong or revoked API key",
    "403": "Model not allowed on the caller's plan",
    "404": "Conversation not found (or not the caller's)",
    "413": "Body too large",
    "429": "Hourly request limit or daily token quota reached (Retry-After, X-RateLimit-*)",
    "502": "The provider failed and fallback is off",
    "503": "No provider could serve the request",
    "504": "Upstream timeout or request deadline exceeded",
}


def _component(components: dict[str, Any], model: type[BaseModel]) -> dict[str, str]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in schema.pop("$defs", {}).items():
        components.setdefault(name, definition)
    components[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _operation(summary: str, request: dict[str, str], ok: dict[str, Any], error: dict[str, str]) -> dict[str, Any]:
    responses = {"200": ok}
    for status, description in _ERRORS.items():
        responses[status] = {"description": description, "content": {"application/json": {"schema": error}}}
    return {
        "post": {
            "summary": summary,
            "tags": ["chat"],
            "security": [{"bearerAuth": []}, {"apiKeyHeader": []}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": request}}},
            "responses": responses,
        }
    }


def add_chat_endpoints(result: dict[str, Any], generator: Any, request: Any, public: bool) -> dict[str, Any]:
    """drf-spectacular POSTPROCESSING_HOOKS entry."""
    components = result.setdefault("components", {}).setdefault("schemas", {})
    schemes = result["components"].setdefault("securitySchemes", {})
    schemes["bearerAuth"] = {"type": "http", "scheme": "bearer"}
    schemes["apiKeyHeader"] = {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    chat_request = _component(components, ChatRequest)
    chat_response = _component(components, ChatResponse)
    error = _component(components, ErrorBody)
    sse: dict[str, Any] = {
        "description": "Server-Sent Events: start, token (one per delta), then exactly one of done or error",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
    paths = result.setdefault("paths", {})
    paths["/chat"] = _operation(
        "Chat (JSON; Server-Sent Events when stream is true)",
        chat_request,
        {
            "description": "The reply",
            "content": {"application/json": {"schema": chat_response}, **sse["content"]},
        },
        error,
    )
    paths["/chat/stream"] = _operation("Chat, streamed as Server-Sent Events", chat_request, sse, error)
    paths["/chat/batch"] = _operation(
        "Several chat requests, each admitted and billed on its own",
        _component(components, BatchRequest),
        {
            "description": "Results in request order",
            "content": {"application/json": {"schema": _component(components, BatchResponse)}},
        },
        error,
    )
    return result
