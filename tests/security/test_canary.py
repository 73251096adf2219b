"""Secrets canary: recognizable provider keys, every fault through every transport, then a search of
every log line (all levels, the project's JSON formatter and filter, tracebacks included), every
response and every admin page for those keys. Also: request logs carry metadata, never content."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import websockets
from django.contrib import admin
from django.test import Client
from django.urls import reverse

from chatservice.logging import JsonFormatter, RedactSecretsFilter
from providers.registry import registry
from providers.sandbox.faults import SandboxState
from tests.sandbox_server import BackgroundServer

pytestmark = pytest.mark.django_db(transaction=True)

# The recognizable middle of each key is searched too: a masked echo ("sk-*****...") keeps the ends.
CORES = {
    "openai": "canary-openai-7f3a9c2e41d8",
    "claude": "canary-claude-51be0d7a93c4",
    "deepseek": "canary-deepseek-c08e6f12ab57",
    "gemini": "canary-gemini-9d24e7b1f036",
}
KEYS = {
    "openai": f"sk-{CORES['openai']}-end0",
    "claude": f"sk-ant-api03-{CORES['claude']}-end1",
    "deepseek": f"sk-{CORES['deepseek']}-end2",
    "gemini": f"AIzaSy-{CORES['gemini']}-end3",
}
METRICS_TOKEN = "metrics-canary-4e1f0b7c2d9a-token"
SECRETS = [*KEYS.values(), *CORES.values(), METRICS_TOKEN]
PROVIDERS = list(KEYS)
SANDBOX_PATHS = {"openai": "/openai/v1", "claude": "/anthropic", "deepseek": "/deepseek", "gemini": "/gemini"}
FAULTS = [
    "[[fail:400]]",
    "[[fail:401]]",
    "[[fail:403]]",
    "[[fail:404]]",
    "[[fail:429]] [[retry-after:0]]",
    "[[fail:500]]",
    "[[fail:502]]",
    "[[fail:503]] [[retry-after:0]]",
    "[[fail:529]] [[retry-after:0]]",
    "[[fail:context]]",
    "[[fail:policy]]",
    "[[fail:conn]]",
    "[[drop:2]] [[tokens:6]]",
    "[[error-after:2]] [[tokens:6]]",
    "[[hang@{provider}]]",
    "[[tokens:3]]",
]


@dataclass
class Corpus:
    """Everything the service said: log lines and response bodies, searched for secrets at the end."""

    logs: io.StringIO = field(default_factory=io.StringIO)
    bodies: list[str] = field(default_factory=list)

    def add(self, what: str, text: str) -> None:
        self.bodies.append(f"--- {what}\n{text}")

    def text(self) -> str:
        return self.logs.getvalue() + "\n".join(self.bodies)


@contextlib.contextmanager
def every_log_record(into: io.StringIO) -> Iterator[None]:
    """Every logger at DEBUG, written as the project's console handler writes: its filter, its JSON."""
    handler = logging.StreamHandler(into)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactSecretsFilter())
    handler.setLevel(logging.DEBUG)
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in list(logging.root.manager.loggerDict))]
    levels = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        for lg, level in levels:
            lg.setLevel(level)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def point_providers(settings: Any, base: str, *, gemini_query: str = "") -> None:
    """Real-looking keys, each provider pointed explicitly at `base` (the sandbox, or a closed port)."""
    for name, key in KEYS.items():
        prefix = "CLAUDE" if name == "claude" else name.upper()
        setattr(settings, f"{prefix}_API_KEY", key)
        setattr(settings, f"{prefix}_BASE_URL", f"{base}{SANDBOX_PATHS[name]}")
    settings.GEMINI_BASE_URL += gemini_query
    registry.reset()


@pytest.fixture
def canary(settings: Any, sandbox: SandboxState, sandbox_server: BackgroundServer) -> Iterator[Corpus]:
    point_providers(settings, sandbox_server.url)
    settings.METRICS_BEARER_TOKEN = METRICS_TOKEN
    settings.FIRST_TOKEN_TIMEOUT_SECONDS = 0.4
    settings.STREAM_IDLE_TIMEOUT_SECONDS = 0.4
    settings.MAX_RETRY_ATTEMPTS = 2
    settings.CIRCUIT_FAILURE_THRESHOLD = 100_000
    settings.LOG_REQUESTS = True
    settings.LOG_RESPONSES = False
    corpus = Corpus()
    with every_log_record(corpus.logs):
        yield corpus
    registry.reset()


# --- the transports ------------------------------------------------------------------------


