"""Engine and session factory for the store; SQLite gets WAL and a busy timeout.

Owns how the control plane connects to its database. Hosts never import this module.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

timing_log = logging.getLogger("fleet.store.timing")

TIMINGS_ENV = "VIRTFLEET_STORE_TIMINGS"
"""Set (to anything but 0 or empty) to log every SQLite write transaction's wait for the
writer lock and how long it held it, with the function that wrote (bench burst reads it)."""

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
        self._after_end: list[Callable[[], None]] = []

    def after_commit(self, fn: Callable[[], None]) -> None:
        self._after_commit.append(fn)

    def after_end(self, fn: Callable[[], None]) -> None:
        """Run `fn` once the transaction has ended, committed (after the after_commit
        callbacks) or rolled back; a savepoint's rollback does not drop it."""
        self._after_end.append(fn)

    def forget(self) -> None:
        self.data.clear()
        self._after_commit.clear()

    def committed(self) -> None:
        for fn in self._after_commit:
            fn()

    def ended(self) -> None:
        for fn in self._after_end:
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
            if immediate:
                # Checkpoints run beside the writers (Checkpointer), not in the commit that
                # crosses 1,000 WAL pages: that commit also waited for the checkpoint's fsync
                # (milliseconds, at times hundreds). This bound only applies should the
                # checkpointer fall behind.
                cur.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
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

KEPT_CONNECTIONS = 4
"""PostgreSQL connections of each kind a Store keeps open between `transaction()`s."""

WAL_AUTOCHECKPOINT_PAGES = 16384
"""A commit checkpoints the WAL itself only past this many pages (64 MiB at 4 KiB)."""

CHECKPOINT_INTERVAL = 0.5
"""Seconds between two looks at the WAL's size by a process's checkpointer."""

CHECKPOINT_AT_BYTES = 4 * 1024 * 1024
"""WAL size from which the checkpointer copies it into the database (SQLite's own default is
1,000 pages)."""


class Checkpointer:
    """Copies a SQLite WAL into its database beside the writers, in a daemon thread of each
    process that writes (started at its first write; a fork starts its own).

    A PASSIVE checkpoint waits for no one and blocks no one: frames a reader still needs are
    left for the next round; writers go on appending meanwhile, and the next writer after a
    complete checkpoint starts the WAL over. Durability is SQLite's WAL with
    synchronous=NORMAL either way; only who pays for the checkpoint's fsync changes.
    """

    def __init__(self, database: str) -> None:
        self.database = database
        self.wal = database + "-wal"
        self._pid = 0
        self._stop = threading.Event()
        self.checkpoints = 0

    def ensure_running(self) -> None:
        if self._pid == os.getpid() or self._stop.is_set():
            return
        self._pid = os.getpid()
        threading.Thread(target=self._run, name="sqlite-checkpointer", daemon=True).start()

    def _run(self) -> None:
        import sqlite3
        conn = sqlite3.connect(self.database, timeout=1, isolation_level=None,
                               check_same_thread=False)
        try:
            while not self._stop.wait(CHECKPOINT_INTERVAL):
                if not os.path.exists(self.database):
                    return  # removed (a test's temporary store)
                try:
                    if os.path.getsize(self.wal) < CHECKPOINT_AT_BYTES:
                        continue
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.checkpoints += 1
                except (OSError, sqlite3.Error):
                    continue  # no WAL yet, or busy: the next round tries again
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()


class WriterLock:
    """One writer at a time on a SQLite file, across threads and processes, woken at once.

    SQLite lets one transaction write at a time, and a writer that finds the file locked
    sleeps in its busy handler (up to 100 ms between tries) while the lock may long be free:
    under a burst of creates in several API processes plus the scheduler, those sleeps were
    most of each answer's seconds. Threads of one process queue on a thread lock; processes
    then queue on an flock of `<database>.writelock`, which the kernel hands over as soon as
    it is released. BEGIN IMMEDIATE then finds SQLite's own lock free (its busy handler
    remains for writers that do not take this lock, like the sqlite3 shell).
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._thread = threading.Lock()
        self._fd: int | None = None
        self._pid = 0
        self.timings = os.environ.get(TIMINGS_ENV, "") not in ("", "0")
        if self.timings:
            timing_log.setLevel(logging.INFO)

    def _file(self) -> int:
        # Opened in each process (an flock belongs to an open file: one inherited across a
        # fork, as gunicorn's workers inherit the app, would not keep them apart).
        if self._fd is None or self._pid != os.getpid():
            assert self.path is not None
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except PermissionError:  # made by another user: an flock needs no write access
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            self._pid = os.getpid()
        return self._fd

    @contextmanager
    def held(self) -> Iterator[None]:
        t0 = time.perf_counter()
        with self._thread:
            fd = self._file() if self.path is not None else None
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            t1, c1 = time.perf_counter(), time.thread_time()
            try:
                yield
            finally:
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                if self.timings:
                    t2, c2 = time.perf_counter(), time.thread_time()
                    timing_log.info("store write by %s: waited %.1f ms, held %.1f ms "
                                    "(%.1f ms of this thread's CPU)", _writer_name(),
                                    (t1 - t0) * 1000, (t2 - t1) * 1000, (c2 - c1) * 1000)


def _writer_name() -> str:
    """The function that opened the write transaction (outside this module and contextlib)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename in (__file__, _CONTEXTLIB):
        frame = frame.f_back  # type: ignore[assignment]
    return frame.f_code.co_name if frame is not None else "?"


