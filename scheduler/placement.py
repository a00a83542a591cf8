"""Pure placement: filter host snapshots, weigh the survivors, rank them, explain it.

Owns the decision only. It is given snapshots and a request and returns a ranking plus the
per-filter counts (and, for a dry run, each host's verdict and scores); it never touches the
store (claims.py does the claiming). Filters live in filters.py, weighers in weighers.py.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

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
from scheduler.snapshot import HostSnapshot, Request
from scheduler.weighers import (
    FewestBuildsWeigher,
    FreeRamWeigher,
    FreeVcpuWeigher,
    ImageCachedWeigher,
    SoftGroupWeigher,
    Weigher,
    default_weighers,
)

__all__ = ["DEFAULT_FILTERS", "DEFAULT_WEIGHERS", "AliveFilter", "ArchFilter",
           "EnabledFilter", "FewestBuildsWeigher", "Filter", "FreeRamWeigher",
           "FreeVcpuWeigher", "HostSnapshot", "ImageCachedWeigher", "LabelFilter",
           "MaxVMsFilter", "Ranking", "Request", "ResourceFilter", "ServerGroupFilter",
           "SoftGroupWeigher", "Weigher", "default_weighers", "rank"]

log = logging.getLogger(__name__)

DEFAULT_WEIGHERS: tuple[Weigher, ...] = default_weighers("spread")


@dataclass
class Ranking:
    """The outcome: hosts best first, how many hosts each filter removed, their scores,
    and (for a dry run) one verdict per host."""

    hosts: list[HostSnapshot]
    removed: dict[str, int]
    scores: dict[str, float]
    verdicts: list[dict[str, Any]] = field(default_factory=list)


def _normalise(values: Sequence[float]) -> list[float]:
    lo, hi = min(values), max(values)
    if hi == lo:
        return [0.0] * len(values)
    span = hi - lo
    return [(v - lo) / span for v in values]


def rank(hosts: Sequence[HostSnapshot], req: Request,
         filters: Sequence[Filter] = DEFAULT_FILTERS,
         weighers: Sequence[Weigher] = DEFAULT_WEIGHERS,
         top_random: int = 1, rng: random.Random | None = None,
         explain: bool = False) -> Ranking:
    """Filter, weigh and order hosts; shuffle among the best `top_random` to spread the
    contention of schedulers deciding at the same moment."""
    removed = {f.name: 0 for f in filters}
    survivors: list[HostSnapshot] = []
    verdicts: list[dict[str, Any]] = []
    for host in hosts:
        for flt in filters:
            if not flt.host_passes(host, req):
                removed[flt.name] += 1
                if explain or log.isEnabledFor(logging.DEBUG):
                    reason = flt.why(host, req)
                    log.debug("host %s fails filter %s: %s", host.name, flt.name, reason)
                    if explain:
                        verdicts.append({"host": host.name, "passed": False,
                                         "failed_filter": flt.name, "reason": reason})
                break
        else:
            survivors.append(host)
    if not survivors:
        return Ranking([], removed, {}, verdicts)
    totals = [0.0] * len(survivors)
    per_weigher: dict[str, list[float]] = {}
    for w in weighers:
        if w.multiplier == 0:
            continue
        raw = [w.weigh(h, req) for h in survivors]
        norm = _normalise(raw)
        per_weigher[w.name] = norm
        mult = w.multiplier
        for i, n in enumerate(norm):
            totals[i] += mult * n
    order = sorted(range(len(survivors)), key=lambda i: (-totals[i], survivors[i].name))
    ranked = [survivors[i] for i in order]
    if top_random > 1:
        head = ranked[:top_random]
        (rng or random).shuffle(head)
        ranked[:top_random] = head
    scores = {survivors[i].name: totals[i] for i in order}
    if explain:
        for pos, host in enumerate(ranked):
            i = survivors.index(host)
            verdicts.append({"host": host.name, "passed": True, "rank": pos + 1,
                             "score": round(totals[i], 4),
                             "weights": {name: round(vals[i], 4)
                                         for name, vals in per_weigher.items()}})
    return Ranking(ranked, removed, scores, verdicts)
