"""Every filter and weigher on plain snapshots (no database), and the vectorized ranking held
to the scalar one on random hosts and requests (hypothesis)."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.filters import (
    DEFAULT_FILTERS,
    AliveFilter,
    ArchFilter,
    EnabledFilter,
    Filter,
    LabelFilter,
    MaxVMsFilter,
    ResourceFilter,
    ServerGroupFilter,
)
from scheduler.placement import rank
from scheduler.snapshot import HostSnapshot, HostTable, Request
from scheduler.weighers import (
    FewestBuildsWeigher,
    FreeRamWeigher,
    FreeVcpuWeigher,
    ImageCachedWeigher,
    SoftGroupWeigher,
    Weigher,
    default_weighers,
)

SHA = "ab" * 32


def host(name: str = "h1", **kw: Any) -> HostSnapshot:
    values: dict[str, Any] = dict(
        id=sum(map(ord, name)), name=name, generation=0, alive=True, enabled=True,
        maintenance=False, arch="x86_64", virt_type="qemu", vcpus=4, memory_mb=8192,
        disk_gb=100, used_vcpus=0, used_memory_mb=0, used_disk_gb=0, cpu_ratio=1.0,
        ram_ratio=1.0, disk_ratio=1.0)
    values.update(kw)
    return HostSnapshot(**values)


REQ = Request(vcpus=1, memory_mb=512, disk_gb=5)


def passes(flt: Filter, h: HostSnapshot, req: Request = REQ) -> bool:
    """The filter's scalar answer, checked against its vectorized one on a one-host table."""
    scalar = bool(flt.host_passes(h, req))
    assert bool(flt.mask(HostTable([h]), req)[0]) is scalar  # type: ignore[attr-defined]
    if not scalar:
        assert flt.why(h, req)
    return scalar


def weights(w: Weigher, hosts: list[HostSnapshot], req: Request = REQ) -> list[float]:
    """The weigher's raw numbers, checked against its vectorized ones."""
    scalar = [float(w.weigh(h, req)) for h in hosts]
    vector = w.weigh_all(HostTable(hosts), req).tolist()  # type: ignore[attr-defined]
    assert vector == scalar
    return scalar


# -- filters ------------------------------------------------------------------------------


def test_alive_filter() -> None:
    assert passes(AliveFilter(), host())
    assert not passes(AliveFilter(), host(alive=False))
    assert AliveFilter().why(host(alive=False), REQ) == "missed its heartbeats"


def test_enabled_filter_covers_disabled_and_maintenance() -> None:
    f = EnabledFilter()
    assert passes(f, host())
    assert not passes(f, host(enabled=False))
    assert not passes(f, host(maintenance=True))
    assert not passes(f, host(enabled=False, maintenance=True))
    assert f.why(host(maintenance=True), REQ) == "in maintenance"
    assert f.why(host(enabled=False), REQ) == "disabled by an admin"


def test_arch_filter_checks_arch_and_virt_type_when_asked() -> None:
    f = ArchFilter()
    assert passes(f, host())
    assert not passes(f, host(arch="aarch64"))
    arm = dataclasses.replace(REQ, arch="aarch64")
    assert passes(f, host(arch="aarch64"), arm)
    assert not passes(f, host(), arm)
    kvm = dataclasses.replace(REQ, virt_type="kvm")
    assert passes(f, host(virt_type="kvm"), kvm)
    assert not passes(f, host(virt_type="qemu"), kvm)
    assert passes(f, host(virt_type="qemu"), REQ)  # no virt type asked: any
    assert not passes(f, host(arch="aarch64", virt_type="kvm"), kvm)
    assert "aarch64/kvm" in f.why(host(arch="aarch64", virt_type="kvm"), kvm)


@pytest.mark.parametrize("req, fits", [
    (Request(vcpus=4, memory_mb=8192, disk_gb=100), True),  # exactly full
    (Request(vcpus=5, memory_mb=512, disk_gb=1), False),
    (Request(vcpus=1, memory_mb=8193, disk_gb=1), False),
    (Request(vcpus=1, memory_mb=512, disk_gb=101), False),
])
def test_resource_filter_on_an_empty_host(req: Request, fits: bool) -> None:
    assert passes(ResourceFilter(), host(), req) is fits


