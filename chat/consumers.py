"""WebSocket `/ws/chat`: authenticate, then run chats one after another over the pipeline."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any
from urllib.parse import urlparse

import orjson
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.http.request import validate_host

from accounts.authentication import authenticate_scope
from accounts.principal import Principal
from accounts.selectors import api_key_aauthenticate, principal_for_user, raw_key_from_headers
from chat.events import Done, Failed, ws_message
from chat.pipeline import ChatRun, prepare
from chat.schemas import parse_chat_request
from chatservice.db import db_async
from chatservice.errors import ServiceError
from chatservice.request_ids import request_id_from

logger = logging.getLogger("chat.websocket")

CLOSE_UNAUTHENTICATED = 4401
CLOSE_ORIGIN_REFUSED = 4403
CLOSE_TOO_BIG = 1009


def _headers(scope: dict[str, Any]) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def origin_allowed(scope: dict[str, Any]) -> bool:
    """No Origin (a non-browser client) is allowed; otherwise its host must be in ALLOWED_HOSTS."""
    for name, value in scope.get("headers", []):
        if name == b"origin":
            host = urlparse(value.decode("latin-1")).hostname
            return bool(host) and validate_host(host, settings.ALLOWED_HOSTS)
    return True


class ChatConsumer(AsyncJsonWebsocketConsumer):
    """Messages in: auth, chat, cancel. Out: ready, start, token, done, error (DESIGN.md §6)."""

    principal: Principal | None = None
    # What the socket authenticated with (the API key, or the session user's id), checked again
    # before each chat: a revoked key or a deactivated user stops being served on an open socket
    # within API_KEY_CACHE_SECONDS, as on every other transport.
    credential: str | int | None = None
    running: tuple[str, ChatRun, asyncio.Task[bool]] | None = None
    auth_timer: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        if not origin_allowed(self.scope):
            # Accepted only to say why: the close code is the contract (DESIGN.md §6).
            await self.accept()
            await self.close(code=CLOSE_ORIGIN_REFUSED)
            return
        self.principal = await authenticate_scope(self.scope)
        await self.accept()
        if self.principal is not None:
            self.credential = raw_key_from_headers(_headers(self.scope)) or self.principal.user_id
            await self.send_json({"type": "ready"})
            return
        if raw_key_from_headers(_headers(self.scope)):
            await self.close(code=CLOSE_UNAUTHENTICATED)  # a key was sent and it is wrong
            return
        self.auth_timer = asyncio.create_task(self._auth_deadline())

    async def _auth_deadline(self) -> None:
        await asyncio.sleep(settings.WEBSOCKET_AUTH_TIMEOUT_SECONDS)
        if self.principal is None:
            await self.close(code=CLOSE_UNAUTHENTICATED)

    async def disconnect(self, code: int) -> None:
        if self.auth_timer is not None:
            self.auth_timer.cancel()
        if self.running is not None:
            _, run, task = self.running
            run.cancel("cancelled")
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def websocket_receive(self, message: dict[str, Any]) -> None:
        text = message.get("text") or (message.get("bytes") or b"").decode("utf-8", "replace")
        if len(text.encode("utf-8", "surrogatepass")) > settings.MAX_REQUEST_BYTES:
            await self.close(code=CLOSE_TOO_BIG)
            return
        await super().websocket_receive(message)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any) -> None:
        # The protocol is JSON text frames. A binary frame is answered like any other bad message,
        # and an empty text frame as invalid JSON: Channels' JSON consumer raises on both, which
        # dropped the socket without a close frame and left its running chat going.
        if text_data is None:
            error = ServiceError("invalid_request", "Messages must be JSON text frames, not binary.", status=400)
            await self._error(None, error)
            return
        await self.receive_json(await self.decode_json(text_data), **kwargs)

    @classmethod
    async def decode_json(cls, text_data: str) -> Any:
        try:
            return orjson.loads(text_data)
        except orjson.JSONDecodeError:
            return {"type": "__invalid_json__"}

    @classmethod
    async def encode_json(cls, content: Any) -> str:
        return orjson.dumps(content).decode()

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if not isinstance(content, dict):
            await self._error(None, ServiceError("invalid_request", "Messages must be JSON objects.", status=400))
            return
        kind = content.get("type")
        if kind == "__invalid_json__":
            await self._error(None, ServiceError("invalid_json", "The message is not valid JSON.", status=400))
        elif kind == "auth":
            await self._auth(content)
        elif self.principal is None:
            await self.close(code=CLOSE_UNAUTHENTICATED)
        elif kind == "chat":
            await self._chat(content)
        elif kind == "cancel":
            await self._cancel(content)
        else:
            await self._error(
                content.get("request_id"),
                ServiceError("invalid_request", "type must be one of auth, chat, cancel.", status=400),
            )

    async def _auth(self, content: dict[str, Any]) -> None:
        if self.principal is not None:
            await self.send_json({"type": "ready"})
            return
        api_key = content.get("api_key")
        principal = await api_key_aauthenticate(api_key) if isinstance(api_key, str) else None
        if principal is None:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.principal, self.credential = principal, api_key
        if self.auth_timer is not None:
            self.auth_timer.cancel()
        await self.send_json({"type": "ready"})

    async def _current_principal(self) -> Principal | None:
        """The caller as of now (a key's snapshot is cached, so this costs no query while it is fresh)."""
        if isinstance(self.credential, str):
            return await api_key_aauthenticate(self.credential)
        if isinstance(self.credential, int):
            return await db_async(principal_for_user)(self.credential)
        return None

    async def _chat(self, content: dict[str, Any]) -> None:
        assert self.principal is not None
        principal = await self._current_principal()
        if principal is None:
            await self.close(code=CLOSE_UNAUTHENTICATED)  # the key was revoked or the user deactivated
            return
        self.principal = principal
        client_id = content.get("request_id")
        request_id = request_id_from(client_id if isinstance(client_id, str) else None)
        echo_id = client_id if isinstance(client_id, str) and client_id else str(request_id)
        if self.running is not None:
            await self._error(
                echo_id, ServiceError("chat_in_progress", "Wait for the running chat to end, or cancel it.", status=409)
            )
            return
        body = {k: v for k, v in content.items() if k not in ("type", "request_id")}
        try:
            chat = parse_chat_request(body)
            if not settings.ENABLE_STREAMING:
                raise ServiceError("streaming_disabled", "Streaming is disabled on this service.", status=400)
            prepared = await prepare(principal=self.principal, chat=chat, transport="websocket", request_id=request_id)
        except ServiceError as error:
            await self._error(echo_id, error)
            return
        run = ChatRun(prepared)
        task = asyncio.create_task(self._pump(echo_id, run))
        self.running = (echo_id, run, task)

    async def _pump(self, echo_id: str, run: ChatRun) -> bool:
        """Send the run's events; True when its own terminal event (done or error) went out."""
        ended = False
        try:
            async for event in run.events():
                await self.send_json(ws_message(event, echo_id))
                ended = isinstance(event, Done | Failed)
        finally:
            self.running = None
        await run.wait_settled()
        return ended

    async def _cancel(self, content: dict[str, Any]) -> None:
        wanted = content.get("request_id")
        if self.running is None or (wanted is not None and wanted != self.running[0]):
            await self._error(wanted, _no_running_chat())
            return
        echo_id, run, task = self.running
        run.cancel("cancelled")
        ended = False
        with contextlib.suppress(asyncio.CancelledError):
            ended = await task
        await run.wait_settled()
        if ended:
            # The chat finished before the cancel reached it: its done (or error) went out and is
            # its one terminal event; the cancel is answered as one for a chat no longer running.
            await self._error(echo_id, _no_running_chat())
            return
        await self._error(echo_id, ServiceError("cancelled", "The chat was cancelled.", status=499))

    async def _error(self, request_id: Any, error: ServiceError) -> None:
        await self.send_json(
            ws_message(Failed(error), request_id if isinstance(request_id, str) else str(uuid.uuid4()))
        )


def _no_running_chat() -> ServiceError:
    """The answer to a cancel that finds no chat of that id running (never started, or ended)."""
    return ServiceError("not_found", "No running chat with that request_id.", status=404)
