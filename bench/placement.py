"""`virtfleet bench placement`: how many placement decisions per second the store sustains, and
how long each takes, at N simulated hosts, on SQLite and on PostgreSQL.

One decision is one committed write transaction (`Store.transaction()`: Core, no ORM Session):
rank every host for the request from the process's host cache (scheduler/hostcache.py, kept
warm by the process's own claims and refreshed from the store every `host_cache_ttl`), then
claim on the best host with the compare-and-set on its generation, the claim's row and the
VM's row (placed, `building`: what the host cache counts as a VM and a build), all or
nothing (claims.claim with a PlacedRow). On SQLite that is BEGIN IMMEDIATE, UPDATE, INSERT,
INSERT, COMMIT in this process; on PostgreSQL one statement (UPDATE ... RETURNING feeding both
INSERTs) that commits by itself: one round trip. A compare-and-set lost to a stale cached host
writes nothing and the next candidate is tried. Its latency is taken around all of that.
Decisions run one after another in this process; a breakdown says where each one's time
went (begin, rank, claim statements, commit, the rest).

Before the clock starts, each decider makes `warmup` decisions of its own (as kube-scheduler's
scheduler_perf places its init pods before the measured ones): the process's first decision
opens its connections, compiles its statements and reads every host into its cache (~0.1 s
on PostgreSQL), a start-up cost, not a decision's. They are real claims, reported apart and
checked with the others; the cache's refreshes during the timed decisions are timed.

Owns a throwaway store per database (a SQLite file in a temporary directory; a fresh
PostgreSQL schema, dropped afterwards), its hosts, the timing and the report, and a check
afterwards that no host holds more than its capacity times its ratio, that every host's
used capacity is the sum of its claims, and that every decision left one claim and one placed
VM. Must not touch any other database or schema; a benchmark reports, it does not fail
(`strict` aside).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import random
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, func, insert, select, text
from sqlalchemy.engine import make_url

from bench.stats import cpu_times, percentile, steal_share
from fleet.config import Settings
from fleet.store.migrate import upgrade
from fleet.store.models import VM, Claim, Host, Image, Project, new_id, utcnow
from fleet.store.session import Store
from scheduler import claims, hostcache
from scheduler.snapshot import Request
from web.server import GIL_SWITCH_INTERVAL

TARGET_PER_SECOND = 1000.0
"""Decisions per second to reach (each one transaction with its claim)."""

TARGET_P99_MS = 5.0
"""Slowest 1% of decisions may take at most this long."""

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:55432/virtfleet_test"
"""The throwaway test cluster of `scripts/services.sh start-test` (VIRTFLEET_TEST_PG_URL
overrides it)."""

PG_ENV = "VIRTFLEET_TEST_PG_URL"

DEFAULT_WARMUP = 50
"""Untimed decisions each decider makes before the clock starts."""

SEED = 20240611
"""Hosts and requests are random but the same every run."""

ZONES = ("a", "b", "c", "d")

FLAVORS: tuple[tuple[int, int, int], ...] = ((1, 512, 10), (1, 1024, 20), (2, 2048, 20),
                                             (2, 4096, 40), (4, 8192, 80))
"""(vcpus, memory_mb, disk_gb) of the VMs asked for."""


@dataclass
class Result:
    db: str
    hosts: int
    decisions: int
    warmup: int = 0
    """Decisions made before the clock started (per decider), not timed."""
    deciders: int = 1
    """Threads deciding at once in each deciding process."""
    processes: int = 1
    """Processes deciding at once (each its own store connections and host cache, as
    several API processes or controllers sharing PostgreSQL have)."""
    placed: int = 0
    refused: int = 0
    warm_placed: int = 0
    """Of the warm-up decisions, those placed."""
    seconds: float = 0.0
    per_second: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    breakdown_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per phase of a decision: mean, p50 and p99 in ms."""
    cpu_ms: float = 0.0
    """The deciding processes' CPU time per decision (wall time on an idle core, for
    SQLite)."""
    load: str = ""
    """The machine's load averages when the run ended (the figures depend on it)."""
    steal: float | None = None
    """Share of the machine's CPU time the hypervisor gave to other guests while the
    decisions were timed (None where unknown)."""
    lost_cas: int = 0
    """Compare-and-sets lost (a cached host was stale)."""
    cache_reloads: int = 0
    cache_full_reloads: int = 0
    over_capacity: list[str] = field(default_factory=list)
    claims_mismatch: list[str] = field(default_factory=list)
    passed: bool = False
    error: str = ""


