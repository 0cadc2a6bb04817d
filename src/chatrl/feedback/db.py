"""The feedback database: SQLAlchemy 2 tables and `open_db`.

A conversation is a tree of messages (`parent_id`): a regenerated reply is a sibling of the one it replaces, so a
prompt is the chain of parents above a reply and "which of these replies" questions (pair choices) are questions
about children of one message. Replies the server generated carry their completion id, model name and version
and sampling settings. Feedback events point at those messages.

`open_db("runs/x/chat.db")` is SQLite in WAL mode (readers never wait for the writer; a commit survives the
process being killed), synchronous=FULL (a commit is on disk before it returns, so an acknowledged write survives
a power cut too) and a 30 s busy timeout (several processes may write). Any SQLAlchemy URL works for a shared
server database (`postgresql+psycopg://...`). The schema is brought to the newest Alembic revision on open.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Boolean, DateTime, ForeignKey, Integer, String, Text, create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from chatrl.errors import ChatrlError

MIGRATIONS = Path(__file__).parent / "migrations"
BUSY_TIMEOUT_S = 30


def utcnow() -> datetime:
    """Naive UTC: what every backend stores alike (SQLite drops time zones)."""
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class User(Base):
    """A person with an API key (stored as its SHA-256: the key is 256 random bits, so no slow hash is needed).
    The local user (no key) owns conversations of a server that has no users."""

    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    key_hash: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Conversation(Base):
    __tablename__ = "conversations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Message(Base):
    """One turn. `content_hash` (SHA-256 of the content) finds the stored reply a request continues from."""

    __tablename__ = "messages"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id"), index=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id"), index=True, nullable=True)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    content_hash: Mapped[str] = mapped_column(String(64), index=True)
    model_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    model_version: Mapped[str | None] = mapped_column(String(64), index=True, nullable=True)
    sampling: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON of the sampling settings
    completion_id: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    finish_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Feedback(Base):
    """kind "rating" (message_id, rating +1/-1, comment), "pair" (prompt_id, chosen_id, rejected_id: two replies
    to the same prompt, one preferred) or "edit" (message_id, edited: the reply as the user would have it)."""

    __tablename__ = "feedback"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    kind: Mapped[str] = mapped_column(String(8), index=True)
    message_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id"), index=True, nullable=True)
    rating: Mapped[int | None] = mapped_column(Integer, nullable=True)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    prompt_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id"), nullable=True)
    chosen_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id"), nullable=True)
    rejected_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id"), nullable=True)
    edited: Mapped[str | None] = mapped_column(Text, nullable=True)
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)


def database_url(target: str | Path) -> str:
    """A SQLAlchemy URL as given, or a file path as a SQLite URL (its folder is created)."""
    text = str(target)
    if "://" in text:
        try:
            make_url(text)
        except ArgumentError as e:
            raise ChatrlError(f"--db {text!r}: not a SQLAlchemy URL ({e})") from None
        return text
    path = Path(text).expanduser().resolve()
    if path.is_dir():
        raise ChatrlError(f"--db {text}: is a folder; give a database file such as {text.rstrip('/')}/chat.db")
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _sqlite_connect(dbapi_connection, _record) -> None:
    # the driver's own transaction handling off (it starts none before DDL, and its BEGIN is DEFERRED): the
    # "begin" listener below says BEGIN itself (SQLAlchemy's recipe for pysqlite)
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str, writer: bool = False) -> Engine:
    """An engine; for SQLite, a `writer` one begins every transaction with BEGIN IMMEDIATE: it takes the write
    lock first (waiting up to the busy timeout), so a transaction that reads and then writes never fails because
    another process committed in between (in WAL mode a DEFERRED one would, at once, without waiting)."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    # check_same_thread off: the server's writer thread and readers share the pool; timeout = busy wait
    engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False})
    event.listen(engine, "connect", _sqlite_connect)
    begin = "BEGIN IMMEDIATE" if writer else "BEGIN"
    event.listen(engine, "begin", lambda conn: conn.exec_driver_sql(begin))
    return engine


def _alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def upgrade(engine: Engine) -> str:
    """Bring the schema to the newest revision (a no-op when it is there) in one transaction of the writer `engine`
    (several processes opening a new database at once: one migrates, the others find it done); returns it."""
    cfg = _alembic_config()
    head = ScriptDirectory.from_config(cfg).get_current_head()
    with engine.connect() as conn:
        if MigrationContext.configure(conn).get_current_revision() == head:
            return head
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    except DBAPIError:
        # a server database without a writer lock: another process migrated it first ("table already exists")
        with engine.connect() as conn:
            if MigrationContext.configure(conn).get_current_revision() != head:
                raise
    return head


class Database:
    """Engines and sessions: `with db.session() as s:` to read, `with db.write() as s, s.begin():` to write."""

    def __init__(self, url: str):
        self.url = url
        try:
            self.engine = make_engine(url)
            self.write_engine = make_engine(url, writer=True) if url.startswith("sqlite") else self.engine
        except (NoSuchModuleError, ModuleNotFoundError) as e:  # unknown dialect, or its driver not installed
            raise ChatrlError(f"--db {url}: no SQLAlchemy driver for it ({e}); e.g. a file path for SQLite, or "
                              f"postgresql+psycopg://... with psycopg installed") from None
        try:
            self.revision = upgrade(self.write_engine)
        except OperationalError as e:
            raise ChatrlError(f"--db {url}: cannot open the database: {e.orig}") from None
        self.session = sessionmaker(self.engine, expire_on_commit=False)
        self.write = sessionmaker(self.write_engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()
        self.write_engine.dispose()


def open_db(target: str | Path) -> Database:
    """The database at `target` (a file path -> SQLite, or a SQLAlchemy URL), schema upgraded."""
    return Database(database_url(target))
