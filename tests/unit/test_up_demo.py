"""`virtfleet up` and its demo image across upgrades: an image 'demo' registered from an
earlier build of the demo image (whose guest may not know what this virtfleet's user-data
asks of it) makes way for this build, and VMs made from it keep it."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from fleet.cli import retire_stale_demo
from fleet.store.models import VM, Image, Project
from fleet.store.session import Store


def add_image(store: Store, name: str, source: str, project: str = "admin") -> str:
    with store.session() as s:
        owner = s.scalars(select(Project).where(Project.name == project)).first()
        if owner is None:
            owner = Project(name=project)
            s.add(owner)
            s.flush()
        image = Image(name=name, project_id=owner.id, sha256="ab" * 32, source=source)
        s.add(image)
        s.flush()
        return image.id


def names(store: Store) -> dict[str, str]:
    with store.sessions() as s:
        return {i.id: i.name for i in s.scalars(select(Image))}


def test_an_earlier_builds_demo_makes_way_and_keeps_its_vms(store: Store,
                                                            tmp_path: Path) -> None:
    demo_dir = tmp_path / "state" / "demo"
    old = add_image(store, "demo", str(demo_dir / "virtfleet-demo.qcow2"))
    other = add_image(store, "mine", str(tmp_path / "elsewhere.qcow2"))
    with store.session() as s:
        vm = VM(name="made-from-it", project_id=s.get(Image, old).project_id, image_id=old,
                vcpus=1, memory_mb=128, disk_gb=1)
        s.add(vm)
        s.flush()
        vm_id = vm.id
    current = demo_dir / "virtfleet-demo-0123456789ab.qcow2"

    assert retire_stale_demo(store.url, current) == f"demo-{old[:8]}"
    assert names(store) == {old: f"demo-{old[:8]}", other: "mine"}
    with store.sessions() as s:
        assert s.get(VM, vm_id).image_id == old  # type: ignore[union-attr]

    # This build, once registered as 'demo', stays.
    new = add_image(store, "demo", str(current))
    assert retire_stale_demo(store.url, current) is None
    assert names(store)[new] == "demo"


def test_a_demo_from_anywhere_else_is_left_alone(store: Store, tmp_path: Path) -> None:
    """An image an operator named 'demo' from a file of their own is theirs."""
    theirs = add_image(store, "demo", str(tmp_path / "my-images" / "virtfleet-demo.qcow2"))
    url_one = add_image(store, "demo", "https://example.org/demo.qcow2", project="other")
    current = tmp_path / "state" / "demo" / "virtfleet-demo-0123456789ab.qcow2"
    assert retire_stale_demo(store.url, current) is None
    assert names(store) == {theirs: "demo", url_one: "demo"}
