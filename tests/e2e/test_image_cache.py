"""Images through the whole system: an upload imported by the control plane (raw converted to
qcow2), pre-warmed on two of three hosts, which fetch it with the host credential, check its
sha256 and report it: /api/v1/hosts lists it as cached on those two only. The hosts are real
`virtfleet worker` processes on libvirt's test:/// driver (fast: no guest boots)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.cluster import Cluster
from fleet.proc import run

pytestmark = pytest.mark.e2e


def node_xml(path: Path) -> str:
    path.write_text("""<node>
  <cpu><mhz>2000</mhz><model>x86_64</model><active>4</active>
    <nodes>1</nodes><sockets>1</sockets><cores>4</cores><threads>1</threads></cpu>
  <memory>8388608</memory>
</node>
""")
    return f"test://{path}"


@pytest.fixture
def three_hosts(tmp_path: Path) -> Iterator[Cluster]:
    workers = {name: {"VIRTFLEET_LIBVIRT_URI": node_xml(tmp_path / f"{name}.xml"),
                      "VIRTFLEET_NETWORK": "none:"} for name in ("h1", "h2", "h3")}
    with Cluster(workers=workers) as c:
        yield c


def wait_image(c: Cluster, image_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        image = c.api.get(f"/images/{image_id}").json()
        if image["status"] != "importing":
            return image
        time.sleep(0.1)
    raise TimeoutError(f"image {image_id} still importing after {timeout}s")


def wait_cached(c: Cluster, sha: str, hosts: set[str], timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    by_name: dict[str, Any] = {}
    while time.monotonic() < deadline:
        by_name = {h["name"]: h for h in c.api.get("/hosts").json()}
        if {n for n, h in by_name.items() if sha in h["cached_images"]} == hosts:
            return by_name
        time.sleep(0.2)
    raise TimeoutError(f"{sha[:12]} not cached on exactly {hosts}: "
                       f"{ {n: h['cached_images'] for n, h in by_name.items()} }")


def test_upload_import_and_prewarm_on_two_of_three_hosts(three_hosts: Cluster,
                                                        tmp_path: Path) -> None:
    c = three_hosts
    raw = tmp_path / "disk.raw"
    with raw.open("wb") as fh:  # a raw disk with some data, uploaded as a stream
        fh.write(b"\xa5" * (2 * 1024 * 1024))
        fh.truncate(32 * 1024 * 1024)
    with raw.open("rb") as fh:
        r = c.api.post("/images/upload?name=tiny&visibility=public", data=fh,
                       headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "importing"
    image = wait_image(c, r.json()["id"])
    assert image["status"] == "active", image
    assert (image["disk_format"], image["original_format"]) == ("qcow2", "raw")
    stored = c.root / "state" / "images" / image["sha256"]
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == image["sha256"]
    run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw), str(stored)], timeout=60)

    r = c.api.post(f"/images/{image['id']}/prewarm", json={"hosts": ["h1", "h2"]})
    assert r.status_code == 202, r.text
    assert r.json()["hosts"] == ["h1", "h2"]
    hosts = wait_cached(c, image["sha256"], {"h1", "h2"})
    assert image["sha256"] not in hosts["h3"]["cached_images"]
    for name in ("h1", "h2"):
        base = c.root / f"storage-{name}" / "bases" / f"{image['sha256']}.qcow2"
        assert base.read_bytes() == stored.read_bytes()
    assert not (c.root / "storage-h3" / "bases" / f"{image['sha256']}.qcow2").exists()
    events = [e for e in c.api.get("/events").json() if e["type"] == "image.cached"]
    assert sorted(e["host"] for e in events) == ["h1", "h2"]
    assert {e["data"]["sha256"] for e in events} == {image["sha256"]}

    # Heartbeats (from the disk) agree, a few beats later.
    time.sleep(2.5)
    wait_cached(c, image["sha256"], {"h1", "h2"}, timeout=5)

    # The image boots VMs; a prewarm of an unknown host is refused, nothing sent.
    r = c.api.post(f"/images/{image['id']}/prewarm", json={"hosts": ["h3", "h9"]})
    assert r.status_code == 404, r.text
    r = c.api.post("/vms", json={"name": "on-tiny", "image": "tiny", "memory_mb": 256})
    assert r.status_code == 202, r.text
    assert c.api.wait_vm(r.json()["vm"]["id"], ("running", "error"))["state"] == "running"
