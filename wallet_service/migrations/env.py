"""Alembic environment: the models' metadata, the URL from wallet_service.migrate."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from wallet_service import models  # noqa: F401  (registers the tables)
from wallet_service.db import Base

url = context.config.get_main_option("sqlalchemy.url")
assert url is not None
engine = create_engine(url)
with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
engine.dispose()
