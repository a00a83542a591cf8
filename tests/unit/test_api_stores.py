"""The API's create path on both stores: a migrated SQLite file, then PostgreSQL (the
`store` fixture; skipped only when VIRTFLEET_TEST_PG_URL is unset). On PostgreSQL the claim
runs on libpq inside the create's transaction (fleet/store/fast.py), so what a user sees of
a create, a refusal and a rollback is checked there too: the VMs, their claims and the
host's used capacity agree, and a refused or failed create leaves nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select

from fleet.config import load_settings
from fleet.store.models import VM, Claim, Host, Image, Job, Project
from fleet.store.session import Store
from tests.unit.test_api import SHA, Recorder
from web import create_app
from web.auth import create_token

HOST_MEMORY = 1024


@pytest.fixture
def api(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
        ) -> Iterator[tuple[FlaskClient, Recorder, dict[str, str]]]:
    monkeypatch.setattr("fleet.config.DEFAULT_CONFIG_FILE", tmp_path / "absent.toml")
    (tmp_path / "state").mkdir()
    settings = load_settings(env={"VIRTFLEET_STATE_DIR": str(tmp_path / "state"),
                                  "VIRTFLEET_CONFIG": "", "VIRTFLEET_HOST_NAME": "controller",
                                  "VIRTFLEET_DATABASE_URL": store.url})
    with store.session() as s:
        token = create_token(s, "alice", "team-a")
        team = s.scalars(select(Project).where(Project.name == "team-a")).one()
        s.add(Image(id="img-a", name="debian", project_id=team.id, sha256=SHA,
                    size_bytes=1000, disk_format="qcow2"))
        for name in ("node1", "node2"):
            s.add(Host(name=name, vcpus=8, memory_mb=HOST_MEMORY, disk_gb=100, cpu_ratio=1.0,
                       ram_ratio=1.0, disk_ratio=1.0, labels={}, cached_images=[]))
    recorder = Recorder()
    app = create_app(test_config={"TESTING": True, "STORE": store, "DISPATCHER": recorder,
                                  "BUS": None}, settings=settings)
    yield app.test_client(), recorder, {"Authorization": f"Bearer {token}"}


def create(client: FlaskClient, auth: dict[str, str], name: str, **kw: Any) -> Any:
    body = {"name": name, "image": "debian", "vcpus": 1, "memory_mb": 512, "disk_gb": 2, **kw}
    return client.post("/api/v1/vms", json=body, headers=auth)


def state(store: Store) -> tuple[int, int, dict[str, int]]:
    """VMs, claims, and each host's used memory (which must be the sum of its claims)."""
    with store.sessions() as s:
        claimed = dict(s.execute(select(Claim.host_id, func.sum(Claim.memory_mb))
                                 .group_by(Claim.host_id)).all())
        used = {}
        for host in s.scalars(select(Host)):
            assert host.used_memory_mb == claimed.get(host.id, 0), host.name
            used[host.name] = host.used_memory_mb
        return (s.scalar(select(func.count(VM.id))) or 0,
                s.scalar(select(func.count(Claim.id))) or 0, used)


def test_creates_fill_the_hosts_then_are_refused_and_a_failed_one_leaves_nothing(
        store: Store, api: tuple[FlaskClient, Recorder, dict[str, str]]) -> None:
    client, recorder, auth = api
    resp = create(client, auth, "web", count=3)
    assert resp.status_code == 202, resp.get_data(as_text=True)
    hosts = sorted(call[1] for call in recorder.calls)
    assert hosts == ["node1", "node1", "node2"] or hosts == ["node1", "node2", "node2"]
    assert state(store) == (3, 3, {"node1": 512 * hosts.count("node1"),
                                   "node2": 512 * hosts.count("node2")})
    # A group's create goes through the ORM session's transaction: the same claim.
    group = client.post("/api/v1/server-groups", json={"name": "g", "policy": "anti-affinity"},
                        headers=auth)
    assert group.status_code == 201, group.get_data(as_text=True)
    assert create(client, auth, "db", server_group="g").status_code == 202
    assert state(store)[:2] == (4, 4)
    # Room for 4 of 512 MiB: the next ones are refused, all or nothing, and store nothing.
    refused = create(client, auth, "more", count=2)
    assert refused.status_code == 409 and "no host" in refused.get_json()["message"]
    assert state(store) == (4, 4, {"node1": 1024, "node2": 1024})
    # Room for one more: two are refused inside the write transaction, after the first one's
    # claim went through, and its rollback undoes that claim.
    with store.session() as s:  # more memory, as a host's heartbeat reports it
        s.execute(Host.__table__.update().where(Host.name == "node1").values(
            memory_mb=HOST_MEMORY + 512, generation=Host.generation + 1))
    refused = create(client, auth, "pair", count=2)
    assert refused.status_code == 409 and "no host" in refused.get_json()["message"]
    assert state(store) == (4, 4, {"node1": 1024, "node2": 1024})
    # The build cannot be sent: the create's transaction is undone, its claim with it.
    with store.session() as s:  # more memory, as a host's heartbeat reports it
        s.execute(Host.__table__.update().values(memory_mb=4096,
                                                 generation=Host.generation + 1))
    recorder.fail = True
    assert create(client, auth, "late").status_code == 503
    recorder.fail = False
    assert state(store) == (4, 4, {"node1": 1024, "node2": 1024})
    with store.sessions() as s:
        assert s.scalar(select(func.count(Job.id))) == 4
    assert create(client, auth, "late").status_code == 202
    assert state(store)[:2] == (5, 5)
