"""The isolation matrix, generated from the URL configuration: every route the service serves, for
an anonymous caller, another user, the owner and staff. A route the matrix does not know fails."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import websockets
from django.test import Client

from chat.models import Conversation
from chatservice import routing, urls

pytestmark = pytest.mark.django_db(transaction=True)

ACTORS = ("anonymous", "other", "owner", "staff")


def served_routes() -> list[str]:
    """Every route pattern: Django's URLconf, the ASGI HTTP routes and the WebSocket routes."""
    routes = [str(p.pattern) for p in urls.urlpatterns]
    routes += [str(p.pattern) for p in routing.http_routes()]
    inner = routing.websocket_application()
    while not hasattr(inner, "routes"):  # AuthMiddlewareStack: cookie, session, auth, then the router
        inner = inner.inner
    routes += [f"ws:{p.pattern}" for p in inner.routes]
    return routes


@dataclass
class World:
    url: str
    keys: dict[str, str | None]  # actor -> API key (None: anonymous)
    users: dict[str, Any]
    conversation: str  # the owner's

    def call(self, actor: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        key = self.keys[actor]
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=30, follow_redirects=False, **kwargs)

    def statuses(self, method: str, path: str, **kwargs: Any) -> dict[str, int]:
        return {actor: self.call(actor, method, path, **kwargs).status_code for actor in ACTORS}


@pytest.fixture
def world(service_url: str, make_user: Any, settings: Any) -> World:
    settings.METRICS_BEARER_TOKEN = ""
    users, keys = {}, {}
    for actor, extra in (("other", {}), ("owner", {}), ("staff", {"is_staff": True})):
        users[actor], keys[actor] = make_user("enterprise", username=f"iso-{actor}", **extra)
    keys["anonymous"] = None
    world = World(service_url, keys, users, conversation="")
    reply = world.call("owner", "POST", "/chat", json={"message": "mine [[tokens:2]]", "model": "openai"})
    assert reply.status_code == 200, reply.text
    world.conversation = reply.json()["conversation_id"]
    return world


def signed_in_everyone(expected: dict[str, int]) -> dict[str, int]:
    return {"anonymous": 401, **expected}


ALL_200 = {actor: 200 for actor in ACTORS}
KEYED_200 = signed_in_everyone({"other": 200, "owner": 200, "staff": 200})


def public(path: str) -> Callable[[World], None]:
    def check(world: World) -> None:
        assert world.statuses("GET", path) == ALL_200

    return check


def keyed_get(path: str) -> Callable[[World], None]:
    def check(world: World) -> None:
        assert world.statuses("GET", path) == KEYED_200
        body = world.call("anonymous", "GET", path).json()
        assert body["error"]["code"] == "unauthenticated"

    return check


def check_admin(world: World) -> None:
    anonymous = world.call("anonymous", "GET", "/admin/")
    assert anonymous.status_code == 302 and anonymous.headers["location"].startswith("/admin/login/")
    # An API key, even staff's, is not an admin session.
    assert world.call("staff", "GET", "/admin/").status_code == 302
    pages = ("/admin/", "/admin/chat/conversation/", f"/admin/chat/conversation/{world.conversation}/change/")
    for actor in ("other", "owner"):
        client = Client()
        client.force_login(world.users[actor])
        for page in pages:
            response = client.get(page)
            assert response.status_code == 302 and response["Location"].startswith("/admin/login/"), page
    staff = world.users["staff"]
    client = Client()
    client.force_login(staff)
    # Staff reach the admin; each model's pages then need that model's permission.
    assert [client.get(page).status_code for page in pages] == [200, 403, 403]
    staff.is_superuser = True
    staff.save()
    assert [client.get(page).status_code for page in pages] == [200, 200, 200]


def check_metrics(world: World) -> None:
    assert world.statuses("GET", "/metrics") == ALL_200  # no token configured: public, like /health
    # Closed by METRICS_BEARER_TOKEN: see test_metrics_token_closes_the_door.


def check_history(world: World) -> None:
    assert world.statuses("GET", "/history") == KEYED_200
    for actor in ("other", "staff"):
        ids = [c["id"] for c in world.call(actor, "GET", "/history").json()["results"]]
        assert world.conversation not in ids
    assert [c["id"] for c in world.call("owner", "GET", "/history").json()["results"]] == [world.conversation]


def check_conversation(world: World) -> None:
    path = f"/history/{world.conversation}"
    assert world.statuses("GET", path) == signed_in_everyone({"other": 404, "owner": 200, "staff": 404})
    for actor in ("anonymous", "other", "staff"):
        assert world.call(actor, "DELETE", path).status_code == (401 if actor == "anonymous" else 404)
    assert Conversation.objects.filter(id=world.conversation).exists()
    assert world.call("owner", "DELETE", path).status_code == 204
    assert not Conversation.objects.filter(id=world.conversation).exists()


def check_usage(world: World) -> None:
    assert world.statuses("GET", "/usage") == KEYED_200
    owner = world.call("owner", "GET", "/usage").json()
    assert owner["requests"] == 1
    assert world.call("other", "GET", "/usage?user=iso-owner").status_code == 404
    assert world.call("other", "GET", "/usage?user=nobody-at-all").status_code == 404  # same answer: no probing
    assert world.call("owner", "GET", "/usage?user=iso-owner").json()["requests"] == 1
    as_staff = world.call("staff", "GET", "/usage?user=iso-owner")
    assert as_staff.status_code == 200 and as_staff.json()["requests"] == owner["requests"]
    assert world.call("staff", "GET", "/usage").json()["requests"] == 0  # staff's own, by default


