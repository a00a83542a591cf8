"""`virtfleet bench images`: what a VM's disk costs, and what an image import costs.

1. Overlay + seed ISO (as the worker makes them: ``worker.images.create_overlay`` with the
   base's memoised virtual size, then ``worker.seed.build_seed_iso``) on a sparse 1 GiB and a
   sparse 1 TiB virtual base, interleaved; target p50(1 TiB) / p50(1 GiB) <= 1.1 (O(1) in the
   base's size).
2. A full copy of a 2 GiB base holding 2 GiB of real (non-zero) data, ``qemu-img convert -f
   qcow2 -O qcow2``, against overlay + seed on that same base; target >= 100x slower.
3. An image import through the real path — ``POST /api/v1/images/upload`` of a raw file to a
   throwaway cluster (web, scheduler, one test:/// worker), inspected and converted by its
   scheduler, until ``GET /api/v1/images/<id>`` says ``active`` — against a plain ``qemu-img
   convert -f raw -O qcow2`` of the same file, interleaved; target convert / import >= 0.9.

Owns the measurement and its report (a table, or JSON). Works in a temporary directory and
removes everything it made, also on Ctrl-C or SIGTERM. Reports; fails only with ``strict``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.stats import sigterm_as_interrupt
from fleet.proc import run

MIB = 1024 * 1024
GIB = 1024 * MIB
TIB = 1024 * GIB

SCALING_TARGET = 1.1
"""p50 overlay + seed on a 1 TiB base over the same on a 1 GiB base: at most this."""

COPY_TARGET = 100.0
"""A full copy of a 2 GiB base over overlay + seed: at least this many times slower."""

IMPORT_TARGET = 0.9
"""Plain conversion time over the whole import's time: at least this."""

COPY_BASE_BYTES = 2 * GIB
"""The base the full copy is made of (all of it real data)."""

POOL_BYTES = 64 * MIB
"""Random bytes cycled to fill files with real data quickly (no block is zero)."""

POLL_S = 0.02
"""Pause between two GET /images/<id> while an import runs."""

DISK_MARGIN = 2 * GIB
"""Free space left over at the peak, or the bench refuses to start."""


# ------------------------------------------------------------------ pure helpers


def p50(values: list[float]) -> float:
    return float(statistics.median(values))


def ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def verdict(value: float, target: float, at_least: bool) -> str:
    ok = value >= target if at_least else value <= target
    return "PASS" if ok else "FAIL"


def disk_needed(import_bytes: int, import_runs: int) -> int:
    """Peak bytes on disk: the copy part (base + copy) or the import part (the raw file, an
    upload in flight, the baseline's output, and a converted copy per import in the store,
    warm-up included, should conversions differ), whichever is larger."""
    return max(2 * COPY_BASE_BYTES, (import_runs + 4) * import_bytes) + DISK_MARGIN


# ------------------------------------------------------------------ making files


def fill(path: Path, size: int) -> None:
    """A file of `size` bytes of real data (a random pool cycled; never a zero block)."""
    pool = bytearray(os.urandom(POOL_BYTES))
    for i in range(0, POOL_BYTES, 4096):
        pool[i] = pool[i] | 1
    view = memoryview(pool)
    with path.open("wb") as fh:
        left, off = size, 0
        while left:
            n = min(left, MIB)
            fh.write(view[off:off + n])
            left -= n
            off = (off + n) % POOL_BYTES


def drop_file(path: Path) -> None:
    path.unlink(missing_ok=True)


# ------------------------------------------------------------------ measurements


def overlay_and_seed(base: Path, work: Path, i: int) -> float:
    """One overlay + seed as the worker makes them; seconds."""
    from worker import cache, images
    from worker.build import network_config
    from worker.seed import build_seed_iso
    inst = work / f"inst-{i}"
    inst.mkdir()
    try:
        t0 = time.perf_counter()
        images.create_overlay(base, inst / "disk.qcow2", GIB,
                              base_size=cache.base_virtual_size(base))
        build_seed_iso(inst / "seed.iso", instance_id=f"bench-{i}", hostname="bench",
                       user_data="#!/bin/sh\necho hello\n",
                       network_config=network_config("52:54:00:12:34:56"))
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(inst, ignore_errors=True)


def measure_scaling(work: Path, runs: int) -> dict[str, Any]:
    from worker import cache
    small, huge = work / "small.qcow2", work / "huge.qcow2"
    run(["qemu-img", "create", "-f", "qcow2", str(small), str(GIB)], timeout=60)
    run(["qemu-img", "create", "-f", "qcow2", str(huge), str(TIB)], timeout=60)
    for base in (small, huge):
        cache.base_virtual_size(base)  # the memo a cached base has
        overlay_and_seed(base, work, -1)  # warm-up
    os.sync()
    t_small: list[float] = []
    t_huge: list[float] = []
    for i in range(runs):
        t_small.append(overlay_and_seed(small, work, i))
        t_huge.append(overlay_and_seed(huge, work, i))
    r = ratio(p50(t_huge), p50(t_small))
    out = {"runs": runs, "p50_ms_1gib": round(p50(t_small) * 1000, 2),
           "p50_ms_1tib": round(p50(t_huge) * 1000, 2), "ratio": round(r, 3),
           "target_max": SCALING_TARGET, "verdict": verdict(r, SCALING_TARGET, False)}
    for p in (small, huge):
        drop_file(p)
        drop_file(p.with_suffix(".size"))
    return out


