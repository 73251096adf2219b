"""The one ChatRequest schema every transport validates against, and its error translation."""

from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from chatservice.errors import ServiceError

MAX_TEMPERATURE = 2.0
# C0 and C1 control characters other than tab, newline and carriage return. Postgres cannot
# store NUL at all; the others only hide text. They are removed, the rest is kept as sent.
_CONTROL = dict.fromkeys([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F, *range(0x80, 0xA0)])


def sanitize(text: str) -> str:
    """`text` without control characters (tab, newline and carriage return stay)."""
    return text.translate(_CONTROL)


class ChatRequest(BaseModel):
    """A chat turn: the user's message plus options. Unknown fields and wrong types are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    message: str = Field(description="The user's message (non-empty).")
    model: str | None = Field(default=None, description="A model id, or a provider name for its default.")
    temperature: float | None = Field(default=None, ge=0.0, le=MAX_TEMPERATURE)
    max_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    conversation_id: uuid.UUID | None = None
    system_prompt: str | None = None

    @field_validator("message")
    @classmethod
    def _message_not_blank(cls, value: str) -> str:
        value = sanitize(value)
        if not value.strip():
            raise ValueError("must not be empty")
        if len(value) > settings.MAX_MESSAGE_CHARS:
            raise ValueError(f"must be at most {settings.MAX_MESSAGE_CHARS} characters")
        return value

    @field_validator("system_prompt")
    @classmethod
    def _clean_system_prompt(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = sanitize(value)
        if len(value) > settings.MAX_MESSAGE_CHARS:
            raise ValueError(f"must be at most {settings.MAX_MESSAGE_CHARS} characters")
        return value

    @field_validator("model")
    @classmethod
    def _model_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value


def validation_error(exc: ValidationError) -> ServiceError:
    """400 with each offending field named; `invalid_json` when the body is not JSON at all."""
    errors = exc.errors(include_url=False, include_input=False)
    if any(e["type"] == "json_invalid" for e in errors):
        return ServiceError("invalid_json", "The request body is not valid JSON.", status=400)
    if any(e["type"] == "model_type" and not e["loc"] for e in errors):
        return ServiceError("invalid_request", "The request body must be a JSON object.", status=400)
    fields: dict[str, str] = {}
    for error in errors:
        name = ".".join(str(part) for part in error["loc"]) or "body"
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        elif error["type"] == "missing":
            message = "is required"
        fields[name] = message
    summary = "; ".join(f"{name}: {message}" for name, message in fields.items())
    return ServiceError("invalid_request", f"Invalid request: {summary}", status=400, details={"fields": fields})


def parse_chat_request(body: bytes | str | dict[str, Any]) -> ChatRequest:
    """Validate a raw JSON body (or an already-decoded object, as WebSocket and batch items are)."""
    try:
        if isinstance(body, dict):
            return _validate_object(body)
        return ChatRequest.model_validate_json(body)
    except ValidationError as exc:
        raise validation_error(exc) from None


def parse_conversation_id(value: str) -> uuid.UUID:
    """A conversation id as a client sends it (in any case); 400 naming the field when it is no UUID."""
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ServiceError(
            "invalid_request",
            "Invalid request: conversation_id: must be a UUID",
            status=400,
            details={"fields": {"conversation_id": "must be a UUID"}},
        ) from None


def _validate_object(data: dict[str, Any]) -> ChatRequest:
    # Objects decoded from JSON: the same strictness as the JSON path, with UUIDs as strings.
    conversation = data.get("conversation_id")
    if isinstance(conversation, str):
        data = {**data, "conversation_id": parse_conversation_id(conversation)}
    return ChatRequest.model_validate(data)


class ChatResponse(BaseModel):
    """The answer to a chat request (DESIGN.md §6)."""

    message: str
    model_used: str
    tokens_used: int
    cost_estimate: float = Field(description="USD")
    conversation_id: uuid.UUID
    timestamp: str
    processing_time: float = Field(description="seconds")
    request_id: uuid.UUID
    provider: str
    input_tokens: int
    output_tokens: int
    fallback_path: list[str]
    routing_reason: str


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: dict[str, Any]


class ErrorBody(BaseModel):
    error: ErrorDetail


class BatchRequest(BaseModel):
    requests: list[ChatRequest]


class BatchItem(BaseModel):
    index: int
    status: int
    response: ChatResponse | None
    error: ErrorDetail | None


class BatchResponse(BaseModel):
    results: list[BatchItem]
