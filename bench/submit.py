"""`virtfleet bench submit`: how long from ``POST /api/v1/vms`` to a running domain, next to a
bare ``virsh define`` + ``virsh start`` of the same disks and XML, and how long the overlay and
the seed ISO take to make.

Owns the measurement loop, its statistics and its report (a table, or JSON). Starts its own
throwaway cluster with :mod:`bench.cluster` (one worker ``bench``, QEMU TCG), runs one domain
at a time, and removes every domain and file it made, also on Ctrl-C or SIGTERM. Must not
change the system it measures; a benchmark reports, it does not fail (``strict`` aside).
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import shutil
import sys
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.stats import percentile, sigterm_as_interrupt

OVERHEAD_TARGET_MS = 150.0
"""Orchestration may add at most this much at p50 over the bare define + start."""

OVERLAY_SEED_TARGET_MS = 50.0
"""Overlay + seed ISO creation should take at most this long at p50."""

WORKER = "bench"
"""Name of the cluster's only worker (and of its queue, ``host.bench``)."""

VIRT_URI = "qemu:///system"
"""The libvirt connection both paths use."""

VIRSH = "virsh"
"""The virsh program (looked up on PATH)."""

VIRSH_TIMEOUT = 60.0
"""Seconds allowed for one virsh call."""

VCPUS, MEMORY_MB, DISK_GB = 1, 128, 1
"""The guest every run creates."""

API_POLL_MS = 10.0
"""Pause between two GET /vms/<id> (each costs the web 5-15 ms of CPU: on a 2-core host a
tighter loop would slow the path it measures)."""

VIRT_POLL_MS = 5.0
"""Pause between two libvirt domain-state polls (two cheap RPCs)."""

HOST_DOWN_RETRIES = 3
"""Submissions retried after a 409 because the worker was (briefly) marked down."""

RUN_TIMEOUT = 120.0
"""Seconds one submission may take to reach ``running`` before the bench gives up."""

BARE_PREFIX = "vfbench-"
"""Domain-name prefix of bare-path domains: not ``vf-``, so the worker's lifecycle listener
does not forward their events to the scheduler while the baseline is timed."""

STAGES: tuple[tuple[str, str, str, str], ...] = (
    ("web_place", "POST sent -> web wrote 'building' (auth, place, claim)", "send", "building"),
    ("queue_pickup", "'building' -> worker starts (commit, send, pickup)", "building", "image"),
    ("image_step", "image step (cache.ensure_base)", "image", "overlay"),
    ("overlay_step", "overlay step (qemu-img info + create)", "overlay", "seed"),
    ("seed_step", "seed step (pycdlib ISO)", "seed", "define"),
    ("define_start", "define step -> build.done sent (XML, libvirt)", "define", "done"),
    ("event_apply", "build.done -> scheduler applied it (queue, DB)", "done", "applied"),
    ("api_visible", "applied -> client sees running (poll, GET)", "applied", "api_running"),
)
"""Consecutive stages of one API submission: (JSON key, label, from milestone, to milestone);
milestones come from Bench.api_run and milestones_from_events. They add up to 'POST -> API
shows running'."""

EXTRA_STAGES: tuple[tuple[str, str, str, str], ...] = (
    ("post_202", "POST sent -> 202 received (client)", "send", "accepted"),
    ("define_to_libvirt", "define step -> client sees libvirt running", "define",
     "libvirt_running"),
    ("done_to_started_event", "build.done -> lifecycle 'started' sent", "done", "started"),
)
"""Overlapping intervals shown for reference."""

OUTSIDE_LIBVIRT = ("outside_define_start", "= all stages but define + start (per-run sum)")
"""Per run, the API path's time outside the worker's define + start: what orchestration
adds, measured within one run, so less at the mercy of libvirt's run-to-run spread."""


# ------------------------------------------------------------------ statistics (pure)


def summarize(values: Sequence[float]) -> dict[str, float | int]:
    """``{n, p50, p95, min, max, mean}`` of ``values`` rounded to 0.1; ``{n: 0}`` when empty."""
    if not values:
        return {"n": 0}
    return {"n": len(values),
            "p50": round(percentile(values, 50), 1),
            "p95": round(percentile(values, 95), 1),
            "min": round(min(values), 1),
            "max": round(max(values), 1),
            "mean": round(sum(values) / len(values), 1)}


