"""`virtfleet up` and its demo image across upgrades: the image 'demo' that an earlier `up`
registered from another build of the demo image (whose guest may not know what this
virtfleet's user-data asks of it) makes way for this build, and VMs made from it keep it."""

from __future__ import annotations

from sqlalchemy import select

from fleet.cli import retire_stale_demo
from fleet.store.models import VM, Image, Project
from fleet.store.session import Store

OLD, NEW = "0a" * 32, "0b" * 32


def add_image(store: Store, name: str, sha256: str, source: str = "local",
              project: str = "admin") -> str:
    with store.session() as s:
        owner = s.scalars(select(Project).where(Project.name == project)).first()
        if owner is None:
            owner = Project(name=project)
            s.add(owner)
            s.flush()
        image = Image(name=name, project_id=owner.id, sha256=sha256, source=source)
        s.add(image)
        s.flush()
        return image.id


def names(store: Store) -> dict[str, str]:
    with store.sessions() as s:
        return {i.id: i.name for i in s.scalars(select(Image))}


def test_an_earlier_builds_demo_makes_way_and_keeps_its_vms(store: Store) -> None:
    old = add_image(store, "demo", OLD)
    other = add_image(store, "mine", NEW)
    with store.session() as s:
        vm = VM(name="made-from-it", project_id=s.get(Image, old).project_id, image_id=old,
                vcpus=1, memory_mb=128, disk_gb=1)
        s.add(vm)
        s.flush()
        vm_id = vm.id

    assert retire_stale_demo(store.url, NEW) == f"demo-{old[:8]}"
    assert names(store) == {old: f"demo-{old[:8]}", other: "mine"}
    with store.sessions() as s:
        assert s.get(VM, vm_id).image_id == old  # type: ignore[union-attr]

    # This build, once registered as 'demo', stays.
    new = add_image(store, "demo", NEW)
    assert retire_stale_demo(store.url, NEW) is None
    assert names(store)[new] == "demo"


def test_only_ups_own_demo_is_retired(store: Store) -> None:
    """The same build stays; a 'demo' from a URL, or in another project, is someone's own."""
    same = add_image(store, "demo", NEW)
    assert retire_stale_demo(store.url, NEW) is None
    from_url = add_image(store, "demo", OLD, source="https://example.org/demo.qcow2",
                         project="other")
    elsewhere = add_image(store, "demo", OLD, project="lab")
    assert retire_stale_demo(store.url, NEW) is None
    assert names(store) == {same: "demo", from_url: "demo", elsewhere: "demo"}
