"""What placement reasons about: a host as it was at one moment, and what one VM asks for,
and a column view of many hosts for the vectorized filters and weighers.

Plain frozen dataclasses and numpy arrays, no store access; claims.py and hostcache.py build
them from rows. A HostTable is immutable: an update makes a new table that shares what did
not change.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, overload

import numpy as np


@dataclass(frozen=True)
class HostSnapshot:
    """What placement knows of one host at one moment (`generation` guards the claim)."""

    id: int
    name: str
    generation: int
    alive: bool
    enabled: bool
    maintenance: bool
    arch: str
    virt_type: str
    vcpus: int
    memory_mb: int
    disk_gb: int
    used_vcpus: int
    used_memory_mb: int
    used_disk_gb: int
    cpu_ratio: float
    ram_ratio: float
    disk_ratio: float
    labels: Mapping[str, str] = field(default_factory=dict)
    cached_images: frozenset[str] = frozenset()
    max_vms: int | None = None
    vm_count: int = 0
    builds: int = 0

    @property
    def free_vcpus(self) -> float:
        return self.vcpus * self.cpu_ratio - self.used_vcpus

    @property
    def free_memory_mb(self) -> float:
        return self.memory_mb * self.ram_ratio - self.used_memory_mb

    @property
    def free_disk_gb(self) -> float:
        return self.disk_gb * self.disk_ratio - self.used_disk_gb


@dataclass(frozen=True)
class Request:
    """What one VM needs, and the rules it brings (labels, server group)."""

    vcpus: int
    memory_mb: int
    disk_gb: int
    arch: str = "x86_64"
    virt_type: str = ""
    image_sha256: str = ""
    constraints: Mapping[str, str] = field(default_factory=dict)
    group_policy: str | None = None
    group_hard: bool = True
    group_hosts: Mapping[str, int] = field(default_factory=dict)
    """Hosts already holding members of the VM's server group, with how many."""


SNAPSHOT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(HostSnapshot))
"""HostSnapshot's fields in order (what `snapshot_from_values` takes)."""


def snapshot_from_values(values: Sequence[Any]) -> HostSnapshot:
    """A HostSnapshot from all its field values in SNAPSHOT_FIELDS order, without the frozen
    dataclass's per-field `__init__` (ten times faster; reloading 1,000 hosts is hot)."""
    snap = object.__new__(HostSnapshot)
    snap.__dict__.update(zip(SNAPSHOT_FIELDS, values, strict=True))
    return snap


_COLUMNS = ("generation", "alive", "enabled", "maintenance", "free_vcpus", "free_memory_mb",
            "free_disk_gb", "max_vms", "vm_count", "builds")
"""The per-host arrays a HostTable patches in place when a host's numbers change."""


def _numbers(h: HostSnapshot) -> tuple[Any, ...]:
    """A host's values in the _COLUMNS arrays, in _COLUMNS order (as `_numeric` makes them)."""
    return (h.generation, bool(h.alive), bool(h.enabled), bool(h.maintenance), h.free_vcpus,
            h.free_memory_mb, h.free_disk_gb, math.inf if h.max_vms is None else h.max_vms,
            h.vm_count, h.builds)


def _categorical(h: HostSnapshot) -> tuple[Any, ...]:
    """The fields whose change rebuilds a HostTable's lookups (names, vocabularies, labels,
    image masks) instead of patching its arrays."""
    return (h.id, h.name, h.arch, h.virt_type, h.labels, h.cached_images)