def chat_post(path: str) -> Callable[[World], None]:
    def check(world: World) -> None:
        fresh = {"message": "hello [[tokens:1]]", "model": "openai"}
        assert world.statuses("POST", path, json=fresh) == KEYED_200
        theirs = {**fresh, "conversation_id": world.conversation}
        expected = signed_in_everyone({"other": 404, "owner": 200, "staff": 404})
        assert world.statuses("POST", path, json=theirs) == expected

    return check


def check_batch(world: World) -> None:
    batch = {"requests": [{"message": "hi [[tokens:1]]", "model": "openai"}]}
    assert world.statuses("POST", "/chat/batch", json=batch) == KEYED_200
    theirs = {"requests": [{"message": "hi [[tokens:1]]", "conversation_id": world.conversation}]}
    for actor, status in (("other", 404), ("staff", 404), ("owner", 200)):
        item = world.call(actor, "POST", "/chat/batch", json=theirs).json()["results"][0]
        assert item["status"] == status, (actor, item)


def check_completions(world: World) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi [[tokens:1]]"}]}
    assert world.statuses("POST", "/v1/chat/completions", json=body) == KEYED_200
    assert world.call("anonymous", "POST", "/v1/chat/completions", json=body).json()["error"]["type"] == (
        "authentication_error"
    )


def check_sandbox(world: World) -> None:
    # The fake upstream, mounted only for providers without a key: no data of anyone's, and it
    # answers as the real provider would (its own 401 without a provider key).
    assert world.statuses("GET", "/sandbox/openai/v1/models") == {
        "anonymous": 401,
        "other": 200,  # a service key is just "some key" to the fake provider
        "owner": 200,
        "staff": 200,
    }


async def _websocket(world: World, actor: str, body: dict[str, Any]) -> tuple[str, Any]:
    """('closed', code) or the first answer's ('error', code) / ('done', conversation_id)."""
    key = world.keys[actor]
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    ws_url = world.url.replace("http://", "ws://") + "/ws/chat"
    async with websockets.connect(ws_url, additional_headers=headers, open_timeout=10) as ws:
        try:
            if key:
                assert json.loads(await ws.recv()) == {"type": "ready"}
            await ws.send(json.dumps({"type": "chat", **body}))
            for _ in range(20):
                message = json.loads(await asyncio.wait_for(ws.recv(), timeout=30))
                if message["type"] == "error":
                    return "error", message["error"]["code"]
                if message["type"] == "done":
                    return "done", message["conversation_id"]
        except websockets.ConnectionClosed as closed:
            return "closed", closed.rcvd.code if closed.rcvd else None
    raise AssertionError("no answer in 20 messages")


def check_websocket(world: World) -> None:
    theirs = {"message": "hi [[tokens:1]]", "model": "openai", "conversation_id": world.conversation}
    outcomes = {actor: asyncio.run(_websocket(world, actor, theirs)) for actor in ACTORS}
    assert outcomes == {
        "anonymous": ("closed", 4401),
        "other": ("error", "not_found"),
        "owner": ("done", world.conversation),
        "staff": ("error", "not_found"),
    }
    world.keys["anonymous"] = "not-a-real-key"
    assert asyncio.run(_websocket(world, "anonymous", theirs)) == ("closed", 4401)


MATRIX: dict[str, Callable[[World], None]] = {
    "admin/": check_admin,
    "health": public("/health"),
    "metrics": check_metrics,
    "models": keyed_get("/models"),
    "models/<path:model>/status": keyed_get("/models/gpt-4o-mini/status"),
    "usage": check_usage,
    "history": check_history,
    "history/<str:conversation_id>": check_conversation,
    "schema/": public("/schema/"),
    "docs/": public("/docs/"),
    "chat": chat_post("/chat"),
    "chat/stream": chat_post("/chat/stream"),
    "chat/batch": check_batch,
    "v1/chat/completions": check_completions,
    "v1/models": keyed_get("/v1/models"),
    "v1/models/<path:model>": keyed_get("/v1/models/deepseek-chat"),
    "^sandbox/": check_sandbox,
    "ws:ws/chat": check_websocket,
}


@pytest.mark.parametrize("route", served_routes())
def test_route_isolation(route: str, world: World) -> None:
    check = MATRIX.get(route)
    if check is None:
        pytest.fail(f"{route!r} is served but the isolation matrix does not know how to exercise it")
    check(world)


def test_matrix_has_no_stale_routes() -> None:
    assert set(MATRIX) - set(served_routes()) <= {"^sandbox/"}  # mounted only while a provider has no key


def test_metrics_token_closes_the_door(world: World, settings: Any) -> None:
    settings.METRICS_BEARER_TOKEN = "metrics-secret-for-the-matrix"
    assert world.statuses("GET", "/metrics") == {actor: 401 for actor in ACTORS}  # API keys do not open it
    denied = httpx.get(f"{world.url}/metrics", headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "unauthenticated"
    allowed = httpx.get(
        f"{world.url}/metrics", headers={"Authorization": "Bearer metrics-secret-for-the-matrix"}, timeout=30
    )
    assert allowed.status_code == 200 and "# TYPE" in allowed.text