@contextmanager
def sqlite_store() -> Iterator[Store]:
    with tempfile.TemporaryDirectory(prefix="vf-bench-placement-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'store.db'}"
        upgrade(url)
        store = Store(url)
        try:
            yield store
        finally:
            store.dispose()


@contextmanager
def postgres_store(base_url: str) -> Iterator[Store]:
    """A fresh schema in the database at `base_url`, dropped afterwards."""
    schema = f"vf_bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base_url, connect_args={"connect_timeout": 10})
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(base_url).update_query_dict({"options": f"-csearch_path={schema}"})
    rendered = url.render_as_string(hide_password=False)
    store = None
    try:
        upgrade(rendered)
        store = Store(rendered)
        yield store
    finally:
        if store is not None:
            store.dispose()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def populate(store: Store, n_hosts: int, rng: random.Random) -> tuple[int, str, str]:
    """N hosts of varied sizes, ratios and labels (a few down, disabled or in maintenance),
    one project and one image. Returns (project id, image id, image sha256)."""
    sha = "ab" * 32
    rows: list[dict[str, Any]] = []
    for i in range(n_hosts):
        labels = {"zone": ZONES[i % len(ZONES)]}
        if i % 3 == 0:
            labels["disk"] = "ssd"
        rows.append(dict(
            name=f"host-{i:05d}", arch="x86_64", virt_type=rng.choice(("kvm", "qemu")),
            vcpus=rng.choice((16, 32, 48, 64)), memory_mb=rng.choice((65536, 131072, 262144)),
            disk_gb=rng.choice((1000, 2000, 4000)), used_vcpus=0, used_memory_mb=0,
            used_disk_gb=0, cpu_ratio=rng.choice((None, 2.0, 4.0)),
            ram_ratio=rng.choice((None, 1.0, 1.5)), disk_ratio=None,
            max_vms=rng.choice((None, None, 50)), generation=0,
            alive=i % 97 != 5, enabled=i % 89 != 7, maintenance=i % 83 == 11,
            labels=labels, cached_images=[sha] if i % 4 == 0 else [], load=0.0))
    with store.session() as s:
        s.execute(insert(Host), rows)
        project = Project(name="bench")
        s.add(project)
        s.flush()
        image = Image(name="bench", project_id=project.id, sha256=sha, size_bytes=1 << 20)
        s.add(image)
        s.flush()
        return project.id, image.id, sha


PHASES = ("begin", "rank", "claim", "commit")


class Timer:
    """Where one decision's time goes: wraps claims.rank and claims.try_claim (they are
    looked up in the module at each call) and adds up their time, per decider thread
    (`rank`, `claim`: the calling thread's totals; `lost`: every thread's lost
    compare-and-sets)."""

    def __init__(self) -> None:
        self._mine = threading.local()
        self._lock = threading.Lock()
        self.lost = 0
        self._rank, self._try_claim = claims.rank, claims.try_claim

    @property
    def rank(self) -> float:
        return float(getattr(self._mine, "rank", 0.0))

    @property
    def claim(self) -> float:
        return float(getattr(self._mine, "claim", 0.0))

    def timed_rank(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self._rank(*args, **kwargs)
        finally:
            self._mine.rank = self.rank + time.perf_counter() - t0

    def timed_try_claim(self, *args: Any, **kwargs: Any) -> bool:
        t0 = time.perf_counter()
        try:
            won = bool(self._try_claim(*args, **kwargs))
        finally:
            self._mine.claim = self.claim + time.perf_counter() - t0
        if not won:
            with self._lock:
                self.lost += 1
        return won

    @contextmanager
    def installed(self) -> Iterator[Timer]:
        claims.rank, claims.try_claim = self.timed_rank, self.timed_try_claim  # type: ignore[assignment]
        try:
            yield self
        finally:
            claims.rank, claims.try_claim = self._rank, self._try_claim  # type: ignore[assignment]


def decide(store: Store, settings: Settings, project_id: int, image_id: str, name: str,
           req: Request, timer: Timer, phases: dict[str, list[float]]) -> str:
    """One decision: rank + claim with the VM row (claims.claim with a PlacedRow), committed."""
    vm_id = new_id()
    now = utcnow()
    row = claims.PlacedRow(VM.__table__, {
        "id": vm_id, "name": name, "project_id": project_id, "image_id": image_id,
        "vcpus": req.vcpus, "memory_mb": req.memory_mb, "disk_gb": req.disk_gb,
        "user_data": "", "state": "building", "mac": "52:54:00:00:00:00",
        "constraints": dict(req.constraints), "created_at": now, "updated_at": now})
    rank0, claim0 = timer.rank, timer.claim
    t0 = time.perf_counter()
    with store.transaction(single_statement=True) as conn:
        t1 = time.perf_counter()  # SQLite: BEGIN IMMEDIATE (the write lock) is taken
        placed = claims.claim(conn, vm_id, req, settings, row=row)
        t2 = time.perf_counter()
    t3 = time.perf_counter()
    rank_s, claim_s = timer.rank - rank0, timer.claim - claim0
    phases["begin"].append(t1 - t0)
    phases["rank"].append(rank_s)
    phases["claim"].append(claim_s)
    phases["commit"].append(t3 - t2)
    phases["other"].append((t2 - t1) - rank_s - claim_s)
    return placed.host.name


def verify(store: Store, settings: Settings, result: Result) -> None:
    """No host above capacity x ratio; each host's used capacity is the sum of its claims."""
    with store.sessions() as s:
        sums = {hid: (int(v), int(m), int(d), int(n)) for hid, v, m, d, n in s.execute(
            select(Claim.host_id, func.sum(Claim.vcpus), func.sum(Claim.memory_mb),
                   func.sum(Claim.disk_gb), func.count(Claim.id)).group_by(Claim.host_id))}
        placed = s.scalar(select(func.count(VM.id)).where(VM.host_id.is_not(None))) or 0
        for h in s.scalars(select(Host)):
            cpu = h.vcpus * (h.cpu_ratio or settings.cpu_allocation_ratio)
            ram = h.memory_mb * (h.ram_ratio or settings.ram_allocation_ratio)
            disk = h.disk_gb * (h.disk_ratio or settings.disk_allocation_ratio)
            if h.used_vcpus > cpu or h.used_memory_mb > ram or h.used_disk_gb > disk:
                result.over_capacity.append(h.name)
            v, m, d, _ = sums.get(h.id, (0, 0, 0, 0))
            if (h.used_vcpus, h.used_memory_mb, h.used_disk_gb) != (v, m, d):
                result.claims_mismatch.append(h.name)
        made = result.placed + result.warm_placed
        if placed != made or sum(x[3] for x in sums.values()) != made:
            result.claims_mismatch.append(f"placed {made} VMs but the store has "
                                          f"{placed} placed and "
                                          f"{sum(x[3] for x in sums.values())} claims")


@dataclass
class Part:
    """What the deciders of one process measured."""

    latencies: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=dict)
    placed: int = 0
    refused: int = 0
    warm_placed: int = 0
    lost: int = 0
    started: float = 0.0
    """time.perf_counter() when the deciders set off (CLOCK_MONOTONIC: one clock for
    every process of the machine)."""
    ended: float = 0.0
    cpu_s: float = 0.0
    steal: float | None = None
    """The machine's steal share while this part's decisions were timed."""
    reloads: int = 0
    full_reloads: int = 0


def run_deciders(store: Store, settings: Settings, project_id: int, image_id: str,
                 plan: Sequence[tuple[str, Request]], deciders: int,
                 ready: Any = None, warm: Sequence[tuple[str, Request]] = ()) -> Part:
    """`plan` decided by `deciders` threads of this process at once (as the web's request
    threads decide), each taking every deciders-th request. Each first decides its share of
    `warm`, untimed; the clock starts once all have, and `ready` (a barrier shared with
    other processes) is passed."""
    part = Part(phases={p: [] for p in (*PHASES, "other")})
    timer = Timer()
    failures: list[BaseException] = []
    at_start: dict[str, Any] = {}
    """What the clock's start saw: lost compare-and-sets, process CPU, machine CPU times."""

    def start() -> None:
        """Run by the last decider to have warmed up, before any goes on."""
        if ready is not None:
            ready.wait()
        at_start["lost"] = timer.lost
        at_start["machine"] = cpu_times()
        part.started, at_start["cpu"] = time.perf_counter(), time.process_time()

    go = threading.Barrier(deciders, action=start)
    lock = threading.Lock()  # guards `part` while the deciders add to it

    def decider(share: Sequence[tuple[str, Request]],
                warm_share: Sequence[tuple[str, Request]]) -> None:
        """One decider: its warm-up, then its share of the plan, one decision after
        another."""
        mine: dict[str, list[float]] = {p: [] for p in part.phases}
        lat: list[float] = []
        placed = refused = warm_placed = 0
        try:
            scratch: dict[str, list[float]] = {p: [] for p in part.phases}
            for name, req in warm_share:
                try:
                    decide(store, settings, project_id, image_id, name, req, timer, scratch)
                    warm_placed += 1
                except claims.NoValidHost:
                    pass
            go.wait()
            for name, req in share:
                t0 = time.perf_counter()
                try:
                    decide(store, settings, project_id, image_id, name, req, timer, mine)
                    placed += 1
                except claims.NoValidHost:
                    refused += 1
                lat.append(time.perf_counter() - t0)
        except BaseException as exc:  # noqa: BLE001 - reported by run_one
            failures.append(exc)
            go.abort()
        with lock:
            part.latencies.extend(lat)
            for phase, values in mine.items():
                part.phases[phase].extend(values)
            part.placed += placed
            part.refused += refused
            part.warm_placed += warm_placed

    hostcache.reset()
    switch = sys.getswitchinterval()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)  # as in the API processes (web/server.py)
    with timer.installed():
        threads = [threading.Thread(target=decider, args=(plan[k::deciders],
                                                          warm[k::deciders]),
                                    name=f"decider-{k}") for k in range(1, deciders)]
        for t in threads:
            t.start()
        decider(plan[0::deciders], warm[0::deciders])
        for t in threads:
            t.join()
        part.ended = time.perf_counter()
        part.cpu_s = time.process_time() - at_start.get("cpu", 0.0)
        part.steal = steal_share(at_start.get("machine"), cpu_times())
    sys.setswitchinterval(switch)
    if failures:
        raise failures[0]
    part.lost = timer.lost - int(at_start["lost"])
    part.reloads = sum(c.reloads for c in hostcache.caches())
    part.full_reloads = sum(c.full_reloads for c in hostcache.caches())
    hostcache.reset()
    return part


