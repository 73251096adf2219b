"""Small test clients for the streaming transports: SSE over httpx, WebSocket over websockets."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx
import websockets


@dataclass
class Received:
    status: int
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    def names(self) -> list[str]:
        return [name for name, _ in self.events]

    def shape(self) -> list[str]:
        """The event names with each run of token events as one "token+" (how many tokens a
        token event carries depends on how the upstream's chunks arrived); each has text."""
        shape: list[str] = []
        for name, data in self.events:
            if name == "token":
                assert data["delta"], self.events
                if shape and shape[-1] == "token+":
                    continue
                name = "token+"
            shape.append(name)
        return shape

    def text(self) -> str:
        return "".join(data["delta"] for name, data in self.events if name == "token")

    def last(self) -> dict[str, Any]:
        return self.events[-1][1]


def sse_chat(url: str, key: str, body: dict[str, Any], *, stop_after_tokens: int | None = None) -> Received:
    """POST to /chat/stream and collect events; optionally hang up after N token events."""
    headers = {"Authorization": f"Bearer {key}"}
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", f"{url}/chat/stream", json=body, headers=headers) as r,
    ):
        received = Received(r.status_code, headers=dict(r.headers))
        if r.status_code != 200:
            r.read()
            received.events.append(("http_error", r.json()))
            return received
        name = None
        tokens = 0
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: ") and name:
                received.events.append((name, json.loads(line[6:])))
                if name == "token":
                    tokens += 1
                    if stop_after_tokens is not None and tokens >= stop_after_tokens:
                        return received  # leaving the block closes the connection
    return received


async def ws_chat(
    url: str,
    key: str,
    body: dict[str, Any],
    *,
    cancel_after_tokens: int | None = None,
    hang_up_after_tokens: int | None = None,
) -> Received:
    """One chat over /ws/chat; optionally cancel (or drop the socket) after N token events."""
    ws_url = url.replace("http://", "ws://") + "/ws/chat"
    received = Received(101)
    async with websockets.connect(ws_url, additional_headers={"Authorization": f"Bearer {key}"}) as ws:
        ready = json.loads(await ws.recv())
        assert ready == {"type": "ready"}
        await ws.send(json.dumps({"type": "chat", "request_id": "client-1", **body}))
        tokens = 0
        while True:
            message = json.loads(await ws.recv())
            received.events.append((message["type"], message))
            if message["type"] == "token":
                tokens += 1
                if cancel_after_tokens is not None and tokens == cancel_after_tokens:
                    await ws.send(json.dumps({"type": "cancel", "request_id": "client-1"}))
                if hang_up_after_tokens is not None and tokens >= hang_up_after_tokens:
                    return received
            if message["type"] in ("done", "error"):
                return received
