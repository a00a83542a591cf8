"""Shared fixtures: the demo image (built once, cached between runs), a whole cluster, and the
name of a throwaway fleet network whose libvirt network is removed afterwards."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.cluster import Cluster
from demo.image import build_demo_image, default_image_path
from fleet.contract import network_libvirt_name


@pytest.fixture(scope="session")
def demo_image() -> Path:
    return build_demo_image(default_image_path())


@pytest.fixture
def cluster(demo_image: Path) -> Iterator[Cluster]:
    """web + scheduler + one worker on qemu:///system, the demo image registered as 'demo'."""
    with Cluster(workers={"local": {"VIRTFLEET_VIRT_TYPE": "qemu"}}) as c:
        c.register_image("demo", demo_image)
        yield c


@pytest.fixture
def net_name() -> Iterator[str]:
    """A fresh fleet network name; its libvirt network on qemu:///system goes afterwards."""
    from worker.virt import Virt
    name = f"e2e-{secrets.token_hex(3)}"
    try:
        yield name
    finally:
        with Virt("qemu:///system") as virt:
            virt.remove_network(network_libvirt_name(name))
