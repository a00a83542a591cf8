"""A fresh web worker warms up before it serves (web/warmup.py): the host cache read, the
dispatcher's connection made; a failure is logged and never stops the worker; gunicorn runs
it in each worker once forked (web/server.py)."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from fleet.config import load_settings
from fleet.store.models import Host
from fleet.store.session import Store
from scheduler import hostcache
from tests.unit.test_api import Recorder
from web import create_app, server
from web.warmup import warm_up


class WarmRecorder(Recorder):
    warmed: int = 0
    broken: bool = False

    def warm_up(self) -> None:
        if self.broken:
            raise ConnectionError("broker down")
        self.warmed += 1


def make_app(tmp_path: Path, migrated_db: Path, dispatcher: Any) -> tuple[Any, Store]:
    state = tmp_path / "state"
    state.mkdir()
    shutil.copyfile(migrated_db, state / "virtfleet.db")
    settings = load_settings(env={"VIRTFLEET_STATE_DIR": str(state), "VIRTFLEET_CONFIG": "",
                                  "VIRTFLEET_HOST_NAME": "controller"})
    store = Store(settings.db_url)
    with store.session() as s:
        s.add(Host(name="node1", vcpus=4, memory_mb=4096, disk_gb=100, labels={},
                   cached_images=[]))
    app = create_app(test_config={"TESTING": True, "STORE": store, "DISPATCHER": dispatcher,
                                  "BUS": None}, settings=settings)
    return app, store


@pytest.fixture(autouse=True)
def _no_caches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    monkeypatch.setattr("fleet.config.DEFAULT_CONFIG_FILE", tmp_path / "absent.toml")
    hostcache.reset()
    yield
    hostcache.reset()


def test_a_warm_up_reads_the_hosts_and_connects_the_dispatcher(
        tmp_path: Path, migrated_db: Path) -> None:
    dispatcher = WarmRecorder()
    app, store = make_app(tmp_path, migrated_db, dispatcher)
    try:
        assert list(hostcache.caches()) == []
        warm_up(app)
        (cache,) = hostcache.caches()
        assert cache.reloads == 1
        assert [h.name for h in cache.table(app.extensions["virtfleet.settings"])] == ["node1"]
        assert dispatcher.warmed == 1 and dispatcher.calls == []  # nothing sent
        with store.sessions() as s:
            assert s.scalars(select(Host.name)).all() == ["node1"]  # nothing written
    finally:
        store.dispose()


def test_a_failed_warm_up_is_logged_and_the_worker_serves(
        tmp_path: Path, migrated_db: Path, caplog: pytest.LogCaptureFixture) -> None:
    dispatcher = WarmRecorder()
    dispatcher.broken = True
    app, store = make_app(tmp_path, migrated_db, dispatcher)
    try:
        with caplog.at_level(logging.WARNING, logger="web.warmup"):
            warm_up(app)
        assert "warm-up incomplete (ConnectionError: broker down)" in caplog.text
        assert app.test_client().get("/api/v1/openapi.json").status_code == 200
    finally:
        store.dispose()


def test_gunicorn_warms_each_worker_up_once_forked(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    ran: dict[str, Any] = {}

    class Gunicorn:
        def __init__(self, app: Any, options: dict[str, Any]) -> None:
            ran["app"], ran["options"] = app, options

        def run(self) -> None:
            ran["options"]["post_worker_init"](object())  # as gunicorn does in a worker

    monkeypatch.setattr(server, "_Gunicorn", Gunicorn)
    monkeypatch.setattr("web.create_app", lambda settings: "the app")
    monkeypatch.setattr("web.warmup.warm_up", lambda app: ran.setdefault("warmed", app))
    monkeypatch.setattr(server, "keep_freed_memory", lambda: True)
    switch = sys.getswitchinterval()
    try:
        server.serve(load_settings(env={"VIRTFLEET_STATE_DIR": str(tmp_path),
                                        "VIRTFLEET_CONFIG": ""}))
    finally:
        sys.setswitchinterval(switch)
    assert ran["app"] == "the app" and ran["warmed"] == "the app"