def rest(corpus: Corpus, url: str, key: str, body: dict[str, Any], path: str = "/chat") -> httpx.Response:
    response = httpx.post(f"{url}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    corpus.add(f"{path} {body}", f"{response.status_code} {dict(response.headers)}\n{response.text}")
    return response


def sse(corpus: Corpus, url: str, key: str, body: dict[str, Any]) -> str:
    headers = {"Authorization": f"Bearer {key}"}
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", f"{url}/chat/stream", json=body, headers=headers) as r,
    ):
        text = r.read().decode()
    corpus.add(f"/chat/stream {body}", f"{r.status_code} {dict(r.headers)}\n{text}")
    return text


async def _ws(url: str, key: str, bodies: list[dict[str, Any]]) -> list[str]:
    frames: list[str] = []
    ws_url = url.replace("http://", "ws://") + "/ws/chat"
    async with websockets.connect(ws_url, additional_headers={"Authorization": f"Bearer {key}"}) as ws:
        frames.append(str(await ws.recv()))
        for body in bodies:
            await ws.send(json.dumps({"type": "chat", **body}))
            for _ in range(100):  # bounded: start, a few tokens, then done or error
                frame = str(await asyncio.wait_for(ws.recv(), timeout=30))
                frames.append(frame)
                if json.loads(frame)["type"] in ("done", "error"):
                    break
    return frames


def websocket(corpus: Corpus, url: str, key: str, bodies: list[dict[str, Any]]) -> list[str]:
    frames = asyncio.run(_ws(url, key, bodies))
    corpus.add(f"/ws/chat {bodies}", "\n".join(frames))
    return frames


def every_fault_everywhere(corpus: Corpus, url: str, key: str, providers: list[str]) -> None:
    for index, fault in enumerate(FAULTS):
        for provider in providers:
            message = f"canary run {index}: hello {fault.format(provider=provider)}"
            rest(corpus, url, key, {"message": message, "model": provider})
        rotating = providers[index % len(providers)]
        message = f"canary stream {index}: hello {fault.format(provider=rotating)}"
        sse(corpus, url, key, {"message": message, "model": rotating})
        completions = {"model": rotating, "messages": [{"role": "user", "content": message}]}
        rest(corpus, url, key, completions, path="/v1/chat/completions")
    websocket(
        corpus,
        url,
        key,
        [
            {"message": f"canary ws {i}: {fault.format(provider=PROVIDERS[i % 4])}", "model": PROVIDERS[i % 4]}
            for i, fault in enumerate(FAULTS)
        ],
    )


def admin_pages(corpus: Corpus, make_user: Any) -> int:
    """Every registered model's changelist, add form and the change form of (up to 5 of) its rows."""
    staff, _ = make_user("enterprise", username="canary-admin", is_staff=True, is_superuser=True)
    client = Client()
    client.force_login(staff)
    pages = 0
    for model, model_admin in admin.site._registry.items():
        info = (model._meta.app_label, model._meta.model_name)
        urls = [reverse("admin:{}_{}_changelist".format(*info))]
        if model_admin.has_add_permission(_request_for(staff)):
            urls.append(reverse("admin:{}_{}_add".format(*info)))
        rows = model._default_manager.values_list("pk", flat=True)[:5]
        urls += [reverse("admin:{}_{}_change".format(*info), args=[pk]) for pk in rows]
        for page in urls:
            response = client.get(page)
            assert response.status_code == 200, (page, response.status_code)
            corpus.add(f"admin {page}", response.content.decode())
            pages += 1
    return pages


def _request_for(user: Any) -> Any:
    from django.test import RequestFactory

    request = RequestFactory().get("/admin/")
    request.user = user
    return request


def hits(corpus: Corpus) -> dict[str, int]:
    text = corpus.text()
    return {secret: text.count(secret) for secret in SECRETS if secret in text}


# --- the tests -----------------------------------------------------------------------------


def test_no_key_in_any_log_response_or_admin_page(
    canary: Corpus, service_url: str, sandbox: SandboxState, make_user: Any, settings: Any
) -> None:
    _, key = make_user("enterprise", username="canary", tokens_per_day_override=10**10)
    every_fault_everywhere(canary, service_url, key, PROVIDERS)

    # A closed port behind every provider (connection refused, retried, fallen back from).
    point_providers(settings, f"http://127.0.0.1:{closed_port()}")
    for provider in PROVIDERS:
        assert rest(canary, service_url, key, {"message": "anyone there?", "model": provider}).status_code == 503
    sse(canary, service_url, key, {"message": "anyone there?", "model": "gemini"})
    websocket(canary, service_url, key, [{"message": "anyone there?", "model": "claude"}])

    # Gemini's key in the URL (a base URL carrying ?key=, as some proxies want): refused, cut, dropped.
    settings.ENABLE_FALLBACK = False
    point_providers(settings, f"http://127.0.0.1:{closed_port()}", gemini_query=f"?key={KEYS['gemini']}")
    rest(canary, service_url, key, {"message": "key in the url", "model": "gemini"})
    sse(canary, service_url, key, {"message": "key in the url", "model": "gemini"})
    point_providers(settings, settings.SANDBOX_URL, gemini_query=f"?key={KEYS['gemini']}")
    for fault in ("[[fail:400]]", "[[fail:500]]", "[[fail:conn]]", "[[drop:1]]", "[[tokens:2]]"):
        rest(canary, service_url, key, {"message": f"key in the url {fault}", "model": "gemini"})

    # The metrics token: refused without it, never echoed.
    for given in ("", "Bearer wrong", f"Bearer {METRICS_TOKEN}"):
        response = httpx.get(f"{service_url}/metrics", headers={"Authorization": given} if given else {}, timeout=30)
        canary.add(f"/metrics {given[:6]}", f"{response.status_code} {dict(response.headers)}\n{response.text}")
    canary.add("/health", httpx.get(f"{service_url}/health", timeout=30).text)

    pages = admin_pages(canary, make_user)

    # The run was real: every key went upstream, the faults were logged, the admin had pages to show.
    assert {call.api_key for call in sandbox.calls()} >= set(KEYS.values())
    log_text = canary.logs.getvalue()
    assert '"level":"WARNING"' in log_text or '"level":"ERROR"' in log_text
    assert "attempt 1 failed" in log_text and '"message":"chat request"' in log_text
    assert pages > 20
    assert hits(canary) == {}