def _process(url: str, settings: Settings, project_id: int, image_id: str,
             plan: Sequence[tuple[str, Request]], deciders: int, ready: Any,
             out: Any, warm: Sequence[tuple[str, Request]] = ()) -> None:
    """One deciding process (forked): its own store and host cache, as another API process
    or controller would have; sends back its Part, or the error it met."""
    store = Store(url)
    try:
        out.send(run_deciders(store, settings, project_id, image_id, plan, deciders, ready,
                              warm))
    except BaseException as exc:  # noqa: BLE001 - reported by the parent
        ready.abort()
        out.send(f"{type(exc).__name__}: {exc}")
    finally:
        store.dispose()
        out.close()


def run_processes(store: Store, settings: Settings, project_id: int, image_id: str,
                  plan: Sequence[tuple[str, Request]], deciders: int,
                  processes: int, warm: Sequence[tuple[str, Request]] = ()) -> list[Part]:
    """`plan` shared out over `processes` forked processes deciding at once, each with its
    own store connections and host cache (they learn of each other's claims from the store
    only: by a lost compare-and-set, or at their cache's refresh)."""
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Barrier(processes)
    store.dispose()  # no connection is shared with the children
    hostcache.reset()
    children = []
    for p in range(processes):
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_process, name=f"decider-process-{p}", args=(
            store.url, settings, project_id, image_id, plan[p::processes], deciders, ready,
            send, warm[p::processes]))
        proc.start()
        send.close()
        children.append((proc, receive))
    parts: list[Part] = []
    errors: list[str] = []
    for proc, receive in children:
        try:
            got = receive.recv()
        except EOFError:
            got = f"a deciding process ended without a result (exit {proc.exitcode})"
        proc.join()
        receive.close()
        if isinstance(got, Part):
            parts.append(got)
        else:
            errors.append(str(got))
    if errors:
        raise RuntimeError(errors[0])
    return parts


