"""Engine and session factory for the store; SQLite gets WAL and a busy timeout.

Owns how the control plane connects to its database. Hosts never import this module.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str, immediate: bool = True) -> Engine:
    """An engine; on SQLite, `immediate` transactions take the write lock at BEGIN (for
    writers), otherwise statements run on their own (for readers, which WAL never blocks)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            dbapi_conn.isolation_level = None  # let SQLAlchemy's BEGIN below take over
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        if immediate:
            @event.listens_for(engine, "begin")
            def _begin(conn) -> None:  # type: ignore[no-untyped-def]
                # IMMEDIATE: take the write lock at BEGIN, so a read-then-CAS never deadlocks.
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


class Store:
    """A database: an engine and a session factory."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._writes = sessionmaker(self.engine, expire_on_commit=False)
        self.read_engine = make_engine(url, immediate=False) if url.startswith("sqlite") \
            else self.engine
        self.sessions = sessionmaker(self.read_engine, expire_on_commit=False)
        """Sessions for reading (on SQLite they never wait for the writer)."""
        # SQLite has one writer at a time, and its busy handler sleeps up to 100 ms between
        # retries: threads of one process queue on this lock instead, in order, at once.
        self._write_lock: threading.Lock | None = (
            threading.Lock() if url.startswith("sqlite") else None)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A write transaction: committed on success, rolled back on error."""
        if self._write_lock is None:
            with self._writes() as s, s.begin():
                yield s
            return
        with self._write_lock, self._writes() as s, s.begin():
            yield s

    def dispose(self) -> None:
        self.engine.dispose()
        self.read_engine.dispose()
