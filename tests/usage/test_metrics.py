"""Metrics and request logs: `/metrics` after known traffic summed over two real server processes
(prometheus_client multiprocess mode), the metrics token, fallback and limit-refusal counters,
labels by plan never by user, and one structured JSON log line per request."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import httpx
import orjson
import pytest
from django.conf import settings as django_settings
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from chatservice.logging import JsonFormatter
from usage.models import UsageRecord

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parents[2]


def chat(url: str, key: str, message: str, model: str = "deepseek", **headers: str) -> httpx.Response:
    headers["Authorization"] = f"Bearer {key}"
    return httpx.post(f"{url}/chat", json={"message": message, "model": model}, headers=headers, timeout=30)


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a Prometheus text page, keyed by (name, labels)."""
    found: dict[tuple[str, frozenset], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(page: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    return page.get((name, frozenset(labels.items())), 0.0)


def local(name: str, **labels: str) -> float:
    """A sample of this process's registry (the in-process test server records here)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- two server processes -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def database_url() -> str:
    db = django_settings.DATABASES["default"]
    user = db.get("USER") or "postgres"
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    return f"postgres://{user}{password}@{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}/{db['NAME']}"


def start_server(port: int, env: dict[str, str], log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "uvicorn", "chatservice.asgi:application", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--log-level", "warning", "--lifespan", "off"]
    with log.open("wb") as out:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_until_up(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"server did not start: {log.read_text()[-2000:]}")


@pytest.fixture
def two_servers(sandbox_server, sandbox, transactional_db, tmp_path):
    """Two uvicorn processes of the service sharing one PROMETHEUS_MULTIPROC_DIR, on the test database."""
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": database_url(),
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "SANDBOX_URL": sandbox_server.url,
        "ENABLE_FALLBACK": "false",
        "MAX_RETRY_ATTEMPTS": "1",
        "ENABLE_METRICS": "true",
        "METRICS_BEARER_TOKEN": "",
        "API_KEY_CACHE_SECONDS": "0",
    }
    processes, urls = [], []
    try:
        for n in range(2):
            port = free_port()
            processes.append(start_server(port, env, tmp_path / f"server{n}.log"))
            urls.append(f"http://127.0.0.1:{port}")
        for n, (url, process) in enumerate(zip(urls, processes, strict=True)):
            wait_until_up(url, process, tmp_path / f"server{n}.log")
        yield urls, metrics_dir, processes
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def test_metrics_sum_known_traffic_over_two_processes(two_servers, make_user) -> None:
    (first, second), metrics_dir, processes = two_servers
    user, key = make_user("premium")
    for url, count in ((first, 2), (second, 3)):
        for n in range(count):
            assert chat(url, key, f"hello {n} [[tokens:3]]").status_code == 200
    failed = chat(first, key, "boom [[fail:500]]", model="openai")
    assert failed.status_code == 502
    error_code = failed.json()["error"]["code"]

    pages = []
    for url in (first, second):
        response = httpx.get(f"{url}/metrics", timeout=10)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        pages.append(samples(response.text))
    ok = UsageRecord.objects.filter(user=user, status="ok")
    assert ok.count() == 5
    input_tokens = sum(r.input_tokens for r in ok)
    cost = sum((r.cost for r in ok), Decimal(0))

    for page in pages:  # either process answers for both
        labels = {"provider": "deepseek", "model": "deepseek-chat", "plan": "premium"}
        assert value(page, "llm_requests_total", **labels, status="ok") == 5
        assert (
            value(page, "llm_requests_total", provider="openai", model="gpt-4o-mini", plan="premium", status="failed")
            == 1
        )
        assert value(page, "llm_tokens_used_total", **labels, direction="output") == 15
        assert value(page, "llm_tokens_used_total", **labels, direction="input") == input_tokens
        assert value(page, "llm_cost_usd_total", **labels) == pytest.approx(float(cost), rel=1e-9)
        assert value(page, "llm_response_time_seconds_count", provider="deepseek") == 5
        assert value(page, "llm_time_to_first_token_seconds_count", provider="deepseek") == 5
        assert value(page, "llm_errors_total", provider="openai", error_type=error_code) == 1
        assert all("user" not in dict(labels) and "user_id" not in dict(labels) for _, labels in page)
    # Each process wrote its own files: the sum really came from two processes.
    writers = {path.stem.rsplit("_", 1)[-1] for path in metrics_dir.glob("counter_*.db")}
    assert {str(p.pid) for p in processes} <= writers


# --- in-process: token, fallback and limit counters -------------------------------------------------


def test_metrics_token_closes_the_endpoint(service_url, settings) -> None:
    settings.METRICS_BEARER_TOKEN = "metrics-token-0123456789"
    missing = httpx.get(f"{service_url}/metrics")
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthenticated"
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    wrong = httpx.get(f"{service_url}/metrics", headers={"Authorization": "Bearer metrics-token-0123456788"})
    assert wrong.status_code == 401
    right = httpx.get(f"{service_url}/metrics", headers={"Authorization": "Bearer metrics-token-0123456789"})
    assert right.status_code == 200 and "# TYPE llm_requests_total counter" in right.text
    settings.METRICS_BEARER_TOKEN = ""
    assert httpx.get(f"{service_url}/metrics").status_code == 200
    settings.ENABLE_METRICS = False
    disabled = httpx.get(f"{service_url}/metrics")
    assert disabled.status_code == 404 and disabled.json()["error"]["code"] == "not_found"


def test_fallbacks_are_counted_by_the_provider_that_failed(service_url, sandbox, make_user, settings) -> None:
    settings.ENABLE_FALLBACK = True
    settings.MAX_RETRY_ATTEMPTS = 1
    _, key = make_user("premium")
    before = local("llm_fallbacks_total", from_provider="openai")
    response = chat(service_url, key, "hi [[fail:503@openai]]", model="openai")
    assert response.status_code == 200 and response.json()["fallback_path"] == ["openai"]
    assert local("llm_fallbacks_total", from_provider="openai") == before + 1


def test_limit_refusals_are_counted_by_plan_and_limit(service_url, sandbox, make_user) -> None:
    _, hourly_key = make_user("free", requests_per_hour_override=1)
    _, daily_key = make_user("free", tokens_per_day_override=10)
    hourly_before = local("llm_limit_refusals_total", plan="free", limit="requests_per_hour")
    daily_before = local("llm_limit_refusals_total", plan="free", limit="tokens_per_day")
    assert chat(service_url, hourly_key, "one").status_code == 200
    refused = chat(service_url, hourly_key, "two")
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    quota = chat(service_url, daily_key, "too big for ten tokens")
    assert quota.status_code == 429 and quota.json()["error"]["code"] == "token_quota_exceeded"
    assert local("llm_limit_refusals_total", plan="free", limit="requests_per_hour") == hourly_before + 1
    assert local("llm_limit_refusals_total", plan="free", limit="tokens_per_day") == daily_before + 1


# --- request logs -----------------------------------------------------------------------------------


def request_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "chat.requests"]


def test_one_structured_line_per_request_without_content(service_url, sandbox, make_user, settings, caplog) -> None:
    settings.LOG_REQUESTS, settings.LOG_RESPONSES = True, False
    caplog.set_level(logging.INFO, logger="chat.requests")
    user, key = make_user("premium")
    secret = "my secret recipe for tea"
    response = chat(
        service_url, key, f"{secret} [[tokens:4]]", **{"X-Request-ID": "6a1f1c0e-1b7e-4f43-9d7a-2c0b5f1e9a11"}
    )
    assert response.status_code == 200
    body = response.json()

    [record] = request_lines(caplog)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = orjson.loads(line)
    assert entry["message"] == "chat request" and entry["logger"] == "chat.requests"
    assert entry["request_id"] == response.headers["X-Request-ID"] == "6a1f1c0e-1b7e-4f43-9d7a-2c0b5f1e9a11"
    assert entry["user_id"] == user.pk and entry["plan"] == "premium" and entry["transport"] == "rest"
    assert (entry["provider"], entry["model"], entry["status"]) == ("deepseek", "deepseek-chat", "ok")
    assert (entry["input_tokens"], entry["output_tokens"]) == (body["input_tokens"], 4)
    assert Decimal(entry["cost"]) == UsageRecord.objects.get().cost
    assert isinstance(entry["latency_ms"], int) and entry["latency_ms"] >= 0
    assert secret not in line and body["message"] not in line


def test_a_reused_request_id_is_logged_under_the_id_the_ledger_gave(
    service_url, sandbox, make_user, settings, caplog
) -> None:
    """The second request with the same X-Request-ID is recorded under a fresh id; its log line
    named the first request's record (2 output tokens) while reporting its own 7."""
    settings.LOG_REQUESTS, settings.LOG_RESPONSES = True, False
    caplog.set_level(logging.INFO, logger="chat.requests")
    _, key = make_user("premium")
    reused = {"X-Request-ID": "0c3e6f0a-5d8e-4c1b-9a7f-3e2d1c0b9a88"}
    first = chat(service_url, key, "one [[tokens:2]]", **reused)
    second = chat(service_url, key, "two [[tokens:7]]", **reused)
    assert first.status_code == second.status_code == 200
    assert second.headers["X-Request-ID"] != reused["X-Request-ID"]

    lines = [orjson.loads(JsonFormatter().format(r)) for r in request_lines(caplog)]
    assert [line["request_id"] for line in lines] == [first.headers["X-Request-ID"], second.headers["X-Request-ID"]]
    for line in lines:  # each line describes the ledger record of the id it names
        record = UsageRecord.objects.get(request_id=line["request_id"])
        assert (line["output_tokens"], Decimal(line["cost"])) == (record.output_tokens, record.cost)


def test_nothing_is_logged_without_log_requests(service_url, sandbox, make_user, settings, caplog) -> None:
    settings.LOG_REQUESTS, settings.LOG_RESPONSES = False, False
    caplog.set_level(logging.INFO, logger="chat.requests")
    _, key = make_user("premium")
    assert chat(service_url, key, "quiet").status_code == 200
    assert UsageRecord.objects.count() == 1 and request_lines(caplog) == []


def test_content_is_logged_only_with_log_responses(service_url, sandbox, make_user, settings, caplog) -> None:
    settings.LOG_REQUESTS, settings.LOG_RESPONSES = True, True
    caplog.set_level(logging.INFO, logger="chat.requests")
    _, key = make_user("premium")
    headers = {"Authorization": f"Bearer {key}"}
    body = {"message": "what is in the log [[tokens:2]]", "model": "deepseek"}
    response = httpx.post(f"{service_url}/chat", json=body, headers=headers, timeout=30)
    assert response.status_code == 200
    records = request_lines(caplog)
    assert [r.getMessage() for r in records] == ["chat request", "chat content"]
    line = JsonFormatter().format(records[1])
    content = orjson.loads(line)
    assert content["request_id"] == response.headers["X-Request-ID"]
    assert content["user_message"] == "what is in the log [[tokens:2]]"
    assert content["reply"] == response.json()["message"]