_CONTEXTLIB = contextmanager.__code__.co_filename


def _lock_path(url: str) -> str | None:
    """Where the writer lock of a SQLite file lives (None in memory)."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return os.path.abspath(database) + ".writelock"


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
        # retries: writers queue on this lock instead (threads, then processes), at once.
        self._write_lock: WriterLock | None = (
            WriterLock(_lock_path(url)) if url.startswith("sqlite") else None)
        self._writer: Connection | None = None
        self._writer_pid = 0
        path = _lock_path(url) if url.startswith("sqlite") else None
        self._checkpointer: Checkpointer | None = (
            Checkpointer(path.removesuffix(".writelock")) if path is not None else None)
        self._autocommit: Engine | None = None
        self._kept: dict[bool, list[Connection]] = {True: [], False: []}
        """PostgreSQL: connections kept open between `transaction()`s, autocommit ones
        (single statement) and the others (see `_on_kept`)."""
        self._kept_lock = threading.Lock()
        self._kept_pid = os.getpid()
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
        if self._checkpointer is not None:
            self._checkpointer.ensure_running()
        with self._write_lock.held(), self._writes() as s, s.begin():
            yield s

    @contextmanager
    def transaction(self, single_statement: bool = False) -> Iterator[Connection]:
        """A write transaction on a Core connection (no ORM Session: its bookkeeping costs
        more than a small transaction's statements): committed on success, rolled back on
        error. Code inside may hang data and after-commit work on it (`transaction_of`).

        `single_statement`: the caller's writes are one statement that must stand alone (a
        placement decision whose claim and row are one statement: claims.PlacedRow), so on
        PostgreSQL each statement commits by itself, as its own transaction: no BEGIN and
        COMMIT round trips around it (durability as configured: synchronous_commit). A
        lost compare-and-set before it writes nothing. SQLite runs it as one transaction
        anyway (in-process, BEGIN and COMMIT cost no round trip)."""
        if self._write_lock is None:
            yield from self._on_kept(single_statement)
            return
        if self._checkpointer is not None:
            self._checkpointer.ensure_running()
        with self._write_lock.held():
            conn = self._writer
            if conn is None or self._writer_pid != os.getpid() or conn.closed \
                    or conn.invalidated:
                # (A connection made before a fork stays with the parent.)
                conn = self._writer = self.engine.connect()
                self._writer_pid = os.getpid()
            yield from self._run(conn)

    def _on_kept(self, autocommit: bool) -> Iterator[Connection]:
        """`_run` on a connection kept open between transactions (PostgreSQL; taken from a
        short stack, a new one when it is empty; `autocommit`: one of the autocommit
        engine's): a pool checkout and a new Connection cost ~0.05 ms of CPU, a twentieth
        of a placement decision. At most KEPT_CONNECTIONS of each kind are kept; one that
        failed (invalidated) or that another process made is not reused."""
        conn = None
        with self._kept_lock:
            if self._kept_pid != os.getpid():  # a fork's: those are the parent's
                self._kept, self._kept_pid = {True: [], False: []}, os.getpid()
            stack = self._kept[autocommit]
            while stack and conn is None:
                conn = stack.pop()
                if conn.closed or conn.invalidated:
                    conn = None
        if conn is None:
            conn = (self._autocommit_engine() if autocommit else self.engine).connect()
        try:
            yield from self._run(conn)
        finally:
            keep = not (conn.closed or conn.invalidated or conn.in_transaction())
            with self._kept_lock:
                stack = self._kept[autocommit]
                if keep and len(stack) < KEPT_CONNECTIONS and self._kept_pid == os.getpid():
                    stack.append(conn)
                    conn = None
            if conn is not None:
                conn.close()

    def _autocommit_engine(self) -> Engine:
        """PostgreSQL: connections that are always in autocommit (no isolation level to set
        and reset at each checkout, nothing to roll back at each return)."""
        if self._autocommit is None:
            self._autocommit = create_engine(self.url, isolation_level="AUTOCOMMIT",
                                             pool_size=5, max_overflow=20, pool_recycle=3600,
                                             pool_reset_on_return=None)
        return self._autocommit

    @staticmethod
    def _run(conn: Connection) -> Iterator[Connection]:
        txn = conn.info[TXN_KEY] = Transaction()
        try:
            try:
                with conn.begin():
                    yield conn
            except BaseException:
                txn.forget()
                raise
            finally:
                conn.info.pop(TXN_KEY, None)
            txn.committed()
        finally:
            txn.ended()

    def dispose(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
        with self._write_lock._thread if self._write_lock is not None else _NO_LOCK:
            if self._writer is not None and self._writer_pid == os.getpid():
                self._writer.close()
            self._writer = None
        with self._kept_lock:
            kept, self._kept = self._kept, {True: [], False: []}
        for conn in [*kept[True], *kept[False]] if self._kept_pid == os.getpid() else ():
            conn.close()
        if self._autocommit is not None:
            self._autocommit.dispose()
        self.engine.dispose()
        self.read_engine.dispose()