def test_resource_filter_counts_used_capacity_after_ratios() -> None:
    f = ResourceFilter()
    # 4 vCPUs x 4.0 = 16 with 12 used; 8192 MiB x 1.5 = 12288 with 4096 used; 100 GiB x 2.0.
    h = host(cpu_ratio=4.0, ram_ratio=1.5, disk_ratio=2.0, used_vcpus=12, used_memory_mb=4096,
             used_disk_gb=50)
    assert (h.free_vcpus, h.free_memory_mb, h.free_disk_gb) == (4, 8192, 150)
    assert passes(f, h, Request(vcpus=4, memory_mb=8192, disk_gb=150))
    assert not passes(f, h, Request(vcpus=5, memory_mb=1, disk_gb=1))
    assert not passes(f, h, Request(vcpus=1, memory_mb=8193, disk_gb=1))
    assert not passes(f, h, Request(vcpus=1, memory_mb=1, disk_gb=151))
    # A ratio below 1.0 keeps part of the host back.
    assert not passes(f, host(ram_ratio=0.5), Request(vcpus=1, memory_mb=4097, disk_gb=1))
    assert passes(f, host(ram_ratio=0.5), Request(vcpus=1, memory_mb=4096, disk_gb=1))
    # Overcommitted past its ratio (an admin lowered it): nothing fits, not even 0 extra RAM.
    over = host(used_memory_mb=9000)
    assert not passes(f, over, Request(vcpus=1, memory_mb=1, disk_gb=1))
    assert "memory_mb -808/1" in f.why(over, Request(vcpus=1, memory_mb=1, disk_gb=1))


def test_label_filter() -> None:
    f = LabelFilter()
    h = host(labels={"zone": "a", "disk": "ssd"})
    assert passes(f, h)  # no constraints: any host
    assert passes(f, host())
    assert passes(f, h, dataclasses.replace(REQ, constraints={"zone": "a"}))
    assert passes(f, h, dataclasses.replace(REQ, constraints={"zone": "a", "disk": "ssd"}))
    assert not passes(f, h, dataclasses.replace(REQ, constraints={"zone": "b"}))
    assert not passes(f, h, dataclasses.replace(REQ, constraints={"zone": "a", "gpu": "yes"}))
    assert not passes(f, host(), dataclasses.replace(REQ, constraints={"zone": "a"}))
    assert "gpu" in f.why(h, dataclasses.replace(REQ, constraints={"gpu": "yes"}))


def test_max_vms_filter() -> None:
    f = MaxVMsFilter()
    assert passes(f, host(vm_count=1000))  # no limit
    assert passes(f, host(max_vms=3, vm_count=2))
    assert not passes(f, host(max_vms=3, vm_count=3))
    assert not passes(f, host(max_vms=0))
    assert f.why(host(max_vms=3, vm_count=3), REQ) == "already runs 3 of at most 3 VMs"


def group(policy: str | None, members: dict[str, int], hard: bool = True) -> Request:
    return dataclasses.replace(REQ, group_policy=policy, group_hard=hard, group_hosts=members)


def test_server_group_hard_affinity() -> None:
    f = ServerGroupFilter()
    first = group("affinity", {})
    assert passes(f, host("a"), first) and passes(f, host("b"), first)  # first member: any
    later = group("affinity", {"a": 2})
    assert passes(f, host("a"), later)
    assert not passes(f, host("b"), later)
    assert f.why(host("b"), later) == "does not hold the affinity group's members"


def test_server_group_hard_anti_affinity() -> None:
    f = ServerGroupFilter()
    first = group("anti-affinity", {})
    assert passes(f, host("a"), first) and passes(f, host("b"), first)
    later = group("anti-affinity", {"a": 1})
    assert not passes(f, host("a"), later)
    assert passes(f, host("b"), later)
    assert f.why(host("a"), later) == "already holds a member of the anti-affinity group"


def test_server_group_filter_ignores_soft_groups_and_no_group() -> None:
    f = ServerGroupFilter()
    assert passes(f, host("b"), group("affinity", {"a": 1}, hard=False))
    assert passes(f, host("a"), group("anti-affinity", {"a": 1}, hard=False))
    assert passes(f, host("a"), group(None, {"a": 1}))