def verdict(value: float | None, limit: float) -> str:
    """``PASS`` when ``value`` is at most ``limit``, ``FAIL`` above it, ``n/a`` without one."""
    if value is None:
        return "n/a"
    return "PASS" if value <= limit else "FAIL"


def overhead(api: dict[str, Any], bare: dict[str, Any], limit: float,
             paired: Sequence[float] = ()) -> dict[str, Any]:
    """p50(api) − p50(bare) in ms, their ratio, and the verdict against ``limit``; with
    ``paired`` (per-round api − bare differences) also their p50, for reference."""
    paired_p50 = round(percentile(paired, 50), 1) if paired else None
    if not api.get("n") or not bare.get("n"):
        return {"p50_ms": None, "ratio": None, "target_ms": limit, "verdict": "n/a",
                "paired_p50_ms": paired_p50}
    diff = float(api["p50"]) - float(bare["p50"])
    ratio = float(api["p50"]) / float(bare["p50"]) if bare["p50"] else None
    return {"p50_ms": round(diff, 1), "ratio": round(ratio, 2) if ratio is not None else None,
            "target_ms": limit, "verdict": verdict(diff, limit), "paired_p50_ms": paired_p50}


def paired(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per-round differences ``a[i] - b[i]`` (rounds where both were measured)."""
    return [x - y for x, y in zip(a, b, strict=False)]


def stage_samples(runs: Sequence[dict[str, float]]) -> dict[str, list[float]]:
    """Per stage of :data:`STAGES`, its duration (ms) in each run that has both milestones."""
    out: dict[str, list[float]] = {}
    for key, _label, start, end in STAGES + EXTRA_STAGES:
        out[key] = [(m[end] - m[start]) * 1000 for m in runs if start in m and end in m]
    need = ("send", "api_running", "define", "done")
    out[OUTSIDE_LIBVIRT[0]] = [
        ((m["api_running"] - m["send"]) - (m["done"] - m["define"])) * 1000
        for m in runs if all(k in m for k in need)]
    return out


def exit_code(report: dict[str, Any], strict: bool) -> int:
    """0, unless ``strict`` and some target was missed (then 1)."""
    verdicts = [v["verdict"] for v in report["targets"].values()]
    return 1 if strict and "FAIL" in verdicts else 0


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}"


def render(report: dict[str, Any]) -> str:
    """The report as a readable table."""
    r = report
    lines = [f"virtfleet bench submit: {r['runs']} runs after {r['warmup']} warm-up, "
             f"guest {r['guest']['vcpus']} vCPU / {r['guest']['memory_mb']} MiB, "
             f"virt type {r['virt_type']}, polls every {r['poll_ms']['api']:g} ms (API) / "
             f"{r['poll_ms']['libvirt']:g} ms (libvirt)", ""]
    head = f"{'measure (ms)':<54}{'n':>4}{'p50':>9}{'p95':>9}{'min':>9}{'max':>9}"
    rows = [
        ("API: POST -> API shows running", r["api_to_running_api"]),
        ("API: POST -> libvirt reports running", r["api_to_running_libvirt"]),
        ("bare: virsh define + start (wall time)", r["bare_define_start"]),
        ("bare: define + start until domstate running", r["bare_until_domstate"]),
        ("overlay (qemu-img) + seed ISO", r["overlay_seed"]),
        ("  overlay only", r["overlay"]),
        ("  seed only", r["seed"]),
    ]

    def row(label: str, s: dict[str, Any]) -> str:
        return (f"{label:<54}{s.get('n', 0):>4}{_fmt(s.get('p50')):>9}{_fmt(s.get('p95')):>9}"
                f"{_fmt(s.get('min')):>9}{_fmt(s.get('max')):>9}")

    lines += [head, "-" * len(head), *(row(label, s) for label, s in rows), ""]
    lines.append("targets (bare = virsh define + start wall time):")
    t = r["targets"]
    for key, label in (("overhead_api", "API shows running"),
                       ("overhead_libvirt", "libvirt reports running")):
        o = t[key]
        ratio = "-" if o["ratio"] is None else f"{o['ratio']:.2f}x"
        lines.append(f"  overhead, {label:<24} p50 {_fmt(o['p50_ms']):>8} ms over bare "
                     f"({ratio}), target <= {o['target_ms']:g} ms: {o['verdict']}"
                     f"   [paired p50 {_fmt(o.get('paired_p50_ms'))} ms]")
    outside = r["breakdown"].get(OUTSIDE_LIBVIRT[0], {})
    lines.append(f"  for reference: per run, all but define + start   p50 "
                 f"{_fmt(outside.get('p50')):>8} ms (free of libvirt's run-to-run spread)")
    o = t["overlay_seed"]
    lines.append(f"  overlay + seed creation          p50 {_fmt(o['p50_ms']):>8} ms, "
                 f"target <= {o['target_ms']:g} ms: {o['verdict']}")
    lines += ["", "where the API path's time goes (ms, per run, from event timestamps):",
              f"{'stage':<54}{'n':>4}{'p50':>9}{'p95':>9}{'min':>9}{'max':>9}"]
    for key, label, _s, _e in STAGES:
        lines.append(row("  " + label, r["breakdown"].get(key, {"n": 0})))
    key, label = OUTSIDE_LIBVIRT
    lines.append(row("  " + label, r["breakdown"].get(key, {"n": 0})))
    lines.append("  for reference (overlapping):")
    for key, label, _s, _e in EXTRA_STAGES:
        lines.append(row("  " + label, r["breakdown"].get(key, {"n": 0})))
    if r.get("notes"):
        lines += ["", *(f"note: {n}" for n in r["notes"])]
    return "\n".join(lines)


def build_report(samples: dict[str, Any], *, runs: int, warmup: int, virt_type: str,
                 poll_ms: dict[str, float], notes: Sequence[str] = ()) -> dict[str, Any]:
    """All figures from raw samples (lists of ms, and per-run milestone dicts)."""
    s = {k: summarize(samples.get(k, [])) for k in (
        "api_to_running_api", "api_to_running_libvirt", "bare_define_start",
        "bare_until_domstate", "overlay_seed", "overlay", "seed")}
    ovs = s["overlay_seed"]
    return {
        "runs": runs, "warmup": warmup, "virt_type": virt_type, "poll_ms": poll_ms,
        "guest": {"vcpus": VCPUS, "memory_mb": MEMORY_MB, "disk_gb": DISK_GB},
        **s,
        "targets": {
            "overhead_api": overhead(
                s["api_to_running_api"], s["bare_define_start"], OVERHEAD_TARGET_MS,
                paired(samples.get("api_to_running_api", []),
                       samples.get("bare_define_start", []))),
            "overhead_libvirt": overhead(
                s["api_to_running_libvirt"], s["bare_define_start"], OVERHEAD_TARGET_MS,
                paired(samples.get("api_to_running_libvirt", []),
                       samples.get("bare_define_start", []))),
            "overlay_seed": {"p50_ms": ovs.get("p50"), "target_ms": OVERLAY_SEED_TARGET_MS,
                             "verdict": verdict(ovs.get("p50"), OVERLAY_SEED_TARGET_MS)},
        },
        "breakdown": {k: summarize(v)
                      for k, v in stage_samples(samples.get("milestones", [])).items()},
        "notes": list(notes),
        "samples_ms": {k: [round(x, 1) for x in samples.get(k, [])] for k in (
            "api_to_running_api", "api_to_running_libvirt", "bare_define_start",
            "bare_until_domstate", "overlay_seed")},
    }


def epoch(ts: str | None) -> float | None:
    """Seconds since the epoch of an ISO timestamp from the API (naive means UTC)."""
    if not ts:
        return None
    dt = datetime.fromisoformat(ts)
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


def milestones_from_events(events: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Epoch seconds of a build's milestones from its event log: ``building`` (written by the
    web), the worker's step events (``image``…``define``), ``done`` (build.done sent) and
    ``started`` (the libvirt lifecycle event)."""
    out: dict[str, float] = {}
    for ev in events:
        ts = epoch(ev.get("ts"))
        if ts is None:
            continue
        data = ev.get("data") or {}
        if ev.get("type") == "vm.build.step" and data.get("step"):
            out.setdefault(str(data["step"]), ts)
        elif ev.get("type") == "vm.state" and data.get("state") == "building":
            out.setdefault("building", ts)
        elif ev.get("type") == "vm.build.done":
            out.setdefault("done", ts)
        elif ev.get("type") == "vm.lifecycle" and data.get("event") == "started":
            out.setdefault("started", ts)
    return out


# ------------------------------------------------------------------- measurement


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _poll_until(check: Callable[[], bool], stop: threading.Event, deadline: float,
                poll: float) -> float | None:
    """perf_counter() of the first poll where ``check()`` is true; None on stop or deadline."""
    while not stop.is_set() and time.perf_counter() < deadline:
        if check():
            return time.perf_counter()
        time.sleep(poll)
    return None


class Bench:
    """One benchmark session inside a running :class:`bench.cluster.Cluster`."""

    def __init__(self, cluster: Any, image: dict[str, Any], api_poll: float,
                 virt_poll: float) -> None:
        from fleet.config import load_settings
        from worker.service import host_settings
        from worker.virt import Virt

        self.cluster = cluster
        self.image = image
        self.api_poll, self.virt_poll = api_poll, virt_poll
        settings = load_settings(env={**cluster.settings_env, "VIRTFLEET_HOST_NAME": WORKER,
                                      "VIRTFLEET_VIRT_TYPE": "qemu",
                                      "VIRTFLEET_STORAGE_DIR": str(cluster.root / "bare")})
        self.host_token = settings.host_token
        self.worker_storage = cluster.root / f"storage-{WORKER}"
        self.host = host_settings(settings)  # what the worker uses, storage aside
        self.virt = Virt(VIRT_URI)       # the libvirt poller's connection
        self.cleanup_virt = Virt(VIRT_URI)
        self.bare_domains: set[str] = set()
        self.seq = 0
        self.host_down = 0  # submissions refused because the worker was marked down

    def close(self) -> None:
        for uuid in list(self.bare_domains):
            self._remove_bare(uuid)
        self.virt.close()
        self.cleanup_virt.close()

    # -- API path -------------------------------------------------------------------

    def api_run(self) -> dict[str, Any]:
        """Submit one VM, time it to running both ways, delete it and wait until it is gone."""
        import requests

        api = self.cluster.api
        self.seq += 1
        body = {"name": f"bench-{self.seq}", "image": "demo", "vcpus": VCPUS,
                "memory_mb": MEMORY_MB, "disk_gb": DISK_GB}
        for attempt in range(HOST_DOWN_RETRIES + 1):
            wall0, t0 = time.time(), time.perf_counter()
            r = api.post("/vms", json=body)
            t_accepted = time.perf_counter()
            if r.status_code != 409 or '"alive"' not in r.text or attempt == HOST_DOWN_RETRIES:
                break
            # The control plane thinks the worker missed its heartbeats: note it, wait until
            # it reports again (untimed), and submit anew.
            self.host_down += 1
            _progress(f"  the worker is marked down ({r.json().get('message')}); waiting")
            self.cluster.wait_hosts({WORKER}, timeout=RUN_TIMEOUT)
        if r.status_code != 202:
            raise RuntimeError(f"POST /vms answered {r.status_code}: {r.text[:500]}")
        vm_id = r.json()["vm"]["id"]
        deadline = t0 + RUN_TIMEOUT
        stop = threading.Event()
        seen: dict[str, Any] = {}

        def libvirt_running() -> bool:
            return self.virt.state(vm_id) == "running"

        def watch_libvirt() -> None:
            try:
                seen["libvirt"] = _poll_until(libvirt_running, stop, deadline,
                                              self.virt_poll)
            except Exception as exc:  # noqa: BLE001 - reported by the main thread
                seen["libvirt_error"] = exc

        watcher = threading.Thread(target=watch_libvirt, name="bench-libvirt", daemon=True)
        watcher.start()
        poller = requests.Session()
        poller.headers.update(api.session.headers)
        url = f"{api.base}/api/v1/vms/{vm_id}"

        def api_running() -> bool:
            view = poller.get(url, timeout=30).json()
            if view.get("state") == "error":
                raise RuntimeError(f"VM went to error: {view.get('state_reason')}")
            seen["view"] = view
            return view.get("state") == "running"

        try:
            t_api = _poll_until(api_running, stop, deadline, self.api_poll)
            watcher.join(max(0.0, deadline - time.perf_counter()))
        finally:
            stop.set()
            watcher.join(5)
            poller.close()
            api.delete(f"/vms/{vm_id}")
        t_virt = seen.get("libvirt")
        if "libvirt_error" in seen:
            raise RuntimeError(f"polling libvirt failed: {seen['libvirt_error']}")
        if t_api is None or t_virt is None:
            raise TimeoutError(f"VM {vm_id} not running after {RUN_TIMEOUT:g}s")
        api.wait_vm(vm_id, ("gone",), timeout=RUN_TIMEOUT, poll=0.02)

        def wall(t: float) -> float:
            return wall0 + (t - t0)

        marks = {"send": wall0, "accepted": wall(t_accepted), "api_running": wall(t_api),
                 "libvirt_running": wall(t_virt)}
        events = api.get("/events", params={"vm_id": vm_id, "limit": 1000}).json()
        marks.update(milestones_from_events(events))
        applied = epoch(seen["view"].get("updated_at"))  # set when build.done was applied
        if applied is not None:
            marks["applied"] = applied
        return {"api_ms": (t_api - t0) * 1000, "libvirt_ms": (t_virt - t0) * 1000,
                "marks": marks}

    # -- bare path ------------------------------------------------------------------

    def base_image(self) -> Path:
        """The worker's cached copy of the demo base (fetched like the worker does if absent)."""
        from worker import cache
        ref = {"sha256": self.image["sha256"], "disk_format": self.image["disk_format"],
               "url": f"{self.cluster.api.base}/api/v1/images/{self.image['id']}/data"}
        return cache.ensure_base(self.worker_storage, ref, self.host_token)

    def prepare(self) -> None:
        """What the worker checks before its first define: the libvirt network is up."""
        if self.host.network_kind == "network" and self.host.network_source:
            self.cleanup_virt.ensure_network_active(self.host.network_source)

    def bare_run(self, base: Path) -> dict[str, float]:
        """Overlay + seed like the worker (timed apart), then virsh define + start, timed."""
        from fleet.proc import run
        from worker import cache, images
        from worker.build import GIB, network_config
        from worker.domain import design, instance_paths, to_xml
        from worker.seed import build_seed_iso

        self.seq += 1
        vm_id = str(uuidlib.uuid4())
        vm = {"id": vm_id, "name": f"bare-{self.seq}", "project": "admin", "vcpus": VCPUS,
              "memory_mb": MEMORY_MB, "disk_gb": DISK_GB, "user_data": "",
              "hostname": f"bare-{self.seq}", "mac": "52:54:00:" + ":".join(
                  f"{b:02x}" for b in secrets.token_bytes(3))}
        paths = instance_paths(self.host.storage_dir, vm_id)
        paths.dir.mkdir(parents=True)
        self.bare_domains.add(vm_id)
        try:
            t0 = time.perf_counter()
            images.create_overlay(base, paths.disk, DISK_GB * GIB,
                                  base_size=cache.base_virtual_size(base))
            t1 = time.perf_counter()
            build_seed_iso(paths.seed, instance_id=vm_id, hostname=vm["hostname"],
                           user_data="", network_config=network_config(vm["mac"]))
            t2 = time.perf_counter()
            cfg = design(vm, self.host)
            cfg = dataclasses.replace(cfg, name=BARE_PREFIX + cfg.name.removeprefix("vf-"))
            xml_path = paths.dir / "domain.xml"
            xml_path.write_text(to_xml(cfg))
            virsh = [VIRSH, "-c", VIRT_URI]
            t3 = time.perf_counter()
            run([*virsh, "define", str(xml_path)], timeout=VIRSH_TIMEOUT)
            run([*virsh, "start", vm_id], timeout=VIRSH_TIMEOUT)
            t4 = time.perf_counter()
            deadline = t4 + RUN_TIMEOUT
            while True:
                out = run([*virsh, "domstate", vm_id], timeout=VIRSH_TIMEOUT).stdout
                if out.decode().strip() == "running":
                    break
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"bare domain {vm_id} not running")
                time.sleep(self.virt_poll)
            t5 = time.perf_counter()
        finally:
            self._remove_bare(vm_id)
        return {"overlay_ms": (t1 - t0) * 1000, "seed_ms": (t2 - t1) * 1000,
                "cmds_ms": (t4 - t3) * 1000, "domstate_ms": (t5 - t3) * 1000}

    def _remove_bare(self, vm_id: str) -> None:
        from worker.domain import instance_paths
        try:
            self.cleanup_virt.destroy_and_undefine(vm_id)
        finally:
            shutil.rmtree(instance_paths(self.host.storage_dir, vm_id).dir, ignore_errors=True)
            self.bare_domains.discard(vm_id)