def measure_copy(work: Path, runs: int, copy_runs: int) -> dict[str, Any]:
    from worker import cache, images
    raw, base, copy = work / "copy-src.raw", work / "copy-base.qcow2", work / "copy.qcow2"
    try:
        fill(raw, COPY_BASE_BYTES)
        images.convert(raw, "raw", base, "qcow2")
        drop_file(raw)
        cache.base_virtual_size(base)
        os.sync()  # the set-up's writes must not land in what is timed
        overlay_and_seed(base, work, -1)
        t_overlay = [overlay_and_seed(base, work, i) for i in range(runs)]
        t_copy: list[float] = []
        for _ in range(copy_runs):
            os.sync()
            t0 = time.perf_counter()
            images.convert(base, "qcow2", copy, "qcow2")
            t_copy.append(time.perf_counter() - t0)
            drop_file(copy)
        r = ratio(p50(t_copy), p50(t_overlay))
        return {"base_bytes": base.stat().st_size, "copy_runs": copy_runs,
                "p50_s_full_copy": round(p50(t_copy), 3),
                "p50_ms_overlay_seed": round(p50(t_overlay) * 1000, 2),
                "ratio": round(r, 1), "target_min": COPY_TARGET,
                "verdict": verdict(r, COPY_TARGET, True)}
    finally:
        for p in (raw, base, copy, base.with_suffix(".size")):
            drop_file(p)


def _node_xml(path: Path) -> str:
    path.write_text("<node><cpu><mhz>2000</mhz><model>x86_64</model><active>2</active>"
                    "<nodes>1</nodes><sockets>1</sockets><cores>2</cores><threads>1</threads>"
                    "</cpu><memory>4194304</memory></node>\n")
    return f"test://{path}"


def import_once(api: Any, raw: Path, name: str, upload: bool = True) -> dict[str, Any]:
    """Upload `raw` (or, not `upload`, register it by its path on the controller), wait until
    the image is active; seconds of each part, client-side, and the job's own breakdown
    (from its image.active event)."""
    t0 = time.perf_counter()
    if upload:
        with raw.open("rb") as fh:
            r = api.post(f"/images/upload?name={name}", data=fh, timeout=600,
                         headers={"Content-Type": "application/octet-stream"})
    else:
        r = api.post("/images", json={"name": name, "source": str(raw)}, timeout=600)
    t_accepted = time.perf_counter()
    if r.status_code != 202:
        raise RuntimeError(f"upload answered {r.status_code}: {r.text}")
    image = r.json()
    while image["status"] == "importing":
        time.sleep(POLL_S)
        image = api.get(f"/images/{image['id']}").json()
    t_done = time.perf_counter()
    if image["status"] != "active":
        raise RuntimeError(f"import ended {image['status']}: {image['status_reason']}")
    job: dict[str, float] = {}
    for ev in api.get("/events", params={"limit": 1000}).json():
        if ev["type"] == "image.active" and ev["data"].get("image_id") == image["id"]:
            job = ev["data"].get("timings", {})
    return {"total": t_done - t0, "upload": t_accepted - t0, "job": t_done - t_accepted,
            **{f"job_{k.removesuffix('_s')}": v for k, v in job.items()}}


def measure_import(work: Path, import_bytes: int, runs: int) -> dict[str, Any]:
    from bench.cluster import Cluster
    from worker import images
    raw, out = work / "import.raw", work / "plain.qcow2"
    fill(raw, import_bytes)
    workers = {"bench-img": {"VIRTFLEET_LIBVIRT_URI": _node_xml(work / "node.xml"),
                             "VIRTFLEET_NETWORK": "none:"}}
    try:
        with Cluster(workers=workers, env={"VIRTFLEET_LOG_LEVEL": "WARNING"}) as c:
            import_once(c.api, raw, "warmup")  # first request of each process, page cache
            plain: list[float] = []
            imports: list[dict[str, Any]] = []
            by_path: list[float] = []
            for i in range(runs):  # interleaved, each from the same clean start
                os.sync()
                t0 = time.perf_counter()
                images.convert(raw, "raw", out, "qcow2")
                plain.append(time.perf_counter() - t0)
                drop_file(out)
                os.sync()
                imports.append(import_once(c.api, raw, f"run-{i}"))
                os.sync()
                by_path.append(import_once(c.api, raw, f"path-{i}", upload=False)["total"])
    finally:
        drop_file(raw)
        drop_file(out)
    total = p50([x["total"] for x in imports])
    r = ratio(p50(plain), total)
    parts = {k: round(p50([x[k] for x in imports if k in x]), 3)
             for k in sorted({k for x in imports for k in x})}
    return {"raw_bytes": import_bytes, "runs": runs,
            "p50_s_plain_convert": round(p50(plain), 3), "p50_s_import": round(total, 3),
            "p50_s_parts": parts, "ratio": round(r, 3),
            "job_only_ratio": round(ratio(p50(plain), parts["job"]), 3),
            "p50_s_path_import": round(p50(by_path), 3),
            "path_ratio": round(ratio(p50(plain), p50(by_path)), 3),
            "target_min": IMPORT_TARGET, "verdict": verdict(r, IMPORT_TARGET, True)}