def test_rank_counts_each_host_under_its_first_failing_filter() -> None:
    zone_a = {"zone": "a"}
    hosts = [host("dead", alive=False, enabled=False), host("off", enabled=False),
             host("arm", arch="aarch64"), host("full", used_vcpus=4),
             host("far", labels={"zone": "b"}), host("busy", max_vms=1, vm_count=1,
                                                     labels=zone_a),
             host("taken", labels=zone_a), host("ok", labels=zone_a)]
    req = dataclasses.replace(REQ, constraints={"zone": "a"}, group_policy="anti-affinity",
                              group_hosts={"taken": 1})
    for vectorized in (False, True):
        ranking = rank(hosts, req, vectorized=vectorized)
        assert [h.name for h in ranking.hosts] == ["ok"]
        assert ranking.removed == {"alive": 1, "enabled": 1, "arch": 1, "resources": 1,
                                   "labels": 1, "max_vms": 1, "server_group": 1}


# -- weighers -----------------------------------------------------------------------------


def order(hosts: list[HostSnapshot], *ws: Weigher, req: Request = REQ) -> list[str]:
    names = [h.name for h in rank(hosts, req, weighers=ws, vectorized=False).hosts]
    assert names == [h.name for h in rank(hosts, req, weighers=ws, vectorized=True).hosts]
    return names


def test_free_ram_spreads_and_packs_with_a_negative_multiplier() -> None:
    hosts = [host("busy", used_memory_mb=6000), host("idle"), host("half", used_memory_mb=4096)]
    assert weights(FreeRamWeigher(), hosts) == [2192.0, 8192.0, 4096.0]
    assert order(hosts, FreeRamWeigher(1.0)) == ["idle", "half", "busy"]
    assert order(hosts, FreeRamWeigher(-1.0)) == ["busy", "half", "idle"]
    assert default_weighers("pack")[0].multiplier == -1.0
    assert order(hosts, *default_weighers("pack")) == ["busy", "half", "idle"]
    assert order(hosts, *default_weighers("spread")) == ["idle", "half", "busy"]


def test_free_ram_counts_the_ram_ratio() -> None:
    hosts = [host("plain"), host("overcommitted", ram_ratio=1.5, used_memory_mb=2048)]
    assert weights(FreeRamWeigher(), hosts) == [8192.0, 10240.0]
    assert order(hosts, FreeRamWeigher()) == ["overcommitted", "plain"]


def test_free_vcpus_weigher() -> None:
    hosts = [host("small", vcpus=2), host("big", vcpus=8, used_vcpus=1),
             host("ratio", vcpus=2, cpu_ratio=4.0)]
    assert weights(FreeVcpuWeigher(), hosts) == [2.0, 7.0, 8.0]
    assert order(hosts, FreeVcpuWeigher()) == ["ratio", "big", "small"]


def test_image_cached_weigher() -> None:
    req = dataclasses.replace(REQ, image_sha256=SHA)
    hosts = [host("cold"), host("warm", cached_images=frozenset({SHA, "cd" * 32}))]
    assert weights(ImageCachedWeigher(), hosts, req) == [0.0, 1.0]
    assert weights(ImageCachedWeigher(), hosts, REQ) == [0.0, 0.0]  # no image asked
    assert order(hosts, ImageCachedWeigher(), req=req) == ["warm", "cold"]
    assert order(hosts, ImageCachedWeigher(), req=REQ) == ["cold", "warm"]  # tie: by name


def test_fewest_builds_weigher() -> None:
    hosts = [host("a", builds=3), host("b", builds=0), host("c", builds=1)]
    assert weights(FewestBuildsWeigher(), hosts) == [-3.0, -0.0, -1.0]
    assert order(hosts, FewestBuildsWeigher()) == ["b", "c", "a"]


def test_soft_group_affinity_and_anti_affinity() -> None:
    hosts = [host("a"), host("b"), host("c")]
    soft = group("affinity", {"b": 2, "c": 1}, hard=False)
    assert weights(SoftGroupWeigher(), hosts, soft) == [0.0, 2.0, 1.0]
    assert order(hosts, SoftGroupWeigher(), req=soft) == ["b", "c", "a"]
    anti = group("anti-affinity", {"b": 2, "c": 1}, hard=False)
    assert weights(SoftGroupWeigher(), hosts, anti) == [-0.0, -2.0, -1.0]
    assert order(hosts, SoftGroupWeigher(), req=anti) == ["a", "c", "b"]
    # Hard groups are the filter's business, and no group means no preference.
    assert weights(SoftGroupWeigher(), hosts, group("affinity", {"b": 2})) == [0.0] * 3
    assert weights(SoftGroupWeigher(), hosts, group(None, {"b": 2}, hard=False)) == [0.0] * 3


