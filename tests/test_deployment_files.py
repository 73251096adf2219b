"""docker-compose.yml, .env.example, the Dockerfile, the Makefile's serve commands and the requirements are
kept right by reading: parse them and check the wiring."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import yaml

from bench.run import BIN, gateway_command
from tests.usage.servers import make_command

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


def _dockerfile_cmd() -> list[str]:
    dockerfile = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    commands = re.findall(r"^CMD (\[.*\])$", dockerfile, re.MULTILINE)
    assert commands, "the Dockerfile has no CMD in exec form"
    return list(json.loads(commands[-1]))


def _pinned(requirements: str) -> dict[str, str]:
    lines = (ROOT / requirements).read_text().splitlines()
    return dict(line.split("==", 1) for line in lines if "==" in line and not line.startswith("#"))


def test_dockerfile_serves_the_asgi_app_with_the_make_serve_command() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "python:3.11" in dockerfile and "EXPOSE 8002" in dockerfile
    serve = make_command("serve", BIN=".venv/bin", HOST="0.0.0.0", PORT="8002")
    assert serve[0] == ".venv/bin/uvicorn"
    assert _dockerfile_cmd() == ["uvicorn", *serve[1:]]
    assert serve[1] == "chatservice.asgi:application"
    for flag, value in (
        ("--loop", "uvloop"),
        ("--http", "httptools"),
        ("--ws", "websockets-sansio"),
        ("--ws-max-size", "1048576"),  # MAX_REQUEST_BYTES' default: uvicorn's own is 16 MiB
    ):
        assert serve[serve.index(flag) + 1] == value, flag


def test_make_run_still_serves_with_designs_daphne_command() -> None:
    run = make_command("run", BIN=".venv/bin", HOST="127.0.0.1", PORT="8002")
    assert run == [".venv/bin/daphne", "-b", "127.0.0.1", "-p", "8002", "chatservice.asgi:application"]


def test_the_bench_measures_the_production_command() -> None:
    serve = make_command("serve", BIN=str(BIN), HOST="127.0.0.1", PORT="9100")
    assert gateway_command("uvicorn", 9100) == serve


def test_the_readme_shows_the_production_command() -> None:
    readme = (ROOT / "README.md").read_text()
    shown = re.search(r"^### In production\n.*?```sh\n(.*?)```", readme, re.MULTILINE | re.DOTALL)
    assert shown, "README.md has no production command under '### In production'"
    serve = make_command("serve", BIN="", HOST="0.0.0.0", PORT="8002")
    assert shlex.split(shown.group(1).replace("\\\n", " ")) == ["uvicorn", *serve[1:]]


def test_the_production_server_is_a_runtime_requirement() -> None:
    """The image installs requirements.txt alone, so all the serve command loads is pinned there, once."""
    runtime, dev = _pinned("requirements.txt"), _pinned("requirements-dev.txt")
    for package in ("uvicorn", "uvloop", "httptools", "websockets", "daphne"):
        assert package in runtime, package
        assert package not in dev, package
