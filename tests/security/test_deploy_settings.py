"""Production settings: no start without a real SECRET_KEY, `check --deploy` clean, TLS behind a proxy."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

BASE_DIR = Path(__file__).resolve().parents[2]
SETUP = "import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'chatservice.settings'); django.setup()"
_CLEARED = ("DJANGO_SETTINGS_MODULE", "SECRET_KEY", "DEBUG", "ALLOWED_HOSTS", "DATABASE_URL", "REDIS_URL")


def production_env(**overrides: str) -> dict[str, str]:
    """This environment without any Django or service configuration, plus `overrides`.

    A developer's `.env` would fill in what is unset, so when there is one, "unset" is spelled as
    empty (which the settings read the same way)."""
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED and not k.endswith("_API_KEY")}
    if (BASE_DIR / ".env").exists():
        env.update({name: "" for name in _CLEARED if name != "DJANGO_SETTINGS_MODULE"})
    env.update(overrides)
    return env


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def random_key(length: int = 50) -> str:
    return secrets.token_urlsafe(length)[:length]


@pytest.mark.parametrize(
    "secret_key",
    [None, "", "too-short-0123456789", "dev-insecure-key-do-not-use-in-production"],
    ids=["unset", "empty", "short", "the-dev-key"],
)
@pytest.mark.parametrize("entry", [SETUP, "import chatservice.asgi"], ids=["django.setup", "asgi"])
def test_refuses_to_start_without_a_real_secret_key(secret_key: str | None, entry: str) -> None:
    env = production_env(ALLOWED_HOSTS="chat.example.com")
    if secret_key is not None:
        env["SECRET_KEY"] = secret_key
    if entry.startswith("import chatservice"):
        env["DJANGO_SETTINGS_MODULE"] = "chatservice.settings"
    result = run(["-c", entry], env)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert "SECRET_KEY must be set to a random string of at least 50 characters" in result.stderr


def test_starts_with_a_real_key_or_in_debug() -> None:
    assert run(["-c", SETUP], production_env(SECRET_KEY=random_key(), ALLOWED_HOSTS="x.example")).returncode == 0
    debug = run(
        ["-c", SETUP + "; from django.conf import settings; print(settings.SECRET_KEY)"], production_env(DEBUG="true")
    )
    assert debug.returncode == 0, debug.stderr
    assert debug.stdout.strip() == "dev-insecure-key-do-not-use-in-production"


def test_debug_with_an_empty_secret_key_uses_the_dev_key() -> None:
    """A copied .env.example has `SECRET_KEY=`; with DEBUG=true (as `make run` sets) empty means unset.

    Before, the empty value was taken as the key and refused, so `make run` stopped at its migrate step."""
    debug = run(
        ["-c", SETUP + "; from django.conf import settings; print(settings.SECRET_KEY)"],
        production_env(DEBUG="true", SECRET_KEY=""),
    )
    assert debug.returncode == 0, debug.stderr
    assert debug.stdout.strip() == "dev-insecure-key-do-not-use-in-production"


def test_an_empty_prometheus_multiproc_dir_means_one_process() -> None:
    """prometheus_client enters multiprocess mode when the variable is present, whatever its value;
    an empty one (a copied .env.example) left its value files in the working directory."""
    check = SETUP + "; import prometheus_client.values as v; print(v.ValueClass.__name__)"
    result = run(["-c", check], production_env(DEBUG="true", PROMETHEUS_MULTIPROC_DIR=""))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "MutexValue"


@pytest.mark.parametrize(("redirect", "silenced"), [("false", 1), ("true", 0)])
def test_check_deploy_is_clean(redirect: str, silenced: int) -> None:
    env = production_env(
        DEBUG="false", SECRET_KEY=random_key(), ALLOWED_HOSTS="chat.example.com", SECURE_SSL_REDIRECT=redirect
    )
    result = run(["manage.py", "check", "--deploy", "--fail-level", "WARNING"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"System check identified no issues ({silenced} silenced)." in result.stdout
    assert "WARNINGS" not in result.stderr + result.stdout


def test_production_values() -> None:
    """What the deploy check does not name: cookies, HSTS, sniffing, framing, the proxy header."""
    probe = (
        SETUP + "; from django.conf import settings as s; import json; print(json.dumps({n: getattr(s, n) for n in "
        "['DEBUG', 'SESSION_COOKIE_SECURE', 'CSRF_COOKIE_SECURE', 'SESSION_COOKIE_HTTPONLY', 'SECURE_HSTS_SECONDS',"
        " 'SECURE_CONTENT_TYPE_NOSNIFF', 'X_FRAME_OPTIONS', 'SECURE_PROXY_SSL_HEADER', 'ALLOWED_HOSTS']}))"
    )
    result = run(["-c", probe], production_env(SECRET_KEY=random_key(), ALLOWED_HOSTS="chat.example.com"))
    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout)
    assert values == {
        "DEBUG": False,
        "SESSION_COOKIE_SECURE": True,
        "CSRF_COOKIE_SECURE": True,
        "SESSION_COOKIE_HTTPONLY": True,
        "SECURE_HSTS_SECONDS": 31536000,
        "SECURE_CONTENT_TYPE_NOSNIFF": True,
        "X_FRAME_OPTIONS": "DENY",
        "SECURE_PROXY_SSL_HEADER": ["HTTP_X_FORWARDED_PROTO", "https"],
        "ALLOWED_HOSTS": ["chat.example.com"],
    }
    no_hosts = run(["-c", probe], production_env(SECRET_KEY=random_key()))
    assert no_hosts.returncode == 0 and '"ALLOWED_HOSTS": []' in no_hosts.stdout  # nothing is served by default


@pytest.mark.django_db
def test_ssl_redirect_behind_the_proxy(settings: Any) -> None:
    """With SECURE_SSL_REDIRECT on, plain HTTP is sent to https; the proxy's X-Forwarded-Proto is trusted."""
    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    settings.SECURE_HSTS_SECONDS = 3600
    plain = Client().get("/health")
    assert plain.status_code == 301 and plain["Location"] == "https://testserver/health"
    proxied = Client().get("/health", HTTP_X_FORWARDED_PROTO="https")
    assert proxied.status_code == 200
    assert proxied["Strict-Transport-Security"].startswith("max-age=3600")
    assert proxied["X-Content-Type-Options"] == "nosniff" and proxied["X-Frame-Options"] == "DENY"


