"""`virtfleet bench placement` on a small SQLite store: what it counts and checks (its figures
are not asserted: a benchmark reports, tests do not time)."""

from __future__ import annotations

from pathlib import Path

from bench import placement
from fleet.config import Settings
from fleet.store.migrate import upgrade
from fleet.store.session import Store


def test_placement_bench_times_only_the_decisions_after_the_warm_up(tmp_path: Path) -> None:
    """Each decider's warm-up decisions are real claims made before the clock: they are not
    among the timed ones, and the store's check counts them with the others."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade(url)
    store = Store(url)
    try:
        result = placement.run_one("sqlite", store, 30, 40, Settings(host_name="bench"),
                                   deciders=2, warmup=5)
    finally:
        store.dispose()
    assert (result.placed, result.refused, result.warm_placed) == (40, 0, 10)
    assert len(result.breakdown_ms) == 5 and result.lost_cas == 0
    assert not result.over_capacity and not result.claims_mismatch, result
    assert result.seconds > 0 and result.p99_ms >= result.p50_ms > 0