def requests(rng: random.Random, sha: str, n: int, prefix: str
             ) -> list[tuple[str, Request]]:
    """`n` named requests of the bench's mix: flavors, a fifth with a zone, a twentieth with
    a zone and an SSD."""
    plan = []
    for i in range(n):
        roll = rng.random()
        constraints = ({"zone": rng.choice(ZONES)} if roll < 0.2
                       else {"zone": rng.choice(ZONES), "disk": "ssd"} if roll < 0.25 else {})
        vcpus, memory_mb, disk_gb = rng.choice(FLAVORS)
        plan.append((f"{prefix}-{i:06d}", Request(
            vcpus=vcpus, memory_mb=memory_mb, disk_gb=disk_gb, image_sha256=sha,
            constraints=constraints)))
    return plan


def run_one(db: str, store: Store, n_hosts: int, n_decisions: int,
            settings: Settings, deciders: int = 1, processes: int = 1,
            warmup: int = 0) -> Result:
    """`n_decisions` on `n_hosts` fresh hosts by `deciders` threads in each of `processes`
    processes, all at once, after `warmup` untimed decisions by each decider."""
    rng = random.Random(SEED)
    result = Result(db=db, hosts=n_hosts, decisions=n_decisions, warmup=warmup,
                    deciders=deciders, processes=processes)
    project_id, image_id, sha = populate(store, n_hosts, rng)
    plan = requests(rng, sha, n_decisions, "vm")
    warm = requests(rng, sha, warmup * deciders * processes, "warm")
    if processes == 1:
        parts = [run_deciders(store, settings, project_id, image_id, plan, deciders,
                              warm=warm)]
    else:
        parts = run_processes(store, settings, project_id, image_id, plan, deciders,
                              processes, warm)
    result.seconds = max(p.ended for p in parts) - min(p.started for p in parts)
    result.cpu_ms = sum(p.cpu_s for p in parts) * 1000.0 / max(n_decisions, 1)
    result.placed = sum(p.placed for p in parts)
    result.refused = sum(p.refused for p in parts)
    result.warm_placed = sum(p.warm_placed for p in parts)
    result.load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    steals = [p.steal for p in parts if p.steal is not None]
    result.steal = max(steals) if steals else None
    result.lost_cas = sum(p.lost for p in parts)
    for phase in (*PHASES, "other"):
        values = [v for p in parts for v in p.phases.get(phase, ())]
        if values:
            ms = [v * 1000.0 for v in values]
            result.breakdown_ms[phase] = {"mean": sum(ms) / len(ms), "p50": percentile(ms, 50),
                                          "p99": percentile(ms, 99)}
    result.cache_reloads = sum(p.reloads for p in parts)
    result.cache_full_reloads = sum(p.full_reloads for p in parts)
    result.per_second = n_decisions / result.seconds if result.seconds else 0.0
    ms = [x * 1000.0 for p in parts for x in p.latencies]
    result.p50_ms, result.p95_ms = percentile(ms, 50), percentile(ms, 95)
    result.p99_ms, result.max_ms = percentile(ms, 99), max(ms, default=0.0)
    verify(store, settings, result)
    result.passed = (result.per_second >= TARGET_PER_SECOND and result.p99_ms <= TARGET_P99_MS
                     and not result.over_capacity and not result.claims_mismatch)
    return result


