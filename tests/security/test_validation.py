"""Input limits and validation at the door: sizes (413, WebSocket 1009), types, unknown fields,
per-provider ranges, max output and the context window — all refused in the one JSON error shape."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import websockets
from django.conf import settings

from chat.models import Conversation
from providers.catalog import catalog_entries, resolve_model
from usage.models import UsageRecord

pytestmark = pytest.mark.django_db(transaction=True)

CHAT_ENDPOINTS = ["/chat", "/chat/stream", "/chat/batch", "/v1/chat/completions"]


@pytest.fixture
def key(make_user: Any) -> str:
    return make_user("enterprise", username="validator", tokens_per_day_override=10**10)[1]


def post(url: str, key: str, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) or not isinstance(body, dict) else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    return httpx.post(f"{url}{path}", content=content, headers=headers, timeout=30, **kwargs)


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    if "details" in error:  # /v1 speaks OpenAI's error body, which has none
        assert isinstance(error["details"], dict)
    return dict(error)


def nothing_written() -> bool:
    return not UsageRecord.objects.exists() and not Conversation.objects.exists()


# --- sizes ---------------------------------------------------------------------------------


def _oversized_body() -> bytes:
    return json.dumps({"message": "a" * (settings.MAX_REQUEST_BYTES + 10)}).encode()


@pytest.mark.parametrize("path", CHAT_ENDPOINTS)
def test_body_over_the_limit_is_413(service_url: str, key: str, path: str) -> None:
    response = post(service_url, key, path, _oversized_body())
    error = assert_error(response, 413, "request_too_large")
    if path != "/v1/chat/completions":
        assert error["details"] == {"limit": settings.MAX_REQUEST_BYTES}
    assert nothing_written()


@pytest.mark.parametrize("path", CHAT_ENDPOINTS)
def test_chunked_body_over_the_limit_is_413(service_url: str, key: str, path: str) -> None:
    """No Content-Length to trust: the limit holds while the body is read."""
    body = _oversized_body()

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    with httpx.Client(timeout=30) as client:
        request = client.build_request("POST", f"{service_url}{path}", content=chunks(), headers=headers)
        assert "content-length" not in request.headers
        assert request.headers["transfer-encoding"] == "chunked"
        response = client.send(request)
    assert_error(response, 413, "request_too_large")
    assert nothing_written()


def test_body_at_the_limit_is_read(service_url: str, key: str) -> None:
    """Exactly MAX_REQUEST_BYTES is allowed: the refusal that follows is about the message, not the size."""
    padding = settings.MAX_REQUEST_BYTES - len(json.dumps({"message": ""}).encode())
    body = json.dumps({"message": "a" * padding}).encode()
    assert len(body) == settings.MAX_REQUEST_BYTES
    error = assert_error(post(service_url, key, "/chat", body), 400, "invalid_request")
    assert "message" in error["details"]["fields"]


async def test_websocket_frame_over_the_limit_closes_1009(service_url: str, key: str) -> None:
    url = service_url.replace("http://", "ws://") + "/ws/chat"
    async with websockets.connect(
        url, additional_headers={"Authorization": f"Bearer {key}"}, max_size=None, open_timeout=10
    ) as ws:
        assert json.loads(await ws.recv()) == {"type": "ready"}
        await ws.send(json.dumps({"type": "chat", "message": "a" * (settings.MAX_REQUEST_BYTES + 1)}))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


async def test_websocket_hostile_frames_get_error_messages(service_url: str, key: str) -> None:
    """Invalid JSON, a lone surrogate, NUL and wrong types: an `error` message each, the socket stays open."""
    url = service_url.replace("http://", "ws://") + "/ws/chat"
    frames = [
        "{not json",
        '{"type": "chat", "message": "\\ud800"}',
        '{"type": "chat", "message": "\\u0000\\u0001"}',
        '{"type": "chat", "message": 42}',
        '{"type": "chat", "message": "hi", "surprise": true}',
        "[1, 2, 3]",
    ]
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {key}"}) as ws:
        assert json.loads(await ws.recv()) == {"type": "ready"}
        for frame in frames:
            await ws.send(frame)
            message = json.loads(await ws.recv())
            assert message["type"] == "error", (frame, message)
            assert message["error"]["code"] in ("invalid_json", "invalid_request"), (frame, message)
        await ws.send(json.dumps({"type": "chat", "message": "still here? [[tokens:2]]", "model": "openai"}))
        kinds = []
        for _ in range(10):
            kinds.append(json.loads(await ws.recv())["type"])
            if kinds[-1] in ("done", "error"):
                break
        assert kinds[0] == "start" and kinds[-1] == "done"


# --- types and fields ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"message": 42}, "message"),
        ({"message": ["hi"]}, "message"),
        ({"message": None}, "message"),
        ({}, "message"),
        ({"message": "hi", "temperature": "warm"}, "temperature"),
        ({"message": "hi", "max_tokens": 10.5}, "max_tokens"),
        ({"message": "hi", "max_tokens": "10"}, "max_tokens"),
        ({"message": "hi", "max_tokens": 0}, "max_tokens"),
        ({"message": "hi", "stream": "yes"}, "stream"),
        ({"message": "hi", "stream": 1}, "stream"),
        ({"message": "hi", "conversation_id": "not-a-uuid"}, "conversation_id"),
        ({"message": "hi", "conversation_id": 7}, "conversation_id"),
        ({"message": "hi", "model": 5}, "model"),
        ({"message": "hi", "model": "   "}, "model"),
        ({"message": "hi", "system_prompt": {"role": "system"}}, "system_prompt"),
        ({"message": " \t\n\x00\x01 "}, "message"),
    ],
)
def test_wrong_types_name_the_field(service_url: str, key: str, body: dict[str, Any], field: str) -> None:
    error = assert_error(post(service_url, key, "/chat", body), 400, "invalid_request")
    assert field in error["details"]["fields"], error
    assert field in error["message"]
    assert nothing_written()


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"", "invalid_json"),
        (b"{", "invalid_json"),
        (b"\xff\xfe{}", "invalid_json"),
        (b"[]", "invalid_request"),
        (b'"hi"', "invalid_request"),
        (b"null", "invalid_request"),
    ],
)
def test_not_an_object_is_refused(service_url: str, key: str, body: bytes, code: str) -> None:
    assert_error(post(service_url, key, "/chat", body), 400, code)
    assert nothing_written()


def test_unknown_fields_are_refused(service_url: str, key: str) -> None:
    error = assert_error(
        post(service_url, key, "/chat", {"message": "hi", "user_id": 1, "Temperature": 0.2}), 400, "invalid_request"
    )
    assert error["details"]["fields"] == {"user_id": "unknown field", "Temperature": "unknown field"}
    assert nothing_written()


def test_unknown_fields_are_refused_in_batch_items_and_v1(service_url: str, key: str) -> None:
    batch = post(service_url, key, "/chat/batch", {"requests": [{"message": "hi", "extra": 1}]})
    assert batch.status_code == 200
    item = batch.json()["results"][0]
    assert item["status"] == 400 and item["error"]["details"]["fields"] == {"extra": "unknown field"}
    assert_error(post(service_url, key, "/chat/batch", {"requests": [], "more": 1}), 400, "invalid_request")
    v1 = post(
        service_url,
        key,
        "/v1/chat/completions",
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {}},
    )
    error = assert_error(v1, 400, "invalid_request")
    assert error["param"] == "logit_bias"
    assert nothing_written()


# --- per-model limits ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "temperature", "ok"),
    [
        ("claude", 1.0, True),
        ("claude", 1.01, False),
        ("claude", 2.0, False),
        ("claude-haiku-4-5", 1.5, False),
        ("openai", 2.0, True),
        ("openai", 2.01, False),
        ("deepseek", 2.5, False),
        ("gemini", 2.0, True),
        ("gemini", -0.1, False),
        ("openai", 0.0, True),
    ],
)
def test_temperature_range_per_provider(service_url: str, key: str, model: str, temperature: float, ok: bool) -> None:
    response = post(
        service_url, key, "/chat", {"message": "hi [[tokens:1]]", "model": model, "temperature": temperature}
    )
    if ok:
        assert response.status_code == 200, response.text
        return
    error = assert_error(response, 400, "invalid_request")
    assert "temperature" in error["details"]["fields"]
    assert nothing_written()


@pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-haiku-4-5", "deepseek-chat", "gemini-2.5-flash", "gpt-4"])
def test_max_tokens_over_the_models_max_output(service_url: str, key: str, model: str) -> None:
    limit = resolve_model(catalog_entries(), model).max_output_tokens
    response = post(service_url, key, "/chat", {"message": "hi", "model": model, "max_tokens": limit + 1})
    error = assert_error(response, 400, "invalid_request")
    assert error["details"]["fields"] == {"max_tokens": f"must be at most {limit}"}
    assert nothing_written()


def test_prompt_over_the_context_window(service_url: str, key: str) -> None:
    entry = resolve_model(catalog_entries(), "gpt-4")
    assert entry.context_window == 8192
    message = "hello " * 9000  # ~9000 tokens in cl100k_base
    response = post(service_url, key, "/chat", {"message": message, "model": "gpt-4", "max_tokens": 100})
    error = assert_error(response, 400, "context_length_exceeded")
    details = error["details"]
    assert details["context_window"] == 8192 and details["max_tokens"] == 100 and details["model"] == "gpt-4"
    assert details["prompt_tokens"] > 8192 - 100
    assert str(details["prompt_tokens"]) in error["message"] and "8192" in error["message"]
    assert nothing_written()


def test_auto_selection_picks_a_window_that_holds_the_message(service_url: str, key: str) -> None:
    """~177k tokens of CJK text: over the default gpt-4o-mini's 128k window, within Claude's 200k."""
    message = "".join(chr(0x4E00 + (i * 7) % 2000) for i in range(99_980)) + " [[tokens:1]]"
    response = post(service_url, key, "/chat", {"message": message})
    assert response.status_code == 200, response.text[:500]
    assert response.json()["model_used"] == "claude-haiku-4-5"


def test_prompt_that_fits_only_without_max_tokens(service_url: str, key: str) -> None:
    """The window holds prompt + max_tokens: a 4000-token prompt with max_tokens 5000 does not fit gpt-4."""
    response = post(service_url, key, "/chat", {"message": "hello " * 4000, "model": "gpt-4", "max_tokens": 5000})
    error = assert_error(response, 400, "context_length_exceeded")
    assert error["details"]["prompt_tokens"] + 5000 > 8192
    assert nothing_written()


def test_v1_context_window_in_openai_shape(service_url: str, key: str) -> None:
    body = {"model": "gpt-4", "messages": [{"role": "user", "content": "hello " * 9000}]}
    error = assert_error(post(service_url, key, "/v1/chat/completions", body), 400, "context_length_exceeded")
    assert error["type"] == "invalid_request_error"
    assert nothing_written()


# --- every refusal is JSON, wherever it comes from ------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/history/not/a-uuid", 404),  # no route matches: Django's own 404
        ("GET", "/no/such/route", 404),
        ("POST", "/health", 405),  # function views: the CSRF middleware must not answer first
        ("POST", "/metrics", 405),
        ("POST", "/models/gpt-4o-mini/status", 405),
        ("DELETE", "/usage", 405),
        ("PUT", "/chat", 405),
        ("GET", "/v1/chat/completions", 405),
    ],
)
def test_refusals_outside_the_views_are_json(service_url: str, key: str, method: str, path: str, status: int) -> None:
    response = httpx.request(method, f"{service_url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert response.status_code == status, response.text[:200]
    assert response.headers["content-type"] == "application/json", response.text[:200]
    error = response.json()["error"]
    assert isinstance(error["code"], str) and isinstance(error["message"], str)
    if status == 405:
        assert response.headers["allow"]


_MANY_FIELDS = "&".join(f"f{i}=1" for i in range(1001))  # past DATA_UPLOAD_MAX_NUMBER_FIELDS


@pytest.mark.parametrize(
    ("path", "host"),
    [
        (f"/usage?{_MANY_FIELDS}", None),
        (f"/history?{_MANY_FIELDS}", None),
        (f"/models?{_MANY_FIELDS}", None),
        ("/usage", "not-served.example"),  # a Host outside ALLOWED_HOSTS
        ("/health", "not-served.example"),
    ],
    ids=["usage-fields", "history-fields", "models-fields", "usage-host", "health-host"],
)
def test_requests_django_refuses_as_malformed_get_a_json_400(
    service_url: str, key: str, path: str, host: str | None
) -> None:
    headers = {"Authorization": f"Bearer {key}", **({"Host": host} if host else {})}
    response = httpx.get(f"{service_url}{path}", headers=headers, timeout=30)
    assert_error(response, 400, "invalid_request")
    assert response.headers["x-request-id"]
