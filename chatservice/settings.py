"""Django settings for the Chat Service, read from the environment (a `.env` file never overrides)."""

from __future__ import annotations

import math
import os
from decimal import Decimal
from pathlib import Path
from typing import Any

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


class _Env(environ.Env):
    """environ.Env that refuses a value it cannot read, naming the variable, rather than guessing.

    django-environ reads any unknown word as false (`ENABLE_FALLBACK=ture` turned fallback off)
    and strips letters from numbers (`FIRST_TOKEN_TIMEOUT_SECONDS=1e3` was 13, `5ms` was 5 s).
    An empty value means unset here, as for the strings below (a copied .env.example).
    """

    TRUE = ("true", "on", "ok", "yes", "y", "1")
    FALSE = ("false", "off", "no", "n", "0")

    def get_value(
        self, var: str, cast: Any = None, default: Any = environ.Env.NOTSET, parse_default: bool = False
    ) -> Any:
        raw = self.ENVIRON.get(var)
        if cast not in (None, str) and raw is not None and not raw.strip() and default is not environ.Env.NOTSET:
            return default
        try:
            return super().get_value(var, cast=cast, default=default, parse_default=parse_default)
        except ValueError as exc:
            raise ImproperlyConfigured(f"{var}={raw!r}: {exc}") from None

    @classmethod
    def parse_value(cls, value: str, cast: Any) -> Any:
        if cast is bool:
            word = value.strip().lower()
            if word not in cls.TRUE + cls.FALSE:
                raise ValueError(f"expected one of {', '.join(cls.TRUE + cls.FALSE)}")
            return word in cls.TRUE
        if cast is int:
            try:
                return int(value.strip())
            except ValueError:
                raise ValueError("expected a whole number") from None
        if cast is float:
            try:
                number = float(value.strip())
            except ValueError:
                number = math.nan
            if not math.isfinite(number):
                raise ValueError("expected a number")
            return number
        return super().parse_value(value, cast)


def _at_least(name: str, value: float, minimum: float, *, above: bool = False) -> None:
    """Refuse to start on a number outside what the setting means (a timeout of 0 fails every request)."""
    if value < minimum or (above and value == minimum):
        raise ImproperlyConfigured(f"{name}={value}: must be {'more than' if above else 'at least'} {minimum}")


env = _Env()
# A .env file fills in what the environment lacks; a variable already set always wins.
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

DEBUG: bool = env.bool("DEBUG", default=False)
_INSECURE_DEV_KEY = "dev-insecure-key-do-not-use-in-production"
SECRET_KEY: str = env.str("SECRET_KEY", default="") or (_INSECURE_DEV_KEY if DEBUG else "")
if not SECRET_KEY or (not DEBUG and (SECRET_KEY == _INSECURE_DEV_KEY or len(SECRET_KEY) < 50)):
    raise ImproperlyConfigured(
        "SECRET_KEY must be set to a random string of at least 50 characters (or set DEBUG=true for local development)."
    )
ALLOWED_HOSTS: list[str] = [h for h in env.list("ALLOWED_HOSTS", default=[]) if h] or (
    ["localhost", "127.0.0.1", "[::1]", "testserver"] if DEBUG else []
)
SECURE_SSL_REDIRECT: bool = env.bool("SECURE_SSL_REDIRECT", default=False)
if not DEBUG:
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
# security.W008 asks for SECURE_SSL_REDIRECT. The deployment this service is built for terminates
# TLS in the proxy in front of it (DESIGN.md §6), which redirects plain HTTP there and tells us the
# scheme in X-Forwarded-Proto (SECURE_PROXY_SSL_HEADER); redirecting again here would only loop on
# the proxy's health checks. A deployment that faces clients itself sets SECURE_SSL_REDIRECT=true,
# and then nothing is silenced.
SILENCED_SYSTEM_CHECKS: list[str] = [] if SECURE_SSL_REDIRECT else ["security.W008"]

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "channels",
    "django_prometheus",
    "accounts",
    "providers",
    "usage",
    "chat",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "chatservice.middleware.RequestIdMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "chatservice.urls"
ASGI_APPLICATION = "chatservice.asgi.application"
AUTH_USER_MODEL = "accounts.User"
APPEND_SLASH = False

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# An empty value (as in a copied .env.example) means unset, like everywhere else here.
DATABASES = {
    "default": env.db_url_config(env.str("DATABASE_URL", default="") or f"sqlite:///{BASE_DIR / 'db.sqlite3'}"),
}
# Connections are reused by the database thread pool between short transactions (never held
# in a transaction across an upstream call), health-checked before reuse.
DATABASES["default"]["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=60)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
# The statements on every request's path (chatservice/async_db.py) are prepared once per
# connection. Turn off behind a pooler that does not keep prepared statements (PgBouncer
# before 1.21, or without max_prepared_statements, in transaction mode).
DB_PREPARED_STATEMENTS: bool = env.bool("DB_PREPARED_STATEMENTS", default=True)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL: str = env.str("REDIS_URL", default="")

if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # No read timeout: a consumer waits on the layer with BZPOPMIN for up to 5 s at a time,
            # and redis-py 8's default socket_timeout (5 s) would end that wait with a TimeoutError
            # that kills the consumer, dropping its WebSocket (chatservice/redis_bounds.py).
            "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": None}]},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["accounts.authentication.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "EXCEPTION_HANDLER": "chatservice.errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Chat Service",
    "DESCRIPTION": "An LLM gateway: chat, streaming, routing, quotas and a ledger of every token.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # Loads chatservice.schema (the API-key auth scheme) before views are read: without it the
    # schema, and so `check --deploy`, warns that the authentication class is unknown.
    "PREPROCESSING_HOOKS": ["chatservice.schema.register_extensions"],
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "chatservice.schema.add_chat_endpoints",
    ],
}

