"""`/ws/chat` as a client drives it over a real socket: a connection that stays open, frames that
are not JSON text, and a cancel that arrives as the chat ends (one terminal event per chat)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import websockets

from usage.models import UsageRecord

pytestmark = pytest.mark.django_db(transaction=True)


def ws_url(service_url: str) -> str:
    return service_url.replace("http://", "ws://") + "/ws/chat"


async def until_terminal(ws: Any, request_id: str) -> list[dict[str, Any]]:
    """The messages for `request_id` up to its done or error."""
    received = []
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if message.get("request_id") == request_id:
            received.append(message)
            if message["type"] in ("done", "error"):
                return received


def test_an_idle_socket_stays_open(service_url, sandbox, make_user) -> None:
    """The consumer waits on the Redis channel layer 5 s at a time; the layer's connection must not
    time that wait out (redis-py's default socket_timeout, also 5 s, did and killed the socket)."""
    _, key = make_user("premium")

    async def scenario() -> list[str]:
        async with websockets.connect(ws_url(service_url), additional_headers={"Authorization": f"Bearer {key}"}) as ws:
            assert json.loads(await ws.recv()) == {"type": "ready"}
            with pytest.raises(TimeoutError):  # nothing to say for a while: the socket stays open
                await asyncio.wait_for(ws.recv(), 7)
            await ws.send(json.dumps({"type": "chat", "request_id": "late", "message": "hi [[tokens:2]]"}))
            return [m["type"] for m in await until_terminal(ws, "late")]

    assert asyncio.run(scenario())[-1] == "done"
    assert UsageRecord.objects.count() == 1


@pytest.mark.parametrize(
    "frame", [b'{"type": "chat", "message": "hi"}', b"", ""], ids=["binary", "empty-binary", "empty"]
)
def test_a_frame_that_is_not_json_text_is_an_error_and_the_socket_goes_on(
    service_url, sandbox, make_user, frame
) -> None:
    _, key = make_user("premium")

    async def scenario() -> tuple[dict[str, Any], list[str]]:
        async with websockets.connect(ws_url(service_url), additional_headers={"Authorization": f"Bearer {key}"}) as ws:
            assert json.loads(await ws.recv()) == {"type": "ready"}
            await ws.send(frame)
            refused = json.loads(await asyncio.wait_for(ws.recv(), 5))
            await ws.send(json.dumps({"type": "chat", "request_id": "next", "message": "hi [[tokens:2]]"}))
            return refused, [m["type"] for m in await until_terminal(ws, "next")]

    refused, after = asyncio.run(scenario())
    assert refused["type"] == "error"
    assert refused["error"]["code"] == ("invalid_json" if frame == "" else "invalid_request")
    assert after[-1] == "done"
    assert UsageRecord.objects.count() == 1  # the refused frame started nothing


def test_a_cancel_as_the_chat_ends_never_adds_a_second_terminal_event(service_url, sandbox, make_user) -> None:
    """Cancel right after the last token: the chat ends either cancelled or done, never both
    (a done is followed by the cancel's own answer, `not_found`: no chat is running any more)."""
    _, key = make_user("premium")

    async def scenario() -> list[list[tuple[str, str | None]]]:
        outcomes = []
        async with websockets.connect(ws_url(service_url), additional_headers={"Authorization": f"Bearer {key}"}) as ws:
            assert json.loads(await ws.recv()) == {"type": "ready"}
            for i in range(5):
                rid = f"r{i}"
                body = {
                    "type": "chat",
                    "request_id": rid,
                    "message": f"n{i} [[tokens:3]] [[slow:30]]",
                    "model": "openai",
                }
                await ws.send(json.dumps(body))
                tokens = 0
                while True:
                    message = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    assert message["request_id"] == rid
                    if message["type"] == "token":
                        tokens += 1
                        if tokens == 3:
                            await ws.send(json.dumps({"type": "cancel", "request_id": rid}))
                    if message["type"] in ("done", "error"):
                        break
                events = [(message["type"], message.get("error", {}).get("code"))]
                if message["type"] == "done":  # the cancel is still answered: read that answer too
                    answer = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    assert answer["request_id"] == rid
                    events.append((answer["type"], answer.get("error", {}).get("code")))
                outcomes.append(events)
        return outcomes

    for events in asyncio.run(scenario()):
        assert events in ([("error", "cancelled")], [("done", None), ("error", "not_found")]), events


@pytest.mark.parametrize("how", ["revoked", "deactivated"])
@pytest.mark.parametrize("auth", ["header", "message"])
def test_an_open_socket_stops_serving_a_revoked_key_once_its_snapshot_expires(
    service_url, sandbox, make_user, how, auth
) -> None:
    """A revoked key (or a deactivated user) stops working within API_KEY_CACHE_SECONDS on every
    transport: a socket authenticated before the revocation gets no chat after that, it is closed 4401."""
    from accounts.models import ApiKey
    from accounts.selectors import key_cache
    from accounts.services import api_key_revoke

    user, key = make_user("premium")
    headers = {"Authorization": f"Bearer {key}"} if auth == "header" else {}

    async def scenario() -> tuple[list[str], int | None]:
        async with websockets.connect(ws_url(service_url), additional_headers=headers) as ws:
            if auth == "message":
                await ws.send(json.dumps({"type": "auth", "api_key": key}))
            assert json.loads(await ws.recv()) == {"type": "ready"}
            await ws.send(json.dumps({"type": "chat", "request_id": "before", "message": "hi [[tokens:2]]"}))
            before = [m["type"] for m in await until_terminal(ws, "before")]

            if how == "revoked":
                await asyncio.to_thread(lambda: api_key_revoke(api_key=ApiKey.objects.get(user=user)))
            else:
                await asyncio.to_thread(lambda: type(user).objects.filter(pk=user.pk).update(is_active=False))
            key_cache.clear()  # what API_KEY_CACHE_SECONDS' expiry does

            await ws.send(json.dumps({"type": "chat", "request_id": "after", "message": "hi [[tokens:2]]"}))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    message = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    assert message.get("type") != "done", message
            return before, closed.value.rcvd.code if closed.value.rcvd else None

    before, code = asyncio.run(scenario())
    assert before[-1] == "done" and code == 4401
    assert UsageRecord.objects.count() == 1  # nothing was served after the revocation
