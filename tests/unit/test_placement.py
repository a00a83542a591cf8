"""Pure placement on plain HostSnapshot objects: filters, weighers, ranking, the reasons."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest

from scheduler.placement import (
    AliveFilter,
    ArchFilter,
    EnabledFilter,
    FreeRamWeigher,
    HostSnapshot,
    ImageCachedWeigher,
    LabelFilter,
    Request,
    ResourceFilter,
    rank,
)


def host(name: str = "h1", **kw: Any) -> HostSnapshot:
    values: dict[str, Any] = dict(
        id=abs(hash(name)) % 10_000, name=name, generation=0, alive=True, enabled=True,
        maintenance=False, arch="x86_64", virt_type="qemu", vcpus=4, memory_mb=8192,
        disk_gb=100, used_vcpus=0, used_memory_mb=0, used_disk_gb=0, cpu_ratio=1.0,
        ram_ratio=1.0, disk_ratio=1.0)
    values.update(kw)
    return HostSnapshot(**values)


SMALL = Request(vcpus=1, memory_mb=512, disk_gb=5)


def test_alive_filter() -> None:
    assert AliveFilter().host_passes(host(), SMALL)
    assert not AliveFilter().host_passes(host(alive=False), SMALL)


def test_enabled_filter_covers_disabled_and_maintenance() -> None:
    f = EnabledFilter()
    assert f.host_passes(host(), SMALL)
    assert not f.host_passes(host(enabled=False), SMALL)
    assert not f.host_passes(host(maintenance=True), SMALL)


@pytest.mark.parametrize("req, fits", [
    (Request(vcpus=4, memory_mb=8192, disk_gb=100), True),   # exactly full
    (Request(vcpus=5, memory_mb=512, disk_gb=1), False),
    (Request(vcpus=1, memory_mb=8193, disk_gb=1), False),
    (Request(vcpus=1, memory_mb=512, disk_gb=101), False),
])
def test_resource_filter_on_an_empty_host(req: Request, fits: bool) -> None:
    assert ResourceFilter().host_passes(host(), req) is fits


def test_resource_filter_counts_what_is_used() -> None:
    used = host(used_vcpus=3, used_memory_mb=8000, used_disk_gb=90)
    assert ResourceFilter().host_passes(used, Request(vcpus=1, memory_mb=192, disk_gb=10))
    assert not ResourceFilter().host_passes(used, Request(vcpus=2, memory_mb=64, disk_gb=1))
    assert not ResourceFilter().host_passes(used, Request(vcpus=1, memory_mb=193, disk_gb=1))
    assert not ResourceFilter().host_passes(used, Request(vcpus=1, memory_mb=64, disk_gb=11))


def test_resource_filter_applies_allocation_ratios() -> None:
    # 4 vCPUs at 4.0 overcommit hold 16; RAM at 1.5 holds 12288 MiB; disk at 2.0 holds 200 GiB.
    h = host(cpu_ratio=4.0, ram_ratio=1.5, disk_ratio=2.0, used_vcpus=12)
    assert h.free_vcpus == 4 and h.free_memory_mb == 12288 and h.free_disk_gb == 200
    assert ResourceFilter().host_passes(h, Request(vcpus=4, memory_mb=12288, disk_gb=200))
    assert not ResourceFilter().host_passes(h, Request(vcpus=5, memory_mb=512, disk_gb=1))
    assert not ResourceFilter().host_passes(h, Request(vcpus=1, memory_mb=12289, disk_gb=1))
    assert not ResourceFilter().host_passes(h, Request(vcpus=1, memory_mb=512, disk_gb=201))
    # Below 1.0 the ratio reserves part of the host.
    reserved = host(ram_ratio=0.5)
    assert not ResourceFilter().host_passes(reserved, Request(vcpus=1, memory_mb=4097,
                                                              disk_gb=1))


def test_arch_filter() -> None:
    assert ArchFilter().host_passes(host(), SMALL)
    assert not ArchFilter().host_passes(host(arch="aarch64"), SMALL)
    assert ArchFilter().host_passes(host(arch="aarch64"), dataclasses.replace(SMALL,
                                                                              arch="aarch64"))


def test_label_filter() -> None:
    h = host(labels={"zone": "a", "disk": "ssd"})
    assert LabelFilter().host_passes(h, SMALL)  # no constraints: any host
    assert LabelFilter().host_passes(h, dataclasses.replace(SMALL, constraints={"zone": "a"}))
    assert LabelFilter().host_passes(
        h, dataclasses.replace(SMALL, constraints={"zone": "a", "disk": "ssd"}))
    assert not LabelFilter().host_passes(h, dataclasses.replace(SMALL,
                                                                constraints={"zone": "b"}))
    assert not LabelFilter().host_passes(host(), dataclasses.replace(SMALL,
                                                                     constraints={"zone": "a"}))


def test_rank_spreads_by_free_ram() -> None:
    hosts = [host("busy", used_memory_mb=6000), host("idle"), host("half", used_memory_mb=4096)]
    ranking = rank(hosts, SMALL)
    assert [h.name for h in ranking.hosts] == ["idle", "half", "busy"]
    assert ranking.scores["idle"] > ranking.scores["half"] > ranking.scores["busy"]
    assert ranking.removed == {"alive": 0, "enabled": 0, "arch": 0, "resources": 0, "labels": 0,
                               "max_vms": 0, "server_group": 0}


def test_rank_prefers_a_cached_image_when_ram_is_equal() -> None:
    req = dataclasses.replace(SMALL, image_sha256="ab" * 32)
    hosts = [host("a"), host("b", cached_images=frozenset({"ab" * 32}))]
    assert [h.name for h in rank(hosts, req).hosts] == ["b", "a"]
    assert ImageCachedWeigher().weigh(hosts[1], req) == 1.0
    assert ImageCachedWeigher().weigh(hosts[1], SMALL) == 0.0  # no image asked: no preference


def test_free_ram_outweighs_a_cached_image() -> None:
    req = dataclasses.replace(SMALL, image_sha256="ab" * 32)
    hosts = [host("roomy"), host("cached", used_memory_mb=7000,
                                 cached_images=frozenset({"ab" * 32}))]
    assert [h.name for h in rank(hosts, req).hosts] == ["roomy", "cached"]
    assert FreeRamWeigher().weigh(hosts[1], req) == 1192


def test_equal_hosts_are_ordered_by_name() -> None:
    hosts = [host("c"), host("a"), host("b")]
    assert [h.name for h in rank(hosts, SMALL).hosts] == ["a", "b", "c"]


def test_removed_counts_each_host_once_under_the_first_failing_filter() -> None:
    hosts = [
        host("dead", alive=False, enabled=False),       # alive fails first
        host("dead2", alive=False),
        host("off", enabled=False),
        host("maint", maintenance=True),
        host("arm", arch="aarch64"),
        host("full", used_memory_mb=8000),
        host("elsewhere", labels={"zone": "b"}),
        host("ok", labels={"zone": "a"}),
    ]
    req = dataclasses.replace(SMALL, constraints={"zone": "a"})
    ranking = rank(hosts, req)
    assert [h.name for h in ranking.hosts] == ["ok"]
    assert ranking.removed == {"alive": 2, "enabled": 2, "arch": 1, "resources": 1, "labels": 1,
                               "max_vms": 0, "server_group": 0}
    assert sum(ranking.removed.values()) + len(ranking.hosts) == len(hosts)


def test_no_survivors_explains_why() -> None:
    ranking = rank([host("a", alive=False), host("b", used_vcpus=4)], SMALL)
    assert ranking.hosts == []
    assert ranking.scores == {}
    assert ranking.removed["alive"] == 1 and ranking.removed["resources"] == 1


def test_no_hosts_at_all() -> None:
    ranking = rank([], SMALL)
    assert ranking.hosts == [] and sum(ranking.removed.values()) == 0


def test_top_random_shuffles_only_the_head() -> None:
    hosts = [host(f"h{i}", used_memory_mb=i * 100) for i in range(6)]
    seen_first = set()
    for seed in range(30):
        ranked = rank(hosts, SMALL, top_random=3, rng=random.Random(seed)).hosts
        assert {h.name for h in ranked[:3]} == {"h0", "h1", "h2"}
        assert [h.name for h in ranked[3:]] == ["h3", "h4", "h5"]
        seen_first.add(ranked[0].name)
    assert len(seen_first) > 1


def test_top_random_draws_among_every_host_tied_with_the_last_of_the_few() -> None:
    """A fleet of one server model: 20 identical hosts behind one better host. Picking at
    random among the best 3 draws the two besides the better one from all 20 (two
    schedulers with this view then rarely pick the same host), never a worse host; the
    better one is always among the few; both paths agree; no host comes twice."""
    hosts = ([host("best", used_memory_mb=0)]
             + [host(f"t{i:02d}", used_memory_mb=1000) for i in range(20)]
             + [host("worse", used_memory_mb=4000)])
    tied = {f"t{i:02d}" for i in range(20)}
    drawn: set[str] = set()
    for seed in range(60):
        vector = rank(hosts, SMALL, top_random=3, rng=random.Random(seed), vectorized=True)
        scalar = rank(hosts, SMALL, top_random=3, rng=random.Random(seed), vectorized=False)
        names = [h.name for h in vector.hosts]
        assert names == [h.name for h in scalar.hosts]
        assert [h.name for h in rank(hosts, SMALL, top_random=3, rng=random.Random(seed),
                                     vectorized=True).top(5)] == names[:5]
        assert sorted(names) == sorted(h.name for h in hosts)  # each host once
        assert "best" in names[:3] and set(names[:3]) - {"best"} <= tied
        assert names[-1] == "worse"
        drawn |= set(names[:3]) - {"best"}
    assert len(drawn) > 10  # not the first two by name every time
