"""Shared fixtures: the sandbox upstream on a real port, users with keys, clean caches."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.apps import apps as django_apps
from django.conf import settings

from accounts.selectors import key_cache
from providers.catalog import catalog_cache
from providers.registry import registry
from providers.sandbox.app import create_sandbox_app
from providers.sandbox.faults import SandboxState
from tests.aliases import expand
from tests.sandbox_server import BackgroundServer


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("chat service")
    group.addoption("--mock", action="store_true", help="integration tests against the sandbox upstream (default)")
    group.addoption(
        "--api-keys",
        action="store_true",
        help="integration tests against the real providers, with the keys in the environment",
    )


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    return expand(file_path, parent)


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup: None, django_db_blocker: Any) -> Iterator[None]:
    """The test database, whose other sessions (server threads keep their connections, as in
    production) are ended before it is dropped."""
    yield
    with django_db_blocker.unblock():
        from django.db import connection

        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )


@pytest.fixture(scope="session")
def sandbox_server() -> Iterator[BackgroundServer]:
    state = SandboxState()
    server = BackgroundServer(create_sandbox_app(state)).start()
    server.state = state  # type: ignore[attr-defined]
    yield server
    server.stop()


@pytest.fixture
def sandbox(sandbox_server: BackgroundServer) -> Iterator[SandboxState]:
    """The sandbox's record of requests, fresh for each test; every provider points at it."""
    state: SandboxState = sandbox_server.state  # type: ignore[attr-defined]
    state.reset()
    old = settings.SANDBOX_URL
    settings.SANDBOX_URL = sandbox_server.url
    registry.reset()
    yield state
    settings.SANDBOX_URL = old
    registry.reset()


@pytest.fixture(autouse=True)
def _router_state_namespace(settings: Any) -> None:
    """Each test gets its own circuit and status keys in Redis (failures in one test do not
    open a circuit in the next)."""
    settings.ROUTER_STATE_NAMESPACE = f"test-{uuid.uuid4().hex}"


@pytest.fixture(autouse=True)
def _clean_caches() -> Iterator[None]:
    from chat.filtering import rule_cache

    key_cache.clear()
    catalog_cache.invalidate()
    rule_cache.invalidate()
    yield
    key_cache.clear()
    catalog_cache.invalidate()
    rule_cache.invalidate()
    registry.reset()


def _seed() -> None:
    """Re-apply the data migrations' seed (a transactional test's flush empties those tables)."""
    import importlib

    for module in (
        "accounts.migrations.0002_seed_plans",
        "providers.migrations.0002_seed_catalog",
        "chat.migrations.0003_seed_content_rules",
    ):
        importlib.import_module(module).seed(django_apps, None)


@pytest.fixture(autouse=True)
def _seeded(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("django_db") is None:
        return
    request.getfixturevalue("django_db_setup")
    marker = request.node.get_closest_marker("django_db")
    fixture = "transactional_db" if marker and marker.kwargs.get("transaction") else "db"
    request.getfixturevalue(fixture)
    from accounts.models import Plan

    if not Plan.objects.exists():
        _seed()


@pytest.fixture
def make_user(db: None) -> Callable[..., tuple[Any, str]]:
    """Create a user on a plan with a fresh API key: returns (user, raw_key)."""
    from accounts.services import api_key_create, user_get_or_create

    counter = {"n": 0}

    def make(plan: str = "premium", username: str | None = None, **overrides: Any) -> tuple[Any, str]:
        counter["n"] += 1
        user, _ = user_get_or_create(username=username or f"user{counter['n']}", plan_name=plan)
        for field, value in overrides.items():
            setattr(user, field, value)
        if overrides:
            user.save()
        return user, api_key_create(user=user).raw_key

    return make


@pytest.fixture(scope="session")
def _service_server() -> Iterator[BackgroundServer]:
    from chatservice.asgi import application

    server = BackgroundServer(application).start()
    yield server
    registry.reset()  # closes the clients the server's loop opened, while it still runs
    server.stop()


@pytest.fixture
def service_server(_service_server: BackgroundServer) -> BackgroundServer:
    return _service_server


@pytest.fixture
def service_url(_service_server: BackgroundServer, sandbox: SandboxState, transactional_db: None) -> str:
    """The whole service (the ASGI app) on a loopback port, providers on the test sandbox.

    Tests that use it see the server's writes because they run with transactional_db.
    """
    return _service_server.url