class HostTable(Sequence[HostSnapshot]):
    """Struct of arrays over a list of host snapshots, for vectorized filters and weighers.

    Also a read-only sequence of the snapshots themselves, so anything that takes hosts takes
    a table. Free capacity is computed as HostSnapshot computes it (same float operations in
    the same order), so the vectorized path decides exactly as the scalar one.
    """

    def __init__(self, hosts: Iterable[HostSnapshot]) -> None:
        self.snapshots: list[HostSnapshot] = list(hosts)
        self._numeric()
        self._lookups()

    # -- building ------------------------------------------------------------------------

    def _numeric(self) -> None:
        snaps = self.snapshots
        self.generation = np.array([h.generation for h in snaps], dtype=np.int64)
        self.alive = np.array([bool(h.alive) for h in snaps], dtype=bool)
        self.enabled = np.array([bool(h.enabled) for h in snaps], dtype=bool)
        self.maintenance = np.array([bool(h.maintenance) for h in snaps], dtype=bool)
        self.free_vcpus = np.array([h.free_vcpus for h in snaps], dtype=np.float64)
        self.free_memory_mb = np.array([h.free_memory_mb for h in snaps], dtype=np.float64)
        self.free_disk_gb = np.array([h.free_disk_gb for h in snaps], dtype=np.float64)
        self.max_vms = np.array([math.inf if h.max_vms is None else h.max_vms
                                 for h in snaps], dtype=np.float64)
        self.vm_count = np.array([h.vm_count for h in snaps], dtype=np.float64)
        self.builds = np.array([h.builds for h in snaps], dtype=np.float64)

    def _lookups(self) -> None:
        snaps = self.snapshots
        self.names: list[str] = [h.name for h in snaps]
        self.by_id: dict[int, int] = {h.id: i for i, h in enumerate(snaps)}
        self.by_name: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            self.by_name.setdefault(name, []).append(i)
        # Positions sorted by name (stable: equal names keep their order), for tie-breaks.
        self.name_order = np.array(sorted(range(len(snaps)), key=self.names.__getitem__),
                                   dtype=np.int64)
        self.name_array = np.empty(len(snaps), dtype=object)
        self.name_array[:] = self.names
        self.arch_vocab: dict[str, int] = {}
        self.arch = np.array([self.arch_vocab.setdefault(h.arch, len(self.arch_vocab))
                              for h in snaps], dtype=np.int64)
        self.virt_vocab: dict[str, int] = {}
        self.virt_type = np.array([self.virt_vocab.setdefault(h.virt_type,
                                                              len(self.virt_vocab))
                                   for h in snaps], dtype=np.int64)
        # Per label key: a code per host, the key's absence (None) being a value like any other.
        keys = {k for h in snaps for k in h.labels}
        self.label_vocab: dict[str, dict[Any, int]] = {}
        self.label_codes: dict[str, np.ndarray] = {}
        for key in keys:
            vocab: dict[Any, int] = {}
            self.label_codes[key] = np.array([vocab.setdefault(h.labels.get(key), len(vocab))
                                              for h in snaps], dtype=np.int64)
            self.label_vocab[key] = vocab
        self._image_masks: dict[str, np.ndarray] = {}

    def replaced(self, changes: Mapping[int, HostSnapshot]) -> HostTable:
        """A new table with the snapshots at these positions replaced; what did not change
        (lookups, label codes, image masks) is shared with this one."""
        snaps = list(self.snapshots)
        rebuild = False
        for i, h in changes.items():
            if _categorical(snaps[i]) != _categorical(h):
                rebuild = True
            snaps[i] = h
        if rebuild:
            return HostTable(snaps)
        new = object.__new__(HostTable)
        new.__dict__.update(self.__dict__)
        new.snapshots = snaps
        # Copy only the columns that change (a claim leaves alive, enabled, maintenance and
        # max_vms as they were): this runs after every claim.
        rows = [(i, _numbers(h)) for i, h in changes.items()]
        for c, name in enumerate(_COLUMNS):
            column = getattr(self, name)
            copied = None
            for i, row in rows:
                if column.item(i) != row[c]:
                    if copied is None:
                        copied = column.copy()
                        setattr(new, name, copied)
                    copied[i] = row[c]
        return new

    def without(self, positions: Iterable[int]) -> HostTable:
        """A new table without the hosts at these positions (hosts that are gone)."""
        gone = set(positions)
        return HostTable(h for i, h in enumerate(self.snapshots) if i not in gone)

    # -- the sequence --------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.snapshots)

    @overload
    def __getitem__(self, i: int) -> HostSnapshot: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[HostSnapshot]: ...

    def __getitem__(self, i: int | slice) -> HostSnapshot | Sequence[HostSnapshot]:
        return self.snapshots[i]

    def __iter__(self) -> Iterator[HostSnapshot]:
        return iter(self.snapshots)

    def position(self, host_id: int) -> int | None:
        return self.by_id.get(host_id)

    # -- columns derived from a request --------------------------------------------------

    def code_mask(self, column: str, value: str) -> np.ndarray:
        """Hosts whose `arch` or `virt_type` equals `value`."""
        vocab = self.arch_vocab if column == "arch" else self.virt_vocab
        code = vocab.get(value)
        if code is None:
            return np.zeros(len(self), dtype=bool)
        return getattr(self, column) == code  # type: ignore[no-any-return]

    def label_mask(self, constraints: Mapping[str, Any]) -> np.ndarray:
        """Hosts whose labels hold every `key: value` of `constraints`."""
        mask = np.ones(len(self), dtype=bool)
        for key, value in constraints.items():
            codes = self.label_codes.get(key)
            if codes is None:  # no host has this label: it matches only an absent value
                if value is not None:
                    mask[:] = False
                continue
            code = self.label_vocab[key].get(value)
            if code is None:
                mask[:] = False
            else:
                mask &= codes == code
        return mask

    def name_mask(self, names: Iterable[str]) -> np.ndarray:
        """Hosts named in `names`."""
        mask = np.zeros(len(self), dtype=bool)
        for name in names:
            for i in self.by_name.get(name, ()):
                mask[i] = True
        return mask

    def name_values(self, values: Mapping[str, float]) -> np.ndarray:
        """`values[host name]` per host, 0.0 for hosts not in `values`."""
        out = np.zeros(len(self), dtype=np.float64)
        for name, v in values.items():
            for i in self.by_name.get(name, ()):
                out[i] = float(v)
        return out

    def image_mask(self, sha256: str) -> np.ndarray:
        """Hosts that have the image `sha256` in their cache (computed once per table)."""
        mask = self._image_masks.get(sha256)
        if mask is None:
            mask = np.array([sha256 in h.cached_images for h in self.snapshots], dtype=bool)
            self._image_masks[sha256] = mask
        return mask
