"""Pure placement: filter host snapshots, weigh the survivors, rank them, explain it.

Owns the decision only. It is given snapshots and a request and returns a ranking plus the
per-filter counts (and, for a dry run, each host's verdict and scores); it never touches the
store (claims.py does the claiming). Filters live in filters.py, weighers in weighers.py.

Two paths give the same answer: the scalar one asks each filter `host_passes` per host and
each weigher `weigh` per host (the definition, and what `explain` uses); the vectorized one
asks `mask`/`weigh_all` once over a HostTable (numpy), falling back per host to the scalar
method of any filter or weigher without a vectorized one. Same order, same removed counts,
same scores.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

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

__all__ = ["DEFAULT_FILTERS", "DEFAULT_WEIGHERS", "AliveFilter", "ArchFilter",
           "EnabledFilter", "FewestBuildsWeigher", "Filter", "FreeRamWeigher",
           "FreeVcpuWeigher", "HostSnapshot", "HostTable", "ImageCachedWeigher", "LabelFilter",
           "MaxVMsFilter", "Ranking", "Request", "ResourceFilter", "ServerGroupFilter",
           "SoftGroupWeigher", "Weigher", "default_weighers", "rank"]

log = logging.getLogger(__name__)

DEFAULT_WEIGHERS: tuple[Weigher, ...] = default_weighers("spread")

VECTOR_MIN_HOSTS = 64
"""From this many hosts a plain list is turned into a HostTable and ranked vectorized; below,
the scalar path is faster than building the table."""


class Ranking:
    """The outcome: hosts best first, how many hosts each filter removed, their scores,
    and (for a dry run) one verdict per host.

    The vectorized path keeps its order as index arrays and builds `hosts` and `scores`
    only when asked: a claim usually needs the first few hosts (`top`), and turning a
    thousand survivors into a list and a dict would cost more than ranking them.
    """

    def __init__(self, hosts: list[HostSnapshot], removed: dict[str, int],
                 scores: dict[str, float], verdicts: list[dict[str, Any]] | None = None
                 ) -> None:
        self.removed = removed
        self.verdicts: list[dict[str, Any]] = verdicts if verdicts is not None else []
        self._hosts: list[HostSnapshot] | None = hosts
        self._scores: dict[str, float] | None = scores
        self._count = len(hosts)
        self._table: HostTable | None = None
        self._idx = self._totals = self._order = _EMPTY
        self._head: list[int] = []

    @classmethod
    def _ordered(cls, table: HostTable, idx: np.ndarray, totals: np.ndarray,
                 removed: dict[str, int], top_random: int,
                 rng: random.Random | None) -> Ranking:
        """The survivors `idx` (table positions in name order) with their `totals`; the
        best `top_random` shuffled as the scalar path shuffles them."""
        self = cls([], removed, {}, [])
        self._hosts = self._scores = None
        self._count = int(idx.size)
        self._table, self._idx, self._totals = table, idx, totals
        if top_random > 1:
            n = min(top_random, self._count)
            best = _best(totals, n)
            cut = totals[best[-1]]
            at_cut = np.flatnonzero(totals == cut)  # name order, as the scalar path's
            above = np.flatnonzero(totals > cut)
            self._head = _top_few(best.tolist(), above.tolist(), at_cut.tolist(), n,
                                  rng or random)
        return self

    def __len__(self) -> int:
        """How many hosts passed every filter."""
        return self._count

    def _sorted(self, n: int) -> np.ndarray:
        """Positions in `idx`/`totals` of the best `n` hosts, in score order (unshuffled).
        A prefix of the full order is kept; a longer ask sorts again, twice as far."""
        if self._order.size < min(n, self._count):
            self._order = _best(self._totals, min(self._count, max(2 * n, 8)))
        return self._order[:n]

    def _positions(self, n: int) -> np.ndarray:
        """As `_sorted`, with the best `top_random` (`_top_few`) first, in their order."""
        if not self._head:
            return self._sorted(n)
        head = np.asarray(self._head[:n], dtype=np.int64)
        if n <= head.size:
            return head
        order = self._sorted(n + head.size)
        rest = order[~np.isin(order, head)]
        return np.concatenate([head, rest[:n - head.size]])

    def top(self, n: int) -> list[HostSnapshot]:
        """The best `n` hosts (fewer if fewer passed), best first."""
        if self._hosts is not None:
            return self._hosts[:n]
        assert self._table is not None
        snaps = self._table.snapshots
        return [snaps[i] for i in self._idx[self._positions(n)].tolist()]

    @property
    def hosts(self) -> list[HostSnapshot]:
        """Every host that passed, best first."""
        if self._hosts is None:
            self._hosts = self.top(self._count)
        return self._hosts

    @property
    def scores(self) -> dict[str, float]:
        """Each passing host's score, best first."""
        if self._scores is None:
            assert self._table is not None
            order = self._sorted(self._count)
            self._scores = dict(zip(self._table.name_array[self._idx[order]].tolist(),
                                    self._totals[order].tolist(), strict=True))
        return self._scores

    def __repr__(self) -> str:
        return (f"Ranking(hosts={[h.name for h in self.top(5)]}{'...' if len(self) > 5 else ''}"
                f", removed={self.removed})")