def report(results: Sequence[Result], settings: Settings) -> str:
    lines = [f"placement bench: 1 decision = 1 committed transaction (rank from the host "
             f"cache + compare-and-set + claim row + VM row, committed; PostgreSQL: one "
             f"statement, one round trip); "
             f"host_cache_ttl={settings.host_cache_ttl:g}s; "
             f"{results[0].warmup if results else 0} untimed warm-up decisions per decider "
             f"first; "
             f"host_subset_size={settings.host_subset_size}; "
             f"targets >= {TARGET_PER_SECOND:.0f}/s, p99 <= {TARGET_P99_MS:g} ms"]
    for r in results:
        if r.error:
            lines.append(f"{r.db:<10} ERROR {r.error}")
            continue
        lines.append(
            f"{r.db:<10} hosts={r.hosts} decisions={r.decisions} processes={r.processes} "
            f"deciders={r.deciders} "
            f"placed={r.placed} "
            f"refused={r.refused} (warm-up placed {r.warm_placed}) in {r.seconds:.2f}s: "
            f"{r.per_second:.0f} decisions/s; "
            f"latency ms p50 {r.p50_ms:.2f} p95 {r.p95_ms:.2f} p99 {r.p99_ms:.2f} "
            f"max {r.max_ms:.2f}; host cache reloads {r.cache_reloads} "
            f"({r.cache_full_reloads} in full); lost compare-and-sets {r.lost_cas}")
        steal = "unknown" if r.steal is None else f"{r.steal * 100:.1f}%"
        lines.append(f"{'':<10} deciding processes' CPU per decision {r.cpu_ms:.3f} ms; "
                     f"load average {r.load} on {os.cpu_count()} CPUs; the hypervisor's "
                     f"steal while timed: {steal} of the machine's CPU time")
        if r.breakdown_ms:
            lines.append(f"{'':<10} ms per decision, mean/p99: " + "; ".join(
                f"{phase} {b['mean']:.3f}/{b['p99']:.3f}" for phase, b in r.breakdown_ms.items()))
        lines.append(
            f"{'':<10} check: hosts over capacity x ratio: {len(r.over_capacity)}"
            f"{' ' + ', '.join(r.over_capacity[:5]) if r.over_capacity else ''}; "
            f"hosts whose used != sum of claims: {len(r.claims_mismatch)}"
            f"{' ' + '; '.join(r.claims_mismatch[:5]) if r.claims_mismatch else ''}")
        lines.append(f"{'':<10} {'PASS' if r.passed else 'FAIL'} "
                     f"({r.per_second:.0f}/s vs >= {TARGET_PER_SECOND:.0f}/s, p99 "
                     f"{r.p99_ms:.2f} ms vs <= {TARGET_P99_MS:g} ms)")
    return "\n".join(lines)


