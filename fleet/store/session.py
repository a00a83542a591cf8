"""Engine and session factory for the store; SQLite gets WAL and a busy timeout.

Owns how the control plane connects to its database. Hosts never import this module.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

TXN_KEY = "virtfleet.txn"
"""Where a `Store.transaction()` connection keeps its Transaction (conn.info)."""


class Transaction:
    """What code running in a `Store.transaction()` may hang on it: data that lives as long
    as the transaction, and what to run once it has committed (a cache taking the
    transaction's writes). A savepoint's rollback drops the data and the callbacks, as the
    writes they stood for may be gone."""

    def __init__(self) -> None:
        self.data: dict[Any, Any] = {}
        self._after_commit: list[Callable[[], None]] = []

    def after_commit(self, fn: Callable[[], None]) -> None:
        self._after_commit.append(fn)

    def forget(self) -> None:
        self.data.clear()
        self._after_commit.clear()

    def committed(self) -> None:
        for fn in self._after_commit:
            fn()


def transaction_of(conn: Connection) -> Transaction | None:
    """The Transaction of a connection inside `Store.transaction()`, else None."""
    return conn.info.get(TXN_KEY)  # type: ignore[no-any-return]


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
                # Straight on the driver's connection: the same statement, without
                # SQLAlchemy's per-statement work (a placement decision is ~1 ms in all).
                conn.connection.driver_connection.execute("BEGIN IMMEDIATE")

        @event.listens_for(engine, "rollback_savepoint")
        def _savepoint_gone(conn, _name, _context) -> None:  # type: ignore[no-untyped-def]
            txn = transaction_of(conn)
            if txn is not None:
                txn.forget()

        return engine
    # No pool_pre_ping: it cost a round trip (a SELECT 1) per checkout, about as much as a
    # placement decision's claim. A connection the server dropped fails its statement
    # instead, and SQLAlchemy then invalidates the pool's connections, so only the
    # transactions in flight at a database restart fail. pool_recycle bounds their age.
    engine = create_engine(url, pool_size=10, max_overflow=20, pool_recycle=3600)

    @event.listens_for(engine, "rollback_savepoint")
    def _pg_savepoint_gone(conn, _name, _context) -> None:  # type: ignore[no-untyped-def]
        txn = transaction_of(conn)
        if txn is not None:
            txn.forget()

    return engine


_NO_LOCK = threading.Lock()


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
        self._writer: Connection | None = None
        """SQLite: the one connection `transaction()` writes on (under the write lock), kept
        between transactions: a pool checkout and a new Connection cost more than a
        placement decision's statements."""

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A write transaction: committed on success, rolled back on error."""
        if self._write_lock is None:
            with self._writes() as s, s.begin():
                yield s
            return
        with self._write_lock, self._writes() as s, s.begin():
            yield s

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A write transaction on a Core connection (no ORM Session: its bookkeeping costs
        more than a small transaction's statements): committed on success, rolled back on
        error. Code inside may hang data and after-commit work on it (`transaction_of`)."""
        if self._write_lock is None:
            with self.engine.connect() as conn:
                yield from self._run(conn)
            return
        with self._write_lock:
            conn = self._writer
            if conn is None or conn.closed or conn.invalidated:
                conn = self._writer = self.engine.connect()
            yield from self._run(conn)

    @staticmethod
    def _run(conn: Connection) -> Iterator[Connection]:
        txn = conn.info[TXN_KEY] = Transaction()
        try:
            with conn.begin():
                yield conn
        except BaseException:
            txn.forget()
            raise
        finally:
            conn.info.pop(TXN_KEY, None)
        txn.committed()

    def dispose(self) -> None:
        with self._write_lock or _NO_LOCK:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        self.engine.dispose()
        self.read_engine.dispose()
