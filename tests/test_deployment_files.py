"""docker-compose.yml and .env.example are kept right by reading: parse them and check the wiring."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _settings_variables() -> set[str]:
    text = (ROOT / "chatservice" / "settings.py").read_text()
    return set(re.findall(r'env\.(?:str|bool|int|float|list)\(\s*"([A-Z_0-9]+)"', text)) | {"DATABASE_URL"}


def test_env_example_lists_every_setting() -> None:
    listed = set(re.findall(r"^([A-Z_0-9]+)=", (ROOT / ".env.example").read_text(), re.MULTILINE))
    missing = _settings_variables() - listed
    assert not missing, f".env.example lacks {sorted(missing)}"


def test_compose_runs_postgres_redis_and_the_app_with_healthchecks() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "app", "migrate", "checkproviders"} <= set(services)
    for name in ("postgres", "redis", "app"):
        assert "healthcheck" in services[name], name
    app = services["app"]
    env = app["environment"]
    assert env["DATABASE_URL"].startswith("postgres://") and "@postgres:5432/" in env["DATABASE_URL"]
    assert env["REDIS_URL"].startswith("redis://redis:6379")
    assert env["DEBUG"] == "false" and "SECRET_KEY" in env
    for key in ("OPENAI_API_KEY", "CLAUDE_API_KEY", "DEEPSEEK_API_KEY", "GEMINI_API_KEY"):
        assert key in env
    assert app["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert app["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "checkproviders" in " ".join(services["checkproviders"]["command"])


def test_dockerfile_serves_the_asgi_app_with_daphne() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "python:3.11" in dockerfile
    assert '"daphne"' in dockerfile and "chatservice.asgi:application" in dockerfile
