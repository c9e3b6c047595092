"""Alembic environment: nnrouter hands us its engine; there is no alembic.ini.

The database URL lives in nnrouter's config, read once; `nnrouter db upgrade`
passes the engine built from it through ``config.attributes``.
"""

from alembic import context

from nnrouter.core.store import Base

engine = context.config.attributes["engine"]

with engine.begin() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    context.run_migrations()
