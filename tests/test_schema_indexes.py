"""The schema's indexes: none that another index already serves (each costs every write of its
table), and the migrations that dropped them without touching the foreign keys."""

from __future__ import annotations

from typing import Any

import pytest
from django.apps import apps
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

PROJECT_APPS = ("accounts", "chat", "providers", "usage")


def _indexes(table: str) -> dict[str, Any]:
    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, table)
    # Unique constraints and primary keys are indexes too (introspection lists them apart).
    return {name: info for name, info in constraints.items() if info["index"] or info["unique"]}


def _redundant(table: str) -> list[str]:
    """Non-unique indexes whose columns lead another index of the table: every query they could
    serve, the longer index serves too."""
    indexes = _indexes(table)
    found = []
    for name, info in indexes.items():
        if info["unique"] or info["primary_key"] or info.get("definition") or not info["columns"]:
            continue
        columns = info["columns"]
        for other, other_info in indexes.items():
            longer = other_info["columns"]
            if other != name and len(longer) > len(columns) and longer[: len(columns)] == columns:
                found.append(f"{table}.{name} (its columns lead {other})")
    return found


@pytest.mark.django_db
def test_no_index_is_served_by_a_longer_one() -> None:
    tables = [model._meta.db_table for app in PROJECT_APPS for model in apps.get_app_config(app).get_models()]
    assert "usage_usagerecord" in tables and "chat_message" in tables
    assert [name for table in tables for name in _redundant(table)] == []


@pytest.mark.django_db
def test_the_ledgers_user_lookups_have_their_composite_index() -> None:
    """What the dropped single-column indexes served, a composite index leading with the same column does."""
    expected = {
        "usage_usagerecord": "user_id",
        "usage_dailytokenusage": "user_id",
        "chat_conversation": "user_id",
        "chat_message": "conversation_id",
    }
    for table, column in expected.items():
        leading = [info["columns"] for info in _indexes(table).values() if info["columns"][:1] == [column]]
        assert leading and all(len(columns) > 1 for columns in leading), (table, leading)


LAST_BEFORE = [("chat", "0005_one_way_to_split_words_in_seeded_rules"), ("usage", "0003_usage_group_statistics")]
DROPPED = [
    ("chat_conversation", "user_id"),
    ("chat_conversation", "updated_at"),
    ("chat_message", "conversation_id"),
    ("usage_dailytokenusage", "user_id"),
    ("usage_usagerecord", "user_id"),
]


def _own_index(table: str, column: str) -> list[str]:
    return [name for name, info in _indexes(table).items() if info["columns"] == [column] and not info["unique"]]


def _foreign_keys(table: str) -> set[str]:
    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, table)
    return {name for name, info in constraints.items() if info["foreign_key"]}


@pytest.mark.django_db(transaction=True)
def test_the_migrations_drop_only_those_indexes_and_reverse() -> None:
    """Backwards, each column has its own index again (under Django's name); forwards, it is gone
    and the foreign keys and the composite indexes are untouched."""
    foreign_keys = {table: _foreign_keys(table) for table, _ in DROPPED}
    executor = MigrationExecutor(connection)
    try:
        executor.migrate(LAST_BEFORE)
        restored = {(table, column): _own_index(table, column) for table, column in DROPPED}
        assert restored[("usage_usagerecord", "user_id")] == ["usage_usagerecord_user_id_2f8497c4"]
        assert all(len(names) == 1 for names in restored.values()), restored
    finally:
        executor.loader.build_graph()
        executor.migrate(executor.loader.graph.leaf_nodes())
    assert {(table, column): _own_index(table, column) for table, column in DROPPED} == {key: [] for key in DROPPED}
    assert {table: _foreign_keys(table) for table, _ in DROPPED} == foreign_keys