def test_the_logging_pipeline_redacts_keys_in_messages_extras_and_tracebacks(canary: Corpus) -> None:
    """What the handler writes when code does log a key: a message argument, an extra field, an
    exception chain, a Gemini URL with ?key=, an Authorization header."""
    log = logging.getLogger("tests.canary")
    url = (
        f"https://generativelanguage.googleapis.com/v1beta/models/x:streamGenerateContent?alt=sse&key={KEYS['gemini']}"
    )
    log.info("calling %s with %s", url, KEYS["openai"])
    log.warning("upstream said no", extra={"upstream": {"key": KEYS["claude"]}, "header": f"Bearer {KEYS['deepseek']}"})
    try:
        try:
            raise ConnectionError(f"refused: {url}")
        except ConnectionError as exc:
            raise RuntimeError(f"with key {KEYS['openai']} x-api-key: {KEYS['claude']}") from exc
    except RuntimeError:
        log.exception("failed %s", METRICS_TOKEN)
    text = canary.logs.getvalue()
    lines = [json.loads(line) for line in text.splitlines() if '"logger":"tests.canary"' in line]
    assert len(lines) == 3
    assert "Traceback" in lines[2]["exc"] and "ConnectionError" in lines[2]["exc"]
    assert "[REDACTED]" in text
    assert hits(canary) == {}


# --- content stays out of the logs unless LOG_RESPONSES --------------------------------------


def _chat_logs(service_url: str, key: str, transport: str) -> tuple[str, str, str]:
    """(the log text, the unique message sent, the reply) for one successful chat."""
    marker = f"private-content-{uuid.uuid4().hex}"
    corpus = Corpus()
    with every_log_record(corpus.logs):
        if transport == "rest":
            reply = rest(corpus, service_url, key, {"message": f"{marker} [[tokens:8]]", "model": "openai"}).json()
            text = reply["message"]
        else:
            frames = websocket(corpus, service_url, key, [{"message": f"{marker} [[tokens:8]]", "model": "claude"}])
            text = json.loads(frames[-1])["message"]
    return corpus.logs.getvalue(), marker, text


@pytest.mark.parametrize("transport", ["rest", "websocket"])
def test_request_logs_carry_metadata_never_content(
    service_url: str, make_user: Any, settings: Any, transport: str
) -> None:
    settings.LOG_REQUESTS, settings.LOG_RESPONSES = True, False
    _, key = make_user("enterprise", username="private")
    logs, marker, reply = _chat_logs(service_url, key, transport)
    records = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    requests = [r for r in records if r["message"] == "chat request"]
    assert len(requests) == 1
    assert {"request_id", "user_id", "provider", "model", "status", "input_tokens", "output_tokens"} <= requests[
        0
    ].keys()
    assert marker not in logs and reply not in logs
    assert not any(r["message"] == "chat content" for r in records)


@pytest.mark.parametrize("transport", ["rest", "websocket"])
def test_log_responses_is_the_one_way_content_reaches_logs(
    service_url: str, make_user: Any, settings: Any, transport: str
) -> None:
    _, key = make_user("enterprise", username="shared")
    settings.LOG_REQUESTS, settings.LOG_RESPONSES = False, False
    quiet, marker, reply = _chat_logs(service_url, key, transport)
    assert marker not in quiet and reply not in quiet
    assert '"message":"chat request"' not in quiet

    settings.LOG_RESPONSES = True
    logs, marker, reply = _chat_logs(service_url, key, transport)
    content = [line for line in logs.splitlines() if '"message":"chat content"' in line]
    assert len(content) == 1
    assert marker in content[0] and reply in content[0]
