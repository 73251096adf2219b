"""What the pipeline tells a transport, and how SSE and WebSocket put it on the wire."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from chatservice.errors import ServiceError


@dataclass(frozen=True, slots=True)
class Started:
    request_id: str
    conversation_id: str
    model: str
    provider: str

    def payload(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "conversation_id": self.conversation_id,
            "model": self.model,
            "provider": self.provider,
        }


@dataclass(frozen=True, slots=True)
class Token:
    delta: str

    def payload(self) -> dict[str, Any]:
        return {"delta": self.delta}


@dataclass(frozen=True, slots=True)
class Done:
    response: dict[str, Any]

    def payload(self) -> dict[str, Any]:
        return self.response


@dataclass(frozen=True, slots=True)
class Failed:
    error: ServiceError

    def payload(self) -> dict[str, Any]:
        return {"error": self.error.as_dict()}


ChatEvent = Started | Token | Done | Failed

_SSE_NAMES: dict[type, bytes] = {Started: b"start", Token: b"token", Done: b"done", Failed: b"error"}
_WS_NAMES: dict[type, str] = {Started: "start", Token: "token", Done: "done", Failed: "error"}


def sse_frame(event: ChatEvent) -> bytes:
    """`event: NAME` and one `data:` line of JSON (orjson never emits raw newlines)."""
    return b"event: " + _SSE_NAMES[type(event)] + b"\ndata: " + orjson.dumps(event.payload()) + b"\n\n"


def ws_message(event: ChatEvent, request_id: str) -> dict[str, Any]:
    """The WebSocket message for an event: the SSE payload plus `type` and the client's `request_id`.

    The client's id is echoed on every message. When it is not a UUID the ledger keys the
    request by its own id, which then travels as `server_request_id`.
    """
    message = {"type": _WS_NAMES[type(event)], **event.payload()}
    server_id = message.get("request_id")
    if server_id is not None and server_id != request_id:
        message["server_request_id"] = server_id
    message["request_id"] = request_id
    return message