def test_soft_group_outweighs_free_ram_in_the_defaults() -> None:
    hosts = [host("roomy"), host("member", used_memory_mb=6000)]
    soft = group("affinity", {"member": 1}, hard=False)
    assert order(hosts, *default_weighers("spread"), req=soft) == ["member", "roomy"]


def test_zero_multiplier_is_skipped_and_equal_raw_numbers_weigh_nothing() -> None:
    hosts = [host("b", used_memory_mb=100), host("a")]
    ranking = rank(hosts, REQ, weighers=(FreeRamWeigher(0.0),))
    assert [h.name for h in ranking.hosts] == ["a", "b"] and set(ranking.scores.values()) == {0}
    same = [host("b"), host("a")]
    assert rank(same, REQ, weighers=(FreeRamWeigher(),)).scores == {"a": 0.0, "b": 0.0}


# -- the vectorized path equals the scalar one -----------------------------------------------


class OddFilter(Filter):
    """A filter without `mask`: the vectorized path must ask it host by host."""

    name = "odd"

    def host_passes(self, host: HostSnapshot, req: Request) -> bool:
        return host.id % 2 == 1


class RamOverride(ResourceFilter):
    """A subclass overriding the scalar method only: its inherited `mask` must not be used."""

    def host_passes(self, host: HostSnapshot, req: Request) -> bool:
        return host.free_memory_mb >= 2 * req.memory_mb


class LoadWeigher(Weigher):
    """A weigher without `weigh_all`."""

    name = "load"

    def weigh(self, host: HostSnapshot, req: Request) -> float:
        return float(host.id % 7)


NAMES = [f"h{i:03d}" for i in range(60)] + ["A", "a", "b-1", "b", "Z9", "host-é"]

LABELS = st.dictionaries(st.sampled_from(["zone", "disk", "rack"]),
                         st.sampled_from(["a", "b", "ssd"]), max_size=3)


@st.composite
def hosts_strategy(draw: st.DrawFn) -> list[HostSnapshot]:
    names = draw(st.lists(st.sampled_from(NAMES), unique=True, min_size=0, max_size=40))
    out = []
    for i, name in enumerate(names):
        vcpus = draw(st.integers(0, 64))
        memory = draw(st.sampled_from([0, 512, 1024, 4096, 8192, 65536]))
        disk = draw(st.integers(0, 500))
        out.append(HostSnapshot(
            id=i, name=name, generation=draw(st.integers(0, 5)),
            alive=draw(st.booleans()) or draw(st.booleans()),
            enabled=draw(st.booleans()) or draw(st.booleans()),
            maintenance=draw(st.booleans()) and draw(st.booleans()),
            arch=draw(st.sampled_from(["x86_64", "x86_64", "aarch64"])),
            virt_type=draw(st.sampled_from(["kvm", "qemu"])),
            vcpus=vcpus, memory_mb=memory, disk_gb=disk,
            used_vcpus=draw(st.integers(0, vcpus * 2)),
            used_memory_mb=draw(st.integers(0, memory)),
            used_disk_gb=draw(st.integers(0, disk)),
            cpu_ratio=draw(st.sampled_from([0.5, 1.0, 1.5, 4.0, 16.0])),
            ram_ratio=draw(st.sampled_from([0.5, 1.0, 1.1, 1.5])),
            disk_ratio=draw(st.sampled_from([1.0, 0.9, 2.0])),
            labels=draw(LABELS),
            cached_images=frozenset(draw(st.lists(st.sampled_from([SHA, "cd" * 32]),
                                                  max_size=2))),
            max_vms=draw(st.one_of(st.none(), st.integers(0, 6))),
            vm_count=draw(st.integers(0, 6)), builds=draw(st.integers(0, 3))))
    return out


@st.composite
def request_strategy(draw: st.DrawFn, names: list[str]) -> Request:
    policy = draw(st.sampled_from([None, "affinity", "anti-affinity"]))
    members = draw(st.dictionaries(st.sampled_from(names + ["elsewhere"]), st.integers(1, 4),
                                   max_size=4)) if policy else {}
    return Request(
        vcpus=draw(st.integers(0, 16)), memory_mb=draw(st.sampled_from([0, 256, 512, 2048])),
        disk_gb=draw(st.integers(0, 100)),
        arch=draw(st.sampled_from(["x86_64", "x86_64", "aarch64", "riscv64"])),
        virt_type=draw(st.sampled_from(["", "", "kvm", "qemu"])),
        image_sha256=draw(st.sampled_from(["", SHA, "ef" * 32])),
        constraints=draw(LABELS), group_policy=policy, group_hard=draw(st.booleans()),
        group_hosts=members)


