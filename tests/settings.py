"""Test settings: the service's own settings with test defaults for the environment.

Tests run on Postgres and Redis (DATABASE_URL, REDIS_URL); `make test` and `.ci/run` start
them when they are stopped. Anything already set in the environment wins.
"""

import os
import sys
import uuid

os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/chatservice")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/0")
os.environ.setdefault("SECRET_KEY", "test-secret-key-" + "k" * 40)
os.environ.setdefault("ALLOWED_HOSTS", "testserver,localhost,127.0.0.1")
os.environ.setdefault("SECURE_SSL_REDIRECT", "false")
os.environ.setdefault("LOG_LEVEL", "WARNING")
# Server threads keep their connections between calls as in production (CONN_MAX_AGE's default);
# the conftest ends those sessions before the test database is dropped.
# Short waits keep the router tests quick; tests that time things set their own.
os.environ.setdefault("RETRY_DELAY_SECONDS", "0.01")
# Tests never use a developer's real keys unless they ask to: `pytest tests/integration/ --api-keys`.
# (Settings load before pytest parses its options, hence the look at argv.)
API_KEYS_MODE = "--api-keys" in sys.argv or os.environ.get("CHAT_TESTS_WITH_API_KEYS") == "1"
if not API_KEYS_MODE:
    for _name in ("OPENAI_API_KEY", "CLAUDE_API_KEY", "DEEPSEEK_API_KEY", "GEMINI_API_KEY"):
        os.environ[_name] = ""

from chatservice.settings import *  # noqa: E402,F403

# Hourly windows outlive a test run; a fresh namespace keeps runs from sharing counts.
# (Server processes a test starts pass theirs in the environment, to share the test's windows.)
RATE_LIMIT_NAMESPACE = os.environ.get("RATE_LIMIT_NAMESPACE") or f"test-{uuid.uuid4().hex}"
SESSION_COOKIE_SECURE = False
CSRF_COOKIE_SECURE = False
SECURE_HSTS_SECONDS = 0
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