# --- LLM providers -------------------------------------------------------------------------
OPENAI_API_KEY: str = env.str("OPENAI_API_KEY", default="")
CLAUDE_API_KEY: str = env.str("CLAUDE_API_KEY", default="")
DEEPSEEK_API_KEY: str = env.str("DEEPSEEK_API_KEY", default="")
GEMINI_API_KEY: str = env.str("GEMINI_API_KEY", default="")
# Where providers without a key are served from: the sandbox upstream, mounted in this app.
SANDBOX_URL: str = (env.str("SANDBOX_URL", default="") or "http://127.0.0.1:8002/sandbox").rstrip("/")
OPENAI_BASE_URL: str = env.str("OPENAI_BASE_URL", default="")
CLAUDE_BASE_URL: str = env.str("CLAUDE_BASE_URL", default="")
DEEPSEEK_BASE_URL: str = env.str("DEEPSEEK_BASE_URL", default="")
GEMINI_BASE_URL: str = env.str("GEMINI_BASE_URL", default="")
PROVIDER_TIMEOUT_SECONDS: float = env.float("PROVIDER_TIMEOUT_SECONDS", default=60.0)

DEFAULT_LLM: str = env.str("DEFAULT_LLM", default="openai")
MAX_TOKENS_DEFAULT: int = env.int("MAX_TOKENS_DEFAULT", default=1000)
TEMPERATURE_DEFAULT: float = env.float("TEMPERATURE_DEFAULT", default=0.7)
ENABLE_STREAMING: bool = env.bool("ENABLE_STREAMING", default=True)

FREE_REQUESTS_PER_HOUR: int = env.int("FREE_REQUESTS_PER_HOUR", default=50)
PREMIUM_REQUESTS_PER_HOUR: int = env.int("PREMIUM_REQUESTS_PER_HOUR", default=500)
ENTERPRISE_REQUESTS_PER_HOUR: int = env.int("ENTERPRISE_REQUESTS_PER_HOUR", default=5000)
TOKEN_RESERVATION_TTL_SECONDS: int = env.int("TOKEN_RESERVATION_TTL_SECONDS", default=900)
# Prefix of the limiter's Redis keys (several deployments may share one Redis).
RATE_LIMIT_NAMESPACE: str = env.str("RATE_LIMIT_NAMESPACE", default="chat")

ENABLE_FALLBACK: bool = env.bool("ENABLE_FALLBACK", default=True)
FALLBACK_ORDER: list[str] = [
    name.strip()
    for name in env.list("FALLBACK_ORDER", default=["openai", "claude", "deepseek", "gemini"])
    if name.strip()
]
MAX_RETRY_ATTEMPTS: int = env.int("MAX_RETRY_ATTEMPTS", default=3)
RETRY_DELAY_SECONDS: float = env.float("RETRY_DELAY_SECONDS", default=1.0)
FIRST_TOKEN_TIMEOUT_SECONDS: float = env.float("FIRST_TOKEN_TIMEOUT_SECONDS", default=30.0)
STREAM_IDLE_TIMEOUT_SECONDS: float = env.float("STREAM_IDLE_TIMEOUT_SECONDS", default=30.0)
REQUEST_DEADLINE_SECONDS: float = env.float("REQUEST_DEADLINE_SECONDS", default=120.0)
CIRCUIT_FAILURE_THRESHOLD: int = env.int("CIRCUIT_FAILURE_THRESHOLD", default=5)
CIRCUIT_COOLDOWN_SECONDS: float = env.float("CIRCUIT_COOLDOWN_SECONDS", default=30.0)
LONG_CONVERSATION_TOKENS: int = env.int("LONG_CONVERSATION_TOKENS", default=8000)
MAX_INFLIGHT_PER_PROVIDER: int = env.int("MAX_INFLIGHT_PER_PROVIDER", default=64)
# Prefix of the router's shared circuit and status keys in Redis.
ROUTER_STATE_NAMESPACE: str = env.str("ROUTER_STATE_NAMESPACE", default="chat")
PRIORITY_MAX_WAIT_SECONDS: float = env.float("PRIORITY_MAX_WAIT_SECONDS", default=10.0)