def main(hosts: int = 1000, decisions: int = 3000, db: str = "both", pg_url: str | None = None,
         as_json: bool = False, strict: bool = False, host_cache_ttl: float | None = None,
         deciders: int = 1, processes: int = 1, host_subset_size: int = 1,
         warmup: int = DEFAULT_WARMUP) -> int:
    settings = Settings(host_name="bench", host_subset_size=host_subset_size)
    if host_cache_ttl is not None:
        settings = dataclasses.replace(settings, host_cache_ttl=host_cache_ttl)
    dbs = ("sqlite", "postgresql") if db == "both" else (db,)
    results: list[Result] = []
    for name in dbs:
        try:
            if name == "sqlite":
                with sqlite_store() as store:
                    results.append(run_one(name, store, hosts, decisions, settings, deciders,
                                           processes, warmup))
            else:
                url = pg_url or os.environ.get(PG_ENV) or DEFAULT_PG_URL
                with postgres_store(url) as store:
                    results.append(run_one(name, store, hosts, decisions, settings, deciders,
                                           processes, warmup))
        except Exception as exc:  # noqa: BLE001 - reported, the other database still runs
            results.append(Result(db=name, hosts=hosts, decisions=decisions, warmup=warmup,
                                  error=f"{type(exc).__name__}: {exc}"))
    if as_json:
        print(json.dumps({"targets": {"per_second": TARGET_PER_SECOND,
                                      "p99_ms": TARGET_P99_MS},
                          "host_cache_ttl": settings.host_cache_ttl,
                          "host_subset_size": settings.host_subset_size,
                          "results": [asdict(r) for r in results]}, indent=2))
    else:
        print(report(results, settings))
    ok = all(r.passed for r in results)
    return 1 if strict and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
