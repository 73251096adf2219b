"""Migration operations Django does not ship."""

from __future__ import annotations

from django.db import migrations
from django.db.backends.base.schema import BaseDatabaseSchemaEditor
from django.db.migrations.state import ProjectState


class DropFieldIndex(migrations.AlterField):
    """`AlterField` to the same field with `db_index=False` whose database side only drops the
    column's own single-column index (concurrently on Postgres), and reversed, creates it again.

    Django's own AlterField of a foreign key also drops and re-adds the constraint, and adding it
    back re-checks every row of the table under a lock that blocks its writes. The index is
    found by introspection, whatever its name: a non-unique index on that column alone, so a
    composite or unique index that starts with the column stays. A migration using this must set
    `atomic = False` (Postgres' DROP INDEX CONCURRENTLY cannot run in a transaction).
    """

    def database_forwards(
        self, app_label: str, schema_editor: BaseDatabaseSchemaEditor, from_state: ProjectState, to_state: ProjectState
    ) -> None:
        table, column = self._table_and_column(app_label, to_state)
        connection = schema_editor.connection
        with connection.cursor() as cursor:
            constraints = connection.introspection.get_constraints(cursor, table)
        for name, info in constraints.items():
            if info["index"] and not info["unique"] and not info["primary_key"] and info["columns"] == [column]:
                schema_editor.execute(f"DROP INDEX {_concurrently(schema_editor)}{schema_editor.quote_name(name)}")

    def database_backwards(
        self, app_label: str, schema_editor: BaseDatabaseSchemaEditor, from_state: ProjectState, to_state: ProjectState
    ) -> None:
        table, column = self._table_and_column(app_label, from_state)
        quote = schema_editor.quote_name
        # The name Django gives it (the stubs do not list the method: it is the schema editor's own).
        name = schema_editor._create_index_name(table, [column], suffix="")  # type: ignore[attr-defined]
        schema_editor.execute(
            f"CREATE INDEX {_concurrently(schema_editor)}{quote(name)} ON {quote(table)} ({quote(column)})"
        )

    def _table_and_column(self, app_label: str, state: ProjectState) -> tuple[str, str]:
        model = state.apps.get_model(app_label, self.model_name)
        return str(model._meta.db_table), str(model._meta.get_field(self.name).column)

    def describe(self) -> str:
        return f"Drop the index of {self.model_name}.{self.name} alone"


def _concurrently(schema_editor: BaseDatabaseSchemaEditor) -> str:
    return "CONCURRENTLY " if schema_editor.connection.vendor == "postgresql" else ""