def measure(runs: int, warmup: int, api_poll_ms: float = API_POLL_MS,
            virt_poll_ms: float = VIRT_POLL_MS) -> dict[str, Any]:
    """Start a cluster, run warm-ups then ``runs`` interleaved API/bare rounds; the report."""
    from bench.cluster import Cluster
    from demo.image import build_demo_image, default_image_path

    demo = build_demo_image(default_image_path())
    samples: dict[str, Any] = {k: [] for k in (
        "api_to_running_api", "api_to_running_libvirt", "bare_define_start",
        "bare_until_domstate", "overlay_seed", "overlay", "seed", "milestones")}
    _progress("starting a throwaway cluster (web, scheduler, worker 'bench')...")
    with Cluster(workers={WORKER: {"VIRTFLEET_VIRT_TYPE": "qemu"}}) as cl:
        image = cl.register_image("demo", demo)
        bench = Bench(cl, image, api_poll_ms / 1000, virt_poll_ms / 1000)
        error = None
        try:
            bench.prepare()
            for i in range(warmup + runs):
                warm = i < warmup
                label = f"warm-up {i + 1}/{warmup}" if warm else f"run {i - warmup + 1}/{runs}"
                a = bench.api_run()
                b = bench.bare_run(bench.base_image())
                _progress(f"{label}: API {a['api_ms']:.0f} ms (libvirt {a['libvirt_ms']:.0f} ms)"
                          f" | bare {b['cmds_ms']:.0f} ms | overlay+seed "
                          f"{b['overlay_ms'] + b['seed_ms']:.0f} ms")
                if warm:
                    continue
                samples["api_to_running_api"].append(a["api_ms"])
                samples["api_to_running_libvirt"].append(a["libvirt_ms"])
                samples["milestones"].append(a["marks"])
                samples["bare_define_start"].append(b["cmds_ms"])
                samples["bare_until_domstate"].append(b["domstate_ms"])
                samples["overlay"].append(b["overlay_ms"])
                samples["seed"].append(b["seed_ms"])
                samples["overlay_seed"].append(b["overlay_ms"] + b["seed_ms"])
        except Exception as exc:  # noqa: BLE001 - report what was measured, then fail
            error = f"{type(exc).__name__}: {exc}"
            _progress(f"aborted: {error}")
        finally:
            bench.close()
        virt_type = bench.host.virt_type
    notes = [
        "API and bare rounds alternate, one domain at a time; each API VM is deleted "
        "and waited for until gone before the bare round.",
        "bare domains carry the worker's XML (worker.domain.design/to_xml, the worker's "
        f"HostSettings) renamed '{BARE_PREFIX}...' so the worker does not report them.",
        "overlay + seed is timed in each bare round (worker.images.create_overlay from the "
        "worker's cached demo base + worker.seed.build_seed_iso).",
        "breakdown stages mix client clocks and event timestamps (same machine); "
        "'applied' is the VM's updated_at when the API first shows running.",
    ]
    if bench.host_down:
        notes.append(f"{bench.host_down} submission(s) got 409 because the worker was marked "
                     "down (missed heartbeats); each was retried once it reported again.")
    if error is not None:
        notes.insert(0, f"ABORTED after {len(samples['api_to_running_api'])} of {runs} runs: "
                        f"{error}")
    report = build_report(samples, runs=runs, warmup=warmup, virt_type=virt_type,
                          poll_ms={"api": api_poll_ms, "libvirt": virt_poll_ms}, notes=notes)
    report["host_down_retries"] = bench.host_down
    report["error"] = error
    return report


def main(runs: int = 20, warmup: int = 2, as_json: bool = False, strict: bool = False,
         api_poll_ms: float = API_POLL_MS, virt_poll_ms: float = VIRT_POLL_MS) -> int:
    """Run the benchmark, print its figures, and return the exit code."""
    if runs < 1 or warmup < 0:
        raise ValueError("runs must be at least 1 and warmup at least 0")
    with sigterm_as_interrupt():
        report = measure(runs, warmup, api_poll_ms, virt_poll_ms)
    print(json.dumps(report, indent=2) if as_json else render(report))
    return 1 if report.get("error") else exit_code(report, strict)