# --- Requests --------------------------------------------------------------------------------
MAX_MESSAGE_CHARS: int = env.int("MAX_MESSAGE_CHARS", default=100_000)
# Messages in one prompt: a /v1 request's list, or the history read back from a conversation.
MAX_MESSAGES: int = env.int("MAX_MESSAGES", default=200)
MAX_REQUEST_BYTES: int = env.int("MAX_REQUEST_BYTES", default=1_048_576)
DATA_UPLOAD_MAX_MEMORY_SIZE = MAX_REQUEST_BYTES
STREAM_BUFFER_EVENTS: int = env.int("STREAM_BUFFER_EVENTS", default=64)
SLOW_CLIENT_TIMEOUT_SECONDS: float = env.float("SLOW_CLIENT_TIMEOUT_SECONDS", default=30.0)
API_KEY_CACHE_SECONDS: float = env.float("API_KEY_CACHE_SECONDS", default=5.0)

# --- Observability ---------------------------------------------------------------------------
# prometheus_client takes the variable's presence, not its value, as multiprocess mode: an empty
# one (a copied .env.example) wrote its value files into the working directory. Empty means unset.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR", "").strip():
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
ENABLE_METRICS: bool = env.bool("ENABLE_METRICS", default=True)
METRICS_BEARER_TOKEN: str = env.str("METRICS_BEARER_TOKEN", default="")
LOG_REQUESTS: bool = env.bool("LOG_REQUESTS", default=True)
LOG_RESPONSES: bool = env.bool("LOG_RESPONSES", default=False)
LOG_LEVEL: str = (env.str("LOG_LEVEL", default="") or "INFO").strip().upper()  # "debug" as uvicorn spells it
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
if LOG_LEVEL not in _LOG_LEVELS:
    raise ImproperlyConfigured(f"LOG_LEVEL={os.environ.get('LOG_LEVEL')!r}: expected one of {', '.join(_LOG_LEVELS)}")

# tiktoken's encodings come from the bpe-openai wheel, unpacked here; never from the network.
TIKTOKEN_CACHE_DIR: str = str(BASE_DIR / (env.str("TIKTOKEN_CACHE_DIR", default="") or ".cache/tiktoken"))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"redact_secrets": {"()": "chatservice.logging.RedactSecretsFilter"}},
    "formatters": {"json": {"()": "chatservice.logging.JsonFormatter"}},
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "json",
            "filters": ["redact_secrets"],
        }
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "httpx": {"level": "WARNING"},
        "httpx2": {"level": "WARNING"},
        "httpcore": {"level": "WARNING"},
        "httpcore2": {"level": "WARNING"},
    },
}

MICRO_DOLLAR = Decimal("0.000001")

BATCH_MAX_ITEMS: int = env.int("BATCH_MAX_ITEMS", default=20)
BATCH_CONCURRENCY: int = env.int("BATCH_CONCURRENCY", default=4)
WEBSOCKET_AUTH_TIMEOUT_SECONDS: float = env.float("WEBSOCKET_AUTH_TIMEOUT_SECONDS", default=10.0)

# Numbers outside what each setting means are refused at start, not met later as failed requests.
_PROVIDER_NAMES = ("openai", "claude", "deepseek", "gemini")  # providers.models.ProviderName (not importable here)
_unknown = [name for name in FALLBACK_ORDER if name not in _PROVIDER_NAMES]
if _unknown:
    raise ImproperlyConfigured(
        f"FALLBACK_ORDER={','.join(FALLBACK_ORDER)!r}: unknown provider(s) {', '.join(map(repr, _unknown))};"
        f" known: {', '.join(_PROVIDER_NAMES)}"
    )
for _name in (
    "PROVIDER_TIMEOUT_SECONDS",
    "FIRST_TOKEN_TIMEOUT_SECONDS",
    "STREAM_IDLE_TIMEOUT_SECONDS",
    "REQUEST_DEADLINE_SECONDS",
    "SLOW_CLIENT_TIMEOUT_SECONDS",
    "WEBSOCKET_AUTH_TIMEOUT_SECONDS",
    "TOKEN_RESERVATION_TTL_SECONDS",
):
    _at_least(_name, globals()[_name], 0, above=True)
for _name in (
    "RETRY_DELAY_SECONDS",
    "CIRCUIT_COOLDOWN_SECONDS",
    "PRIORITY_MAX_WAIT_SECONDS",
    "API_KEY_CACHE_SECONDS",
    "TEMPERATURE_DEFAULT",
    "LONG_CONVERSATION_TOKENS",
    "FREE_REQUESTS_PER_HOUR",
    "PREMIUM_REQUESTS_PER_HOUR",
    "ENTERPRISE_REQUESTS_PER_HOUR",
):
    _at_least(_name, globals()[_name], 0)
for _name in (
    "MAX_RETRY_ATTEMPTS",
    "CIRCUIT_FAILURE_THRESHOLD",
    "MAX_INFLIGHT_PER_PROVIDER",
    "MAX_TOKENS_DEFAULT",
    "MAX_MESSAGE_CHARS",
    "MAX_MESSAGES",
    "MAX_REQUEST_BYTES",
    "STREAM_BUFFER_EVENTS",
    "BATCH_MAX_ITEMS",
    "BATCH_CONCURRENCY",
):
    _at_least(_name, globals()[_name], 1)
