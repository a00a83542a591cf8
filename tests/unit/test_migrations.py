"""Alembic migrations on SQLite and PostgreSQL: the head matches the models exactly, 0004
keeps existing VMs (with their defaults), and it goes down and up again."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from fleet.store.migrate import alembic_config, upgrade
from fleet.store.models import Base


def drift(url: str) -> list[object]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))
    finally:
        engine.dispose()


def test_head_matches_the_models(empty_db_url: str) -> None:
    upgrade(empty_db_url)
    assert drift(empty_db_url) == []


def test_0004_keeps_vms_and_goes_down_and_up(empty_db_url: str) -> None:
    upgrade(empty_db_url, "0003")
    engine = create_engine(empty_db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO projects (name, created_at) VALUES ('p', "
                              "CURRENT_TIMESTAMP)"))
            pid = conn.execute(text("SELECT id FROM projects")).scalar_one()
            conn.execute(text(
                "INSERT INTO images (id, name, project_id, visibility, sha256, size_bytes, "
                "virtual_size_bytes, disk_format, source, created_at) VALUES ('i', 'img', "
                ":p, 'private', 'ab', 0, 0, 'qcow2', '', CURRENT_TIMESTAMP)"), {"p": pid})
            conn.execute(text(
                "INSERT INTO vms (id, name, project_id, image_id, vcpus, memory_mb, disk_gb, "
                "user_data, state, state_reason, failed_step, alternates, constraints, "
                "attempts, mac, created_at, updated_at) VALUES ('v', 'vm', :p, 'i', 1, 64, 1, "
                "'', 'running', '', '', '[]', '{}', 0, '', CURRENT_TIMESTAMP, "
                "CURRENT_TIMESTAMP)"), {"p": pid})
        upgrade(empty_db_url)
        with engine.connect() as conn:
            row = conn.execute(text("SELECT address_mode, static_address, network_id, "
                                    "ready_at, keypairs, ssh_keys FROM vms")).one()
        assert row[:4] == ("dhcp", "", None, None)
        assert row[4] in ([], "[]") and row[5] in ([], "[]")
        tables = set(inspect(engine).get_table_names())
        assert {"keypairs", "networks", "ip_allocations"} <= tables

        command.downgrade(alembic_config(empty_db_url), "0003")
        engine.dispose()
        tables = set(inspect(engine).get_table_names())
        assert not {"keypairs", "networks", "ip_allocations"} & tables
        columns = {c["name"] for c in inspect(engine).get_columns("vms")}
        assert "ready_at" not in columns and "network_id" not in columns
        with engine.connect() as conn:
            assert conn.execute(text("SELECT name FROM vms")).scalar_one() == "vm"

        upgrade(empty_db_url)
        engine.dispose()
        assert drift(empty_db_url) == []
    finally:
        engine.dispose()