PRINT_SETTINGS = f"""import json
{SETUP}
from django.conf import settings as s
print(json.dumps([s.ENABLE_FALLBACK, s.FALLBACK_ORDER, s.FIRST_TOKEN_TIMEOUT_SECONDS, s.MAX_RETRY_ATTEMPTS]))
"""


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MAX_RETRY_ATTEMPTS", "abc"),
        ("MAX_RETRY_ATTEMPTS", "0"),
        ("RETRY_DELAY_SECONDS", "-1"),
        ("FALLBACK_ORDER", "foo"),
        ("FALLBACK_ORDER", "openai,Claude"),
        ("DEBUG", "maybe"),
        ("ENABLE_FALLBACK", "ture"),
        ("LOG_RESPONSES", "yes please"),
        ("FIRST_TOKEN_TIMEOUT_SECONDS", "5ms"),
        ("REQUEST_DEADLINE_SECONDS", "0"),
        ("API_KEY_CACHE_SECONDS", "nan"),
        ("BATCH_CONCURRENCY", "0"),
        ("STREAM_BUFFER_EVENTS", "-1"),
        ("LOG_LEVEL", "verbose"),
    ],
)
def test_a_bad_value_stops_the_start_naming_the_variable(variable: str, value: str) -> None:
    """Before, most of these started the service: an unknown word read as false (`ENABLE_FALLBACK=ture`
    turned fallback off), letters were dropped from numbers (`5ms` was 5 s, `1e3` 13), unknown
    providers in FALLBACK_ORDER made fallback find nothing, and a batch concurrency of 0 hung batches."""
    env = production_env(SECRET_KEY=random_key(), ALLOWED_HOSTS="chat.example.com", **{variable: value})
    result = run(["-c", PRINT_SETTINGS], env)
    assert result.returncode != 0, result.stdout
    assert "ImproperlyConfigured" in result.stderr
    assert f"{variable}=" in result.stderr.splitlines()[-1], result.stderr


def test_good_values_are_read_as_written_and_empty_means_the_default() -> None:
    env = production_env(
        SECRET_KEY=random_key(),
        ALLOWED_HOSTS="chat.example.com",
        ENABLE_FALLBACK="",
        FALLBACK_ORDER="gemini, openai",
        FIRST_TOKEN_TIMEOUT_SECONDS="1e3",
        MAX_RETRY_ATTEMPTS=" 2 ",
    )
    result = run(["-c", PRINT_SETTINGS], env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [True, ["gemini", "openai"], 1000.0, 2]


@pytest.mark.parametrize(("value", "level"), [("debug", "DEBUG"), (" Warning ", "WARNING"), ("", "INFO")])
def test_log_level_is_read_in_any_case(value: str, level: str) -> None:
    """`LOG_LEVEL=debug`, as uvicorn's --log-level spells it, stopped the start with logging's own
    "Unable to configure root logger" traceback."""
    env = production_env(SECRET_KEY=random_key(), ALLOWED_HOSTS="chat.example.com", LOG_LEVEL=value)
    script = f"{SETUP}\nimport logging\nprint(logging.getLevelName(logging.getLogger().level))"
    result = run(["-c", script], env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == level