def assert_same(hosts: list[HostSnapshot], req: Request, **kw: Any) -> None:
    scalar = rank(hosts, req, vectorized=False, **kw)
    vector = rank(HostTable(hosts), req, vectorized=True, **kw)
    assert [h.name for h in vector.hosts] == [h.name for h in scalar.hosts]
    assert vector.hosts == scalar.hosts
    assert vector.removed == scalar.removed
    assert list(vector.scores) == list(scalar.scores)  # same names, same order
    for name, score in scalar.scores.items():
        assert vector.scores[name] == pytest.approx(score, abs=1e-9)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_vectorized_rank_equals_scalar_rank(data: st.DataObject) -> None:
    hosts = data.draw(hosts_strategy())
    req = data.draw(request_strategy([h.name for h in hosts] or ["x"]))
    policy = data.draw(st.sampled_from(["spread", "pack"]))
    assert_same(hosts, req, weighers=default_weighers(policy))
    # Filters and weighers without vectorized methods, and a subclass that overrides only
    # the scalar method, fall back to asking host by host.
    mixed_filters = (*DEFAULT_FILTERS[:3], OddFilter(), RamOverride(), *DEFAULT_FILTERS[4:])
    mixed_weighers = (*default_weighers(policy), LoadWeigher(0.7), FreeRamWeigher(0.0))
    assert_same(hosts, req, filters=mixed_filters, weighers=mixed_weighers)
    seed = data.draw(st.integers(0, 1000))
    scalar = rank(hosts, req, vectorized=False, top_random=3, rng=random.Random(seed))
    vector = rank(hosts, req, vectorized=True, top_random=3, rng=random.Random(seed))
    assert [h.name for h in vector.hosts] == [h.name for h in scalar.hosts]


def test_ties_are_broken_by_name_on_both_paths() -> None:
    hosts = [host(n) for n in ("c", "a", "B", "b", "a-1")]
    for vectorized in (False, True):
        assert [h.name for h in rank(hosts, REQ, vectorized=vectorized).hosts] == \
            ["B", "a", "a-1", "b", "c"]


def test_many_tied_hosts_come_out_in_name_order_on_both_paths() -> None:
    rng = random.Random(3)
    names = [f"n{i:04d}" for i in range(400)]
    rng.shuffle(names)
    hosts = [host(n, used_memory_mb=rng.choice((0, 1024, 2048)), builds=rng.choice((0, 1)))
             for n in names]
    assert_same(hosts, REQ)
    ranked = rank(hosts, REQ).hosts
    for a, b in zip(ranked, ranked[1:], strict=False):
        if (a.free_memory_mb, a.builds) == (b.free_memory_mb, b.builds):
            assert a.name < b.name


def test_a_table_updated_in_place_ranks_like_a_fresh_one() -> None:
    rng = random.Random(7)
    hosts = [host(f"h{i:02d}", used_memory_mb=rng.randrange(0, 8000),
                  labels={"zone": rng.choice("ab")}) for i in range(30)]
    table = HostTable(hosts)
    changes = {3: dataclasses.replace(hosts[3], used_memory_mb=8192, generation=1),
               7: dataclasses.replace(hosts[7], alive=False, generation=1),
               9: dataclasses.replace(hosts[9], labels={"zone": "c"}, generation=1)}
    patched = table.replaced({3: changes[3], 7: changes[7]})  # numbers only: patched
    assert patched.name_order is table.name_order
    rebuilt = patched.replaced({9: changes[9]})  # a label changed: rebuilt
    assert rebuilt.label_codes is not table.label_codes
    fresh = [changes.get(i, h) for i, h in enumerate(hosts)]
    req = dataclasses.replace(REQ, constraints={"zone": "c"})
    for r in (REQ, req):
        assert_same(fresh, r)
        assert rank(rebuilt, r).hosts == rank(fresh, r, vectorized=False).hosts
    assert table.free_memory_mb[3] != 0  # the original is left as it was
    assert np.array_equal(table.alive, np.ones(30, dtype=bool))
    assert len(table.without([0, 1])) == 28
