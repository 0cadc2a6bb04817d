"""Alembic environment of the feedback database. `chatrl.feedback.db.upgrade` runs it with an open connection
(`config.attributes["connection"]`); the `alembic` command works too with `-x url=sqlite:///chat.db`:
`alembic -c /dev/null -x url=... upgrade head` after `script_location` points here."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from chatrl.feedback.db import Base

config = context.config
target_metadata = Base.metadata


def _run(connection) -> None:
    # render_as_batch: SQLite alters a table by copying it, which batch mode does for later revisions
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    with create_engine(url).connect() as conn:
        _run(conn)
        conn.commit()


if context.is_offline_mode():
    raise RuntimeError("the feedback migrations run online only (chatrl.feedback.db.open_db runs them)")
run_migrations_online()
