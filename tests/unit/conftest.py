"""Fixtures shared by the unit tests of the API."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.store.migrate import upgrade


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated SQLite file; each test copies it (migrating is the slow part)."""
    path = tmp_path_factory.mktemp("template") / "virtfleet.db"
    upgrade(f"sqlite:///{path}")
    return path