# ------------------------------------------------------------------ report

JOB_PARTS = ("job_inspect", "job_convert", "job_hash_sync", "job_hash")
"""The image job's own timings (from its image.active event), in order."""


def render(report: dict[str, Any]) -> str:
    s, cp, im = report["scaling"], report["copy"], report["import"]
    parts = im["p50_s_parts"]
    lines = [
        "virtfleet bench images",
        "",
        f"overlay + seed, p50 of {s['runs']} runs each (sparse qcow2 bases):",
        f"  1 GiB virtual base            {s['p50_ms_1gib']:>10.2f} ms",
        f"  1 TiB virtual base            {s['p50_ms_1tib']:>10.2f} ms",
        f"  ratio 1 TiB / 1 GiB           {s['ratio']:>10.3f}    target <= {s['target_max']}"
        f"   {s['verdict']}",
        "",
        f"full copy of a 2 GiB base (real data, {cp['base_bytes']} bytes), "
        f"p50 of {cp['copy_runs']}:",
        f"  qemu-img convert qcow2->qcow2 {cp['p50_s_full_copy'] * 1000:>10.1f} ms",
        f"  overlay + seed on that base   {cp['p50_ms_overlay_seed']:>10.2f} ms",
        f"  copy / overlay+seed           {cp['ratio']:>10.1f}x   target >= "
        f"{cp['target_min']:g}x   {cp['verdict']}",
        "",
        f"import of a {im['raw_bytes'] // MIB} MiB raw file (real data), p50 of {im['runs']}:",
        f"  plain qemu-img convert raw->qcow2 {im['p50_s_plain_convert'] * 1000:>6.0f} ms",
        f"  import, upload -> active      {im['p50_s_import'] * 1000:>10.0f} ms",
        f"    upload (POST -> 202)        {parts['upload'] * 1000:>10.0f} ms",
        f"    job (202 -> seen active)    {parts['job'] * 1000:>10.0f} ms"
        + "".join(f"\n      {k.removeprefix('job_'):<24}{parts[k] * 1000:>10.0f} ms"
                  for k in JOB_PARTS if k in parts),
        f"  import from a controller path {im['p50_s_path_import'] * 1000:>10.0f} ms"
        f"   (admin: the web reads the file itself; convert / that "
        f"{im['path_ratio']:.3f})",
        f"  convert / import              {im['ratio']:>10.3f}    target >= {im['target_min']}"
        f"   {im['verdict']}",
        f"  convert / job alone           {im['job_only_ratio']:>10.3f}",
    ]
    return "\n".join(lines)


def measure(runs: int, copy_runs: int, import_runs: int, import_mib: int,
            log: Callable[[str], None]) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="vf-bench-images-"))
    try:
        free = shutil.disk_usage(work).free
        need = disk_needed(import_mib * MIB, import_runs)
        if free < need:
            raise RuntimeError(f"needs {need // GIB} GiB free in {work.parent}, "
                               f"has {free // GIB} GiB")
        log("overlay + seed on 1 GiB and 1 TiB bases ...")
        scaling = measure_scaling(work, runs)
        log("full copy of a 2 GiB base ...")
        copy = measure_copy(work, runs, copy_runs)
        log(f"import of a {import_mib} MiB raw file ...")
        imp = measure_import(work, import_mib * MIB, import_runs)
        return {"scaling": scaling, "copy": copy, "import": imp}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(runs: int = 15, copy_runs: int = 3, import_runs: int = 3, import_mib: int = 1024,
         as_json: bool = False, strict: bool = False) -> int:
    """Run the benchmark, print its figures, and return the exit code."""
    import sys
    with sigterm_as_interrupt():
        report = measure(runs, copy_runs, import_runs, import_mib,
                         lambda msg: print(msg, file=sys.stderr, flush=True))
    print(json.dumps(report, indent=2) if as_json else render(report))
    failed = any(part["verdict"] == "FAIL" for part in report.values())
    return 1 if strict and failed else 0
