"""Alembic environment. Migrations run only in-process, on a connection Conveyor hands over."""

from alembic import context

from conveyor.storage.migrate import VERSION_TABLE
from conveyor.storage.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("Conveyor's migrations run through `conveyor db upgrade`, not the alembic command")

context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
