"""The bench's own Postgres database and Redis db, emptied at the start of each run."""

from __future__ import annotations

import subprocess
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/chat_bench"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/14"


def ensure_services() -> None:
    """Start Postgres and Redis when they are installed but stopped (the Makefile's `services`)."""
    subprocess.run([str(ROOT / "scripts" / "ensure-services.sh")], check=True, stdout=subprocess.DEVNULL)


def recreate_database(url: str) -> None:
    """Drop the database named in `url` (closing its sessions) and create it empty."""
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    if not name.startswith("chat_bench"):
        raise ValueError(f"refusing to drop {name!r}: the bench database's name must start with chat_bench")
    admin_url = urlunsplit((parts.scheme, parts.netloc, "/postgres", parts.query, ""))
    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def flush_redis(url: str) -> None:
    """Empty the bench's Redis db (rate-limit windows and circuit state of earlier runs)."""
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()
