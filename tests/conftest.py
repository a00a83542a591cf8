"""Shared fixtures: the demo image (built once, cached between runs) and a whole cluster."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.cluster import Cluster
from demo.image import build_demo_image, default_image_path


@pytest.fixture(scope="session")
def demo_image() -> Path:
    return build_demo_image(default_image_path())


@pytest.fixture
def cluster(demo_image: Path) -> Iterator[Cluster]:
    """web + scheduler + one worker on qemu:///system, the demo image registered as 'demo'."""
    with Cluster(workers={"local": {"VIRTFLEET_VIRT_TYPE": "qemu"}}) as c:
        c.register_image("demo", demo_image)
        yield c