_EMPTY = np.zeros(0, dtype=np.int64)


def _top_few(best: list[int], above: list[int], at_cut: list[int], n: int,
             rng: random.Random | Any) -> list[int]:
    """The `n` hosts to pick at random among (host_subset_size), shuffled: the `best` `n`;
    but when more hosts tie with the `n`-th (`at_cut`, in name order) than are left after
    those scoring above it (`above`), the tied ones taken are drawn at random too, not the
    first by name. Schedulers with the same view of identical hosts (a fleet of one server
    model) then spread over all of them rather than contend for the same few."""
    if len(above) + len(at_cut) > n:
        head = above + rng.sample(at_cut, n - len(above))
    else:
        head = list(best)
    rng.shuffle(head)
    return head


def _best(totals: np.ndarray, n: int) -> np.ndarray:
    """Positions of the `n` highest totals, best first, ties in position order: the first
    `n` of a stable argsort of `-totals`, without sorting them all."""
    neg = -totals
    if n >= neg.size or neg.size <= 64:
        return np.argsort(neg, kind="stable")[:n]
    kth = np.partition(neg, n - 1)[n - 1]
    candidates = np.flatnonzero(neg <= kth)  # every host that can be among the n best
    return candidates[np.argsort(neg[candidates], kind="stable")[:n]]


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
         explain: bool = False, vectorized: bool | None = None) -> Ranking:
    """Filter, weigh and order hosts; shuffle among the best `top_random` to spread the
    contention of schedulers deciding at the same moment.

    `hosts` may be a HostTable (built once, ranked many times). `vectorized` None picks the
    path: the scalar one for `explain` and for short lists, the vectorized one otherwise.
    """
    if vectorized is None:
        vectorized = not explain and (isinstance(hosts, HostTable)
                                      or len(hosts) >= VECTOR_MIN_HOSTS)
    if vectorized and not explain:
        table = hosts if isinstance(hosts, HostTable) else HostTable(hosts)
        return _rank_vectorized(table, req, filters, weighers, top_random, rng)
    return _rank_scalar(hosts, req, filters, weighers, top_random, rng, explain)


