"""Fixtures shared by the unit tests of the API."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from fleet.store.migrate import upgrade
from fleet.store.session import Store


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated SQLite file; each test copies it (migrating is the slow part)."""
    path = tmp_path_factory.mktemp("template") / "virtfleet.db"
    upgrade(f"sqlite:///{path}")
    return path


PG_ENV = "VIRTFLEET_TEST_PG_URL"


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database, not migrated: a SQLite file, then a PostgreSQL schema of its own
    (dropped afterwards) from VIRTFLEET_TEST_PG_URL, skipped only when that is unset."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"{PG_ENV} is not set: PostgreSQL tests need it")
    schema = f"vf_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, connect_args={"connect_timeout": 10})
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except OperationalError as exc:
        admin.dispose()
        pytest.fail(f"{PG_ENV} is set but PostgreSQL is unreachable: {exc.orig}")
    url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def store(empty_db_url: str) -> Iterator[Store]:
    """A migrated store: a SQLite file, then a PostgreSQL schema (empty_db_url), with the
    process's host caches forgotten before and after (scheduler/hostcache.py)."""
    from scheduler import hostcache
    upgrade(empty_db_url)
    s = Store(empty_db_url)
    hostcache.reset()
    try:
        yield s
    finally:
        hostcache.reset()
        s.dispose()
