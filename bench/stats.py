"""Small helpers every benchmark shares: percentiles, SIGTERM handled like Ctrl-C so the
same clean-up runs, and how much of the machine's CPU time the hypervisor took meanwhile."""

from __future__ import annotations

import math
import signal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, interpolating linearly between ranks
    (numpy's default). Raises ``ValueError`` on an empty sequence or ``q`` out of range."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError("q must be between 0 and 100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def cpu_times(stat: str = "/proc/stat") -> tuple[int, int] | None:
    """(steal, all) of the machine's CPU time so far, in clock ticks: the first line of
    /proc/stat (user nice system idle iowait irq softirq steal ...). None where there is
    none (not Linux)."""
    try:
        with open(stat, encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:9]]  # guest time is already counted in user
    return ticks[7], sum(ticks)


def steal_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """Of the machine's CPU time between two `cpu_times`, the share the hypervisor gave to
    other guests (steal): on a shared VM, what a benchmark's figures moved with."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, so the same clean-up runs as on Ctrl-C."""
    def handler(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
