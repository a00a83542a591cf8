"""The build's overlay and seed steps, the seed written on its own thread while qemu-img makes
the overlay (image cache and qemu-img stubbed, libvirt's test:///default driver): both made,
steps reported in order; a failed overlay or a failed seed names its step, and the instance
directory is gone afterwards even though the seed thread was still writing into it."""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet import contract as c
from fleet.exceptions import BuildError
from worker import build, cache, images, seed
from worker.build import HostContext
from worker.domain import HostSettings, instance_paths
from worker.seed import read_seed_iso
from worker.virt import Virt


@pytest.fixture
def ctx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HostContext]:
    base = tmp_path / "base.qcow2"
    base.write_bytes(b"base")
    monkeypatch.setattr(cache, "ensure_base", lambda *_a: base)
    monkeypatch.setattr(cache, "base_virtual_size", lambda _b: 1)
    virt = Virt("test:///default")
    events: list[tuple[str, dict[str, Any]]] = []
    settings = HostSettings(virt_type="test", arch="x86_64", machine="pc", emulator=None,
                            network_kind=None, network_source=None, storage_dir=tmp_path)
    context = HostContext(virt=virt, host=settings, host_token="t",
                          emit=lambda type_, **data: events.append((type_, data)))
    context.events = events  # type: ignore[attr-defined]
    try:
        yield context
    finally:
        virt.close()


def payload() -> dict[str, Any]:
    return {"vm": {"id": str(uuid.uuid4()), "name": "d", "project": "p", "vcpus": 1,
                   "memory_mb": 128, "disk_gb": 1, "hostname": "d", "mac": "52:54:00:aa:bb:01",
                   "user_data": "#!/bin/sh\necho hi\n"},
            "image": {"id": "i", "sha256": "0" * 64, "disk_format": "qcow2", "size_bytes": 4,
                      "url": "http://127.0.0.1:1/x"},
            "job_id": "job-1", "attempt": 0}


def steps(ctx: HostContext) -> list[str]:
    return [d["step"] for t, d in ctx.events if t == c.EV_BUILD_STEP]  # type: ignore[attr-defined]


def test_overlay_and_seed_are_made_side_by_side(ctx: HostContext,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    threads: dict[str, str] = {}

    def overlay(_base: Path, disk: Path, *_a: Any, **_k: Any) -> None:
        threads["overlay"] = threading.current_thread().name
        time.sleep(0.05)  # qemu-img at work: the seed is written meanwhile
        assert (disk.parent / "seed.iso").exists()
        disk.write_bytes(b"overlay")

    real = seed.build_seed_iso

    def writing_seed(dest: Path, **kw: Any) -> Path:
        threads["seed"] = threading.current_thread().name
        return real(dest, **kw)

    monkeypatch.setattr(images, "create_overlay", overlay)
    monkeypatch.setattr(seed, "build_seed_iso", writing_seed)
    p = payload()
    try:
        build.build_vm(ctx, p)
        paths = instance_paths(ctx.host.storage_dir, p["vm"]["id"])
        assert paths.disk.read_bytes() == b"overlay"
        assert read_seed_iso(paths.seed)["user-data"] == b"#!/bin/sh\necho hi\n"
        assert steps(ctx) == ["image", "overlay", "seed", "define"]
        assert threads["seed"] != threads["overlay"]
    finally:
        ctx.virt.destroy_and_undefine(p["vm"]["id"])


def test_a_failed_overlay_waits_for_the_seed_before_removing_the_directory(
        ctx: HostContext, monkeypatch: pytest.MonkeyPatch) -> None:
    started = threading.Event()
    order: list[str] = []
    real_seed, real_rmtree = seed.build_seed_iso, shutil.rmtree

    def slow_seed(dest: Path, **kw: Any) -> Path:
        started.set()
        time.sleep(0.2)  # still writing when the overlay fails
        out = real_seed(dest, **kw)
        order.append("seed written")
        return out

    def broken_overlay(*_a: Any, **_k: Any) -> None:
        assert started.wait(5)
        raise OSError("no space left on device")

    def rmtree(path: Any, **kw: Any) -> None:
        order.append("directory removed")
        real_rmtree(path, **kw)

    monkeypatch.setattr(seed, "build_seed_iso", slow_seed)
    monkeypatch.setattr(images, "create_overlay", broken_overlay)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    p = payload()
    with pytest.raises(BuildError) as err:
        build.build_vm(ctx, p)
    assert err.value.step == "overlay" and "no space left" in str(err.value)
    assert order == ["seed written", "directory removed"]
    assert not instance_paths(ctx.host.storage_dir, p["vm"]["id"]).dir.exists()


def test_a_failed_seed_names_its_step(ctx: HostContext, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_seed(dest: Path, **_kw: Any) -> Path:
        raise OSError("seed disk full")

    monkeypatch.setattr(seed, "build_seed_iso", broken_seed)
    monkeypatch.setattr(images, "create_overlay",
                        lambda _b, disk, *_a, **_k: Path(disk).write_bytes(b"overlay"))
    p = payload()
    with pytest.raises(BuildError) as err:
        build.build_vm(ctx, p)
    assert err.value.step == "seed" and "seed disk full" in str(err.value)
    assert steps(ctx) == ["image", "overlay", "seed"]
    assert not instance_paths(ctx.host.storage_dir, p["vm"]["id"]).dir.exists()