def _rank_scalar(hosts: Sequence[HostSnapshot], req: Request, filters: Sequence[Filter],
                 weighers: Sequence[Weigher], top_random: int, rng: random.Random | None,
                 explain: bool) -> Ranking:
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
        n = min(top_random, len(ranked))
        cut = totals[order[n - 1]]
        by_name = sorted(range(len(survivors)), key=lambda i: survivors[i].name)
        head = _top_few(order[:n], [i for i in by_name if totals[i] > cut],
                        [i for i in by_name if totals[i] == cut], n, rng or random)
        chosen = set(head)
        ranked = [survivors[i] for i in head] + [h for i, h in zip(order, ranked, strict=True)
                                                 if i not in chosen]
    scores = {survivors[i].name: totals[i] for i in order}
    if explain:
        for pos, host in enumerate(ranked):
            i = survivors.index(host)
            verdicts.append({"host": host.name, "passed": True, "rank": pos + 1,
                             "score": round(totals[i], 4),
                             "weights": {name: round(vals[i], 4)
                                         for name, vals in per_weigher.items()}})
    return Ranking(ranked, removed, scores, verdicts)


_METHODS: dict[tuple[type, str], bool] = {}

_min, _max, _count = np.minimum.reduce, np.maximum.reduce, np.count_nonzero


def _own_method(obj: object, fast: str, slow: str) -> Callable[..., Any] | None:
    """`obj.fast` if its class defines it no higher up than `slow`: a subclass that overrides
    `host_passes`/`weigh` without its vectorized twin falls back to the scalar method."""
    key = (type(obj), fast)
    usable = _METHODS.get(key)
    if usable is None:
        mro = type(obj).__mro__
        fast_at = next((i for i, k in enumerate(mro) if fast in k.__dict__), None)
        slow_at = next((i for i, k in enumerate(mro) if slow in k.__dict__), None)
        usable = _METHODS[key] = fast_at is not None and (slow_at is None or fast_at <= slow_at)
    return getattr(obj, fast) if usable else None  # type: ignore[no-any-return]


def _rank_vectorized(table: HostTable, req: Request, filters: Sequence[Filter],
                     weighers: Sequence[Weigher], top_random: int,
                     rng: random.Random | None) -> Ranking:
    # Runs for every placement decision over every host: numpy calls only, no copies that
    # are not needed (masks are never changed in place, so the first can be a table's own).
    snaps = table.snapshots
    removed = {f.name: 0 for f in filters}
    remaining: np.ndarray | None = None
    left = len(table)
    debug = log.isEnabledFor(logging.DEBUG)
    for flt in filters:
        if not left:
            break
        mask = _own_method(flt, "mask", "host_passes")
        if mask is not None:
            passes = np.asarray(mask(table, req), dtype=bool)
        else:
            passes = np.ones(len(table), dtype=bool)
            todo = range(len(table)) if remaining is None else np.flatnonzero(remaining).tolist()
            for i in todo:
                passes[i] = bool(flt.host_passes(snaps[i], req))
        kept = passes if remaining is None else remaining & passes
        still = int(_count(kept))
        if still != left:
            removed[flt.name] += left - still
            if debug:
                was = np.ones(len(table), dtype=bool) if remaining is None else remaining
                for i in np.flatnonzero(was & ~passes).tolist():
                    log.debug("host %s fails filter %s: %s", snaps[i].name, flt.name,
                              flt.why(snaps[i], req))
            remaining, left = kept, still
    if not left:
        return Ranking([], removed, {}, [])
    # Survivors in name order: a stable sort on the score then breaks ties by name.
    idx = table.name_order if remaining is None else \
        table.name_order[remaining[table.name_order]]
    totals = np.zeros(idx.size, dtype=np.float64)
    for w in weighers:
        if w.multiplier == 0:
            continue
        weigh_all = _own_method(w, "weigh_all", "weigh")
        if weigh_all is not None:
            raw = np.asarray(weigh_all(table, req), dtype=np.float64)[idx]  # a copy
        else:
            raw = np.array([w.weigh(snaps[i], req) for i in idx.tolist()], dtype=np.float64)
        lo, hi = _min(raw), _max(raw)
        if hi == lo:
            continue  # all 0.0 after normalising: adds nothing
        # multiplier * ((raw - lo) / (hi - lo)), as the scalar path computes it, in place
        raw -= lo
        raw /= hi - lo
        raw *= w.multiplier
        totals += raw
    return Ranking._ordered(table, idx, totals, removed, top_random, rng)
