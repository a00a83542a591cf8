"""`virtfleet bench images`: what a VM's disk costs, and what an image import costs.

1. Overlay + seed ISO as the worker makes them (``worker.seed.start_seed_iso`` on its own
   thread while ``worker.images.create_overlay`` runs with the base's memoised virtual size:
   a copy of the base's template of that size, made by ``qemu-img create`` on the first
   overlay, shown apart; both durable) on a sparse 1 GiB and a sparse 1 TiB virtual base,
   interleaved; target p50(1 TiB) / p50(1 GiB) <= 1.1 (O(1) in the base's size).
2. A full copy of a 2 GiB base holding 2 GiB of data (the mix of :func:`make_disk`), a plain
   ``qemu-img convert -f qcow2 -O qcow2`` made durable (:func:`plain_convert`), the base in
   the page cache and nothing dirty before each copy; against overlay + seed on that same
   base; target >= 100x slower.
3. Image imports through the real path, to a throwaway cluster (web, scheduler, one
   test:/// worker), until the image.active event is seen live by a client (the SSE stream,
   not a poll), each against a plain durable ``qemu-img convert`` of the *same file* to
   qcow2 (:func:`plain_convert`: qemu-img's defaults, then the output and its directory
   fsynced — qemu-img 7.2 leaves its output in the page cache, and an import is synced
   before it is active), interleaved, each side from the same start (the file in the page
   cache, nothing dirty, the other side's product deleted); target convert / import >= 0.9
   for the qcow2 upload and the path import (IMPORT_CASES says why not for the raw uploads):

   - ``qcow2_upload``: a cloud image as they are distributed (Debian, Ubuntu, Fedora, Rocky:
     qcow2, here uncompressed), made in the set-up by ``qemu-img convert`` of the raw disk
     below, sent by ``POST /api/v1/images/upload``; against ``convert -f qcow2 -O qcow2``
     (what Proxmox's ``qm disk import`` runs);
   - ``raw_upload`` (informational, no target): the sparse raw disk (:func:`make_disk`:
     mostly empty, its data in extents spread over it) uploaded as ``virtfleet image
     upload`` sends it (the same code, fleet.imageclient): a sparse body, its data
     extents only, which the web converts to qcow2 as they arrive; against ``convert -f
     raw -O qcow2``;
   - ``raw_path``: that raw disk registered by an admin by its path on the controller;
     against the same convert;
   - ``raw_upload_whole`` (informational, no target; measured after the others, apart:
     its large page cache would fall on them): that raw disk as a plain
     ``application/octet-stream`` body, every byte of it, holes included, as any HTTP
     client sends a file (:func:`upload_whole`): what a sparse body saves.

   Each import is of new bytes (:func:`stamp` changes 16 bytes of the disk's first sector
   before each pair), so none is a twin of an earlier one (201 at once). The clients send
   with sendfile(2) (the data; a whole body's holes as zeros from one buffer), so the
   figure is the server's. The qcow2 goes through fleet.imageclient too (a plain body).
   The breakdown: the upload (POST -> 202) and the job's own timings, from its
   event.

Owns the measurement and its report (a table, or JSON). Works in a temporary directory and
removes everything it made, also on Ctrl-C or SIGTERM. Reports; fails only with ``strict``.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from bench.stats import sigterm_as_interrupt
from fleet.imageclient import Extent, ImageClient, data_extents
from fleet.proc import run

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
TIB = 1024 * GIB

SCALING_TARGET = 1.1
"""p50 overlay + seed on a 1 TiB base over the same on a 1 GiB base: at most this."""

COPY_TARGET = 100.0
"""A full copy of a 2 GiB base over overlay + seed: at least this many times slower."""

IMPORT_TARGET = 0.9
"""Plain conversion time over the whole import's time: at least this."""

COPY_BASE_BYTES = 2 * GIB
"""The base the full copy is made of (all of it data)."""

POOL_BYTES = 16 * MIB
"""Random bytes (and as many text-like bytes) the disks' data is cut from."""

POLL_S = 0.02
"""Pause between two looks at the image store while the last job cleans up."""

DISK_MARGIN = 2 * GIB
"""Free space left over at the peak, or the bench refuses to start."""

CONVERT_TIMEOUT = 3600.0

IMPORT_CASES: tuple[tuple[str, str, str, str, bool], ...] = (
    ("qcow2_upload", "qcow2", "client", "qcow2 cloud image, uploaded (virtfleet image upload)",
     True),
    ("raw_upload", "raw", "client", "sparse raw disk, uploaded sparse (virtfleet image "
                                    "upload: its data only, converted as it arrives; "
                                    "informational)", False),
    ("raw_path", "raw", "path", "sparse raw disk, admin path", True),
    ("raw_upload_whole", "raw", "whole", "sparse raw disk, uploaded whole (octet-stream, "
                                         "holes as zeros; informational)", False),
)
"""(key, format of the file, how it is sent, label, whether the target applies) of each
import measured. The target is the issue's: an import of a file against a plain convert of
that file, where the file is (an admin's path) or as it comes (a qcow2 upload: nothing to
convert). A raw upload carries, beside what the convert does, the data's transfer and the
sha256 of a qcow2 that qemu-img only finishes with its last write (it rewrites the qcow2's
first clusters until then), so no hashing can overlap the transfer: its figures, and the
job after the last byte against the convert, are reported without a target (README,
"Import speed"). How: ``client`` fleet.imageclient (a raw file sparse, a qcow2 as it is),
``whole`` every byte as a plain body (:func:`upload_whole`), ``path`` an admin's path."""

HOW = {"client": ("virtfleet image upload -> seen active", "upload (POST -> 202)"),
       "whole": ("POST /images/upload, whole -> seen active", "upload (POST -> 202)"),
       "path": ("POST /images {source: path} -> seen active", "register (POST -> 202)")}
"""What each way of sending is called in the report: the whole import, its first part."""


# ------------------------------------------------------------------ pure helpers


def p50(values: list[float]) -> float:
    return float(statistics.median(values))


def ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def verdict(value: float, target: float, at_least: bool) -> str:
    ok = value >= target if at_least else value <= target
    return "PASS" if ok else "FAIL"


def load() -> float:
    """The 1-minute load average (the machine is shared: every figure comes with it)."""
    return round(os.getloadavg()[0], 2)


def disk_needed(import_data: int, import_virtual: int) -> int:
    """Peak bytes on disk: the copy part (base + copy) or the import part (the sparse raw
    disk's data, its qcow2, an upload in flight, the baseline's output, the store's file and
    a conversion, each about the data's size), whichever is larger."""
    del import_virtual  # holes take no room
    return max(2 * COPY_BASE_BYTES, 6 * import_data + 64 * MIB) + DISK_MARGIN


# ------------------------------------------------------------------ making files


def _text_pool(rnd: random.Random, size: int) -> bytes:
    words = [bytes(rnd.choices(b"abcdefghijklmnopqrstuvwxyz_/.", k=rnd.randint(2, 12)))
             for _ in range(4096)]
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rnd.choices(words, k=16)) + b"\n"
    return bytes(out[:size])


def disk_layout(virtual: int, data: int, seed: int = 7) -> list[tuple[int, int]]:
    """(offset, length) of the data extents of a disk like a cloud image's: `data` bytes in
    extents of 64 KiB to 32 MiB (log-uniform), the first at offset 0, the rest scattered
    over `virtual` bytes with holes of random sizes between them; 4 KiB aligned."""
    if data > virtual:
        raise ValueError("a disk cannot hold more data than its size")
    rnd = random.Random(seed)
    block = 4 * KIB
    sizes: list[int] = []
    left = data // block * block
    while left > 0:
        size = min(left, max(block, int(2 ** rnd.uniform(16, 25)) // block * block))
        sizes.append(size)
        left -= size
    weights = [rnd.random() for _ in sizes]
    total = sum(weights) or 1.0
    free = virtual - sum(sizes)
    gaps = [int(free * w / total) // block * block for w in weights]
    extents, off = [], 0
    for size, gap in zip(sizes, gaps, strict=True):
        extents.append((off, size))
        off += size + gap
    return extents


def make_disk(path: Path, virtual: int, data: int, seed: int = 7) -> None:
    """A raw disk image like a cloud image's: `virtual` bytes, sparse (its holes are holes),
    `data` bytes written in the extents of :func:`disk_layout`. What is written comes in runs
    of 4 to 256 KiB: incompressible bytes (55 %: binaries, compressed files), text-like
    bytes (40 %) and zeros (5 %, written: qemu-img and the import must find them). The first
    sector is a boot sector's (no image format's magic)."""
    rnd = random.Random(seed + 1)
    noise = os.urandom(POOL_BYTES)
    text = _text_pool(rnd, POOL_BYTES)
    zeros = bytes(256 * KIB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, virtual)
        for off, length in disk_layout(virtual, data, seed):
            end = off + length
            while off < end:
                n = min(end - off, max(4 * KIB, int(2 ** rnd.uniform(12, 18)) // 4096 * 4096))
                kind = rnd.random()
                if kind < 0.05:
                    piece: bytes | memoryview = zeros[:n]
                else:
                    pool = noise if kind < 0.60 else text
                    start = rnd.randrange(0, POOL_BYTES - n + 1) // 64 * 64
                    piece = memoryview(pool)[start:start + n]
                os.pwrite(fd, piece, off)
                off += n
        os.pwrite(fd, b"\xeb\x63\x90" + bytes(507) + b"\x55\xaa", 0)
    finally:
        os.close(fd)


def warm(path: Path) -> None:
    """Read `path` once (its data, not its holes), so that it starts in the page cache."""
    with path.open("rb", buffering=0) as fh:
        buf = bytearray(MIB)
        for e in data_extents(fh.fileno()):
            pos, end = e.offset, e.offset + e.length
            os.lseek(fh.fileno(), pos, os.SEEK_SET)
            while pos < end and (n := fh.readinto(memoryview(buf)[:min(MIB, end - pos)])):
                pos += n


def settle(*paths: Path, evict: tuple[Path, ...] = ()) -> None:
    """The same start for each side: `paths` in the page cache, `evict` out of it (files the
    bench holds but this measurement does not read), nothing dirty.

    The page cache is kept small on purpose: on the test machine (a VM whose host takes
    back memory the guest is not using), a page cache that grows past about 4 GB costs
    about 3.5 s of CPU per more GiB (a fault to the host per page), which would fall on
    whichever side happened to go past it."""
    for p in evict:
        drop_cache(p)
    for p in paths:
        warm(p)
    os.sync()


def drop_cache(path: Path) -> None:
    """Take `path`'s pages out of the page cache (POSIX_FADV_DONTNEED; clean pages only)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def drop_file(path: Path) -> None:
    path.unlink(missing_ok=True)


def plain_convert(src: Path, fmt: str, out: Path) -> tuple[float, float]:
    """The baseline: ``qemu-img convert -f <fmt> -O qcow2`` as anyone would type it, then
    its output made durable as an import is before it is active: the file fsynced, and its
    directory (qemu-img 7.2's convert leaves the output in the page cache: about 1 GB dirty
    after converting this benchmark's disk, ~0.9 s of ``sync``). Seconds of the convert
    alone, and in all."""
    t0 = time.perf_counter()
    run(["qemu-img", "convert", "-f", fmt, "-O", "qcow2", str(src), str(out)],
        timeout=CONVERT_TIMEOUT)
    t1 = time.perf_counter()
    fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fd = os.open(out.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return t1 - t0, time.perf_counter() - t0


def stamp(path: Path, fmt: str, seed: int) -> None:
    """Make `path` other bytes than before, as a new image would be: 16 bytes of the disk's
    first sector (its boot code area, at 16) set from `seed` (found through ``qemu-img map``
    in a qcow2, whose layout it leaves as it is)."""
    offset = 16
    if fmt == "qcow2":
        extents = json.loads(run(["qemu-img", "map", "--output=json", "-f", "qcow2",
                                  str(path)], timeout=60).stdout)
        first = next(e for e in extents if e["start"] == 0)
        if not first.get("data") or "offset" not in first:
            raise RuntimeError("the qcow2's first cluster is not allocated")
        offset += int(first["offset"])
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, random.Random(seed).randbytes(16), offset)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ measurements


def overlay_and_seed(base: Path, work: Path, i: int) -> float:
    """One overlay + seed as the worker makes them (worker/build.py); seconds."""
    from worker import cache, images
    from worker.build import network_config
    from worker.seed import start_seed_iso
    inst = work / f"inst-{i}"
    inst.mkdir()
    try:
        t0 = time.perf_counter()
        seeding = start_seed_iso(inst / "seed.iso", instance_id=f"bench-{i}", hostname="bench",
                                 user_data="#!/bin/sh\necho hello\n",
                                 network_config=network_config("52:54:00:12:34:56"))
        try:
            images.create_overlay(base, inst / "disk.qcow2", GIB,
                                  base_size=cache.base_virtual_size(base))
        finally:
            seeding.settle()
        seeding.wait()
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(inst, ignore_errors=True)


def measure_scaling(work: Path, runs: int) -> dict[str, Any]:
    from worker import cache
    small, huge = work / "small.qcow2", work / "huge.qcow2"
    run(["qemu-img", "create", "-f", "qcow2", str(small), str(GIB)], timeout=60)
    run(["qemu-img", "create", "-f", "qcow2", str(huge), str(TIB)], timeout=60)
    load_before = load()
    first: list[float] = []
    for base in (small, huge):
        cache.base_virtual_size(base)  # the memo a cached base has
        first.append(overlay_and_seed(base, work, -1))  # makes the template: qemu-img create
    os.sync()
    t_small: list[float] = []
    t_huge: list[float] = []
    for i in range(runs):
        t_small.append(overlay_and_seed(small, work, i))
        t_huge.append(overlay_and_seed(huge, work, i))
    r = ratio(p50(t_huge), p50(t_small))
    out = {"runs": runs, "p50_ms_1gib": round(p50(t_small) * 1000, 2),
           "p50_ms_1tib": round(p50(t_huge) * 1000, 2),
           "min_ms_1gib": round(min(t_small) * 1000, 2),
           "min_ms_1tib": round(min(t_huge) * 1000, 2),
           "first_ms": [round(x * 1000, 2) for x in first], "ratio": round(r, 3),
           "target_max": SCALING_TARGET, "verdict": verdict(r, SCALING_TARGET, False),
           "load": [load_before, load()]}
    for p in (small, huge):
        drop_file(p)
        drop_file(p.with_suffix(".size"))
    return out


def measure_copy(work: Path, runs: int, copy_runs: int) -> dict[str, Any]:
    from worker import cache
    raw, base, copy = work / "copy-src.raw", work / "copy-base.qcow2", work / "copy.qcow2"
    try:
        make_disk(raw, COPY_BASE_BYTES, COPY_BASE_BYTES, seed=11)
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(base)],
            timeout=CONVERT_TIMEOUT)
        drop_file(raw)
        cache.base_virtual_size(base)
        load_before = load()
        settle(base)  # the set-up's writes must not land in what is timed
        overlay_and_seed(base, work, -1)
        t_overlay = [overlay_and_seed(base, work, i) for i in range(runs)]
        t_copy: list[float] = []
        for _ in range(copy_runs):
            settle(base)
            t_copy.append(plain_convert(base, "qcow2", copy)[1])
            drop_file(copy)
        r = ratio(p50(t_copy), p50(t_overlay))
        return {"base_bytes": base.stat().st_size, "copy_runs": copy_runs, "runs": runs,
                "p50_s_full_copy": round(p50(t_copy), 3),
                "min_s_full_copy": round(min(t_copy), 3),
                "p50_ms_overlay_seed": round(p50(t_overlay) * 1000, 2),
                "min_ms_overlay_seed": round(min(t_overlay) * 1000, 2),
                "ratio": round(r, 1),
                "best_ratio": round(ratio(min(t_copy), min(t_overlay)), 1),
                "target_min": COPY_TARGET, "verdict": verdict(r, COPY_TARGET, True),
                "load": [load_before, load()]}
    finally:
        for p in (raw, base, copy, base.with_suffix(".size")):
            drop_file(p)


def _node_xml(path: Path) -> str:
    path.write_text("<node><cpu><mhz>2000</mhz><model>x86_64</model><active>2</active>"
                    "<nodes>1</nodes><sockets>1</sockets><cores>2</cores><threads>1</threads>"
                    "</cpu><memory>4194304</memory></node>\n")
    return f"test://{path}"


def upload_whole(api: Any, raw: Path, name: str) -> tuple[int, dict[str, Any]]:
    """POST the file as the plain body of /images/upload: every byte of it, holes included.
    A thrifty client, so that the figure is the server's: data with sendfile(2) from the page
    cache, holes as zeros from one buffer (not read, nor cached, from the file)."""
    url = urlsplit(api.base)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=600)
    zeros = memoryview(bytes(MIB))
    try:
        conn.putrequest("POST", f"/api/v1/images/upload?name={name}")
        for key, value in (("Authorization", f"Bearer {api.token}"),
                           ("Content-Type", "application/octet-stream"),
                           ("Content-Length", str(raw.stat().st_size))):
            conn.putheader(key, value)
        conn.endheaders()
        sock = conn.sock
        assert sock is not None
        with raw.open("rb") as fh:
            pos, size = 0, os.fstat(fh.fileno()).st_size
            for e in [*data_extents(fh.fileno()), Extent(size, 0)]:
                while pos < e.offset:  # a hole, as zeros
                    n = min(e.offset - pos, len(zeros))
                    sock.sendall(zeros[:n])
                    pos += n
                if e.length:
                    sock.sendfile(fh, e.offset, e.length)
                pos = e.offset + e.length
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


class ImageEvents:
    """image.active / image.error as a client sees them live (the SSE stream), each with
    the moment it arrived: no polling (a GET every few ms would take CPU from the job)."""

    def __init__(self, api: Any) -> None:
        self._resp = requests.get(api.base + "/api/v1/events/stream", stream=True,
                                  headers={"Authorization": f"Bearer {api.token}"},
                                  timeout=(10, None))
        self._resp.raise_for_status()
        self._seen: dict[str, float] = {}
        self._cond = threading.Condition()
        lines = self._resp.iter_lines()
        if next(lines, b"") != b": connected":
            raise RuntimeError("the event stream did not start")
        self._thread = threading.Thread(target=self._read, args=(lines,), daemon=True)
        self._thread.start()

    def _read(self, lines: Any) -> None:
        try:
            for line in lines:
                if not line.startswith(b"data: "):
                    continue
                event = json.loads(line[6:])
                if event.get("type") in ("image.active", "image.error"):
                    with self._cond:
                        self._seen[str(event["data"].get("image_id"))] = time.perf_counter()
                        self._cond.notify_all()
        except Exception:  # noqa: BLE001 - closed at the end (or lost: the poll takes over)
            return

    def wait(self, image_id: str, timeout: float) -> float | None:
        """When the event of `image_id` arrived (perf_counter), or None after `timeout`."""
        with self._cond:
            self._cond.wait_for(lambda: image_id in self._seen, timeout)
            return self._seen.get(image_id)

    def close(self) -> None:
        self._resp.close()


def import_once(api: Any, events: ImageEvents, raw: Path, name: str,
                how: str = "client") -> dict[str, float]:
    """Send `raw` (`how`: see IMPORT_CASES), wait until the image is active (its event seen
    live; a GET a second as a safety net); seconds of each part, client-side, and the job's
    own breakdown (from the event)."""
    t0 = time.perf_counter()
    epoch = time.time() - t0  # perf_counter -> epoch seconds (the job's clock)
    if how == "client":
        image = ImageClient(api.base, api.token).upload(raw, name)
        status = 202 if image.get("status") == "importing" else 201
    elif how == "whole":
        status, image = upload_whole(api, raw, name)
    else:
        r = api.post("/images", json={"name": name, "source": str(raw)}, timeout=600)
        status, image = r.status_code, r.json()
    t_accepted = time.perf_counter()
    if status != 202:
        raise RuntimeError(f"the import answered {status}: {image}")
    deadline = t_accepted + 3600
    while (t_done := events.wait(image["id"], 1.0)) is None:
        if api.get(f"/images/{image['id']}").json()["status"] != "importing":
            t_done = time.perf_counter()
            break
        if time.perf_counter() > deadline:
            raise TimeoutError(f"image {image['id']} still importing")
    image = api.get(f"/images/{image['id']}").json()
    if image["status"] != "active":
        raise RuntimeError(f"import ended {image['status']}: {image['status_reason']}")
    data: dict[str, Any] = {}
    for ev in api.get("/events", params={"limit": 1000}).json():
        if ev["type"] == "image.active" and ev["data"].get("image_id") == image["id"]:
            data = ev["data"]
    parts = {f"job_{k.removesuffix('_s')}": float(v)
             for k, v in data.get("timings", {}).items()}
    out = {"total": t_done - t0, "upload": t_accepted - t0, "job": t_done - t_accepted,
           **parts}
    if "started_at" in data:  # 202 -> the job starts; the job ends -> the event is seen
        out["job_dispatch"] = data["started_at"] - (epoch + t_accepted)
        out["job_seen"] = epoch + t_done - data["finished_at"]
    out["job_other"] = out["job"] - sum(v for k, v in out.items() if k.startswith("job_"))
    return out


def quiet(state_dir: Path, timeout: float = 120, drop_images: bool = False) -> None:
    """Wait until the last import's job has removed its files (the uploaded file and a
    conversion the store already had go after the image is active): the next measurement
    must not share the disk with that. With `drop_images`, then remove the files of the
    (throwaway) store, as the baseline's output is removed: the next measurement, either
    side, starts with neither side's product on disk nor in the page cache."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = [p for d in (state_dir / "imports", state_dir / "images") if d.is_dir()
                for p in d.iterdir() if d.name == "imports" or p.name.startswith(".")]
        if not busy:
            break
        time.sleep(POLL_S)
    else:
        raise TimeoutError("the image job did not finish its clean-up")
    if drop_images and (state_dir / "images").is_dir():
        for p in (state_dir / "images").iterdir():
            drop_file(p)


def measure_import(work: Path, data_bytes: int, virtual_bytes: int,
                   runs: int) -> dict[str, Any]:
    from bench.cluster import Cluster
    raw, qcow2, out = work / "import.raw", work / "import.qcow2", work / "plain.qcow2"
    files = {"raw": raw, "qcow2": qcow2}
    make_disk(raw, virtual_bytes, data_bytes)
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)],
        timeout=CONVERT_TIMEOUT)
    file_bytes = {fmt: path.stat().st_size for fmt, path in files.items()}
    workers = {"bench-img": {"VIRTFLEET_LIBVIRT_URI": _node_xml(work / "node.xml"),
                             "VIRTFLEET_NETWORK": "none:"}}
    plain: dict[str, list[tuple[float, float]]] = {k: [] for k, *_ in IMPORT_CASES}
    imports: dict[str, list[dict[str, float]]] = {k: [] for k, *_ in IMPORT_CASES}
    sizes: dict[str, int] = {}
    loads: list[float] = [load()]
    try:
        with Cluster(workers=workers, env={"VIRTFLEET_LOG_LEVEL": "WARNING"}) as c:
            state = c.root / "state"
            events = ImageEvents(c.api)
            seed = 0
            # The cases with a target first, interleaved; the informational ones after them,
            # apart: what they leave in the page cache must not fall on the others.
            for phase in ([c for c in IMPORT_CASES if c[4]], [c for c in IMPORT_CASES
                                                            if not c[4]]):
                for key, fmt, how, *_ in phase:  # first request of each kind
                    seed += 1
                    stamp(files[fmt], fmt, seed)
                    settle(files[fmt], evict=tuple(p for p in files.values()
                                                   if p != files[fmt]))
                    import_once(c.api, events, files[fmt],
                                f"warmup-{key}".replace("_", "-"), how)
                    quiet(state, drop_images=True)
                for i in range(runs if phase else 0):  # interleaved, from the same start
                    for key, fmt, how, *_ in phase:
                        src = files[fmt]
                        seed += 1
                        stamp(src, fmt, seed)
                        others = tuple(p for p in files.values() if p != src)
                        settle(src, evict=others)
                        plain[key].append(plain_convert(src, fmt, out))
                        sizes[key] = out.stat().st_size
                        drop_file(out)
                        settle(src, evict=others)
                        imports[key].append(import_once(c.api, events, src,
                                                        f"{key}-{i}".replace("_", "-"),
                                                        how))
                        quiet(state, drop_images=True)
                    loads.append(load())
            events.close()
    finally:
        for p in (raw, qcow2, out):
            drop_file(p)
    cases = {}
    for key, fmt, how, label, target in IMPORT_CASES:
        cases[key] = import_case(label, fmt, how, file_bytes[fmt], plain[key],
                                 imports[key], target)
        cases[key]["plain_qcow2_bytes"] = sizes.get(key, 0)
    return {"raw_bytes": virtual_bytes, "data_bytes": data_bytes,
            "qcow2_bytes": sizes.get("raw_upload", 0), "runs": runs, "cases": cases,
            "target_min": IMPORT_TARGET,
            "verdict": "PASS" if all(x["verdict"] == "PASS" for x in cases.values()
                                     if x["target_min"] is not None)
            else "FAIL", "load": loads}


def import_case(label: str, fmt: str, how: str, file_bytes: int,
                plain: list[tuple[float, float]],
                imports: list[dict[str, float]], target: bool = True) -> dict[str, Any]:
    """The figures of one case: p50s, ratio and verdict (``INFO`` without a target), the
    breakdown (p50 of each part)."""
    totals = [x["total"] for x in imports]
    durable = [x[1] for x in plain]
    r = ratio(p50(durable), p50(totals))
    keys = sorted({k for x in imports for k in x})
    parts = {k: round(p50([x[k] for x in imports if k in x]), 3) for k in keys}
    best = min(imports, key=lambda x: x["total"])
    return {"label": label, "format": fmt, "how": how, "file_bytes": file_bytes,
            "runs": len(imports),
            "p50_s_plain_convert": round(p50(durable), 3),
            "min_s_plain_convert": round(min(durable), 3),
            "p50_s_plain_convert_unsynced": round(p50([x[0] for x in plain]), 3),
            "p50_s_import": round(p50(totals), 3), "min_s_import": round(min(totals), 3),
            "p50_s_parts": parts,
            "best_import_parts": {k: round(v, 3) for k, v in best.items()},
            "all_s_plain_convert": [round(x, 3) for x in durable],
            "all_s_import": [round(x, 3) for x in totals], "ratio": round(r, 3),
            "best_ratio": round(ratio(min(durable), min(totals)), 3),
            "job_only_ratio": round(ratio(p50(durable), parts["job"]), 3),
            "target_min": IMPORT_TARGET if target else None,
            "verdict": verdict(r, IMPORT_TARGET, True) if target else "INFO"}


# ------------------------------------------------------------------ report

JOB_PARTS = (("job_dispatch", "dispatch (202 -> job starts)"),
             ("job_inspect", "inspect (qemu-img info)"),
             ("job_sync", "fsync (what the upload's writeback left)"),
             ("job_convert", "convert (qemu-img convert)"),
             ("job_hash", "sha256 (fsync + output check behind it)"),
             ("job_sync_wait", "fsync + check left after the sha256"),
             ("job_publish", "publish (name + directory fsync)"),
             ("job_seen", "commit + event seen (SSE)"),
             ("job_other", "rest (clocks, rounding)"))
"""The image job's own timings (from its image.active event), in order, and the rest."""


def render_case(key: str, case: dict[str, Any]) -> list[str]:
    parts = case["p50_s_parts"]
    how, first = HOW[case["how"]]
    target = "no target" if case["target_min"] is None else f"target >= {case['target_min']}"
    return [
        f"  [{key}] {case['label']} ({case['format']}, {case['file_bytes'] // MIB} MiB file)",
        f"    plain qemu-img convert {case['format']}->qcow2 + fsync"
        f"{case['p50_s_plain_convert'] * 1000:>8.0f} ms  ({case['min_s_plain_convert'] * 1000:.0f})"
        f"   (convert alone, unsynced: {case['p50_s_plain_convert_unsynced'] * 1000:.0f} ms)",
        f"    import, {how:<40}{case['p50_s_import'] * 1000:>6.0f} ms  "
        f"({case['min_s_import'] * 1000:.0f})",
        f"      {first:<32}{parts['upload'] * 1000:>8.0f} ms",
        f"      {'job (202 -> seen active)':<32}{parts['job'] * 1000:>8.0f} ms"
        + "".join(f"\n        {label:<40}{parts[k] * 1000:>6.0f} ms"
                  for k, label in JOB_PARTS if k in parts),
        f"    convert / import {case['ratio']:>27.3f}    {target}"
        f"   {case['verdict']}   (best / best {case['best_ratio']:.3f};"
        f" convert / job alone {case['job_only_ratio']:.3f})",
    ]


def render(report: dict[str, Any]) -> str:
    s, cp, im = report["scaling"], report["copy"], report["import"]
    lines = [
        "virtfleet bench images",
        "",
        f"overlay + seed, p50 (min) of {s['runs']} runs each (sparse qcow2 bases), "
        f"load {s['load'][0]}..{s['load'][1]}:",
        f"  1 GiB virtual base            {s['p50_ms_1gib']:>10.2f} ms  ({s['min_ms_1gib']:.2f})",
        f"  1 TiB virtual base            {s['p50_ms_1tib']:>10.2f} ms  ({s['min_ms_1tib']:.2f})",
        f"  ratio 1 TiB / 1 GiB           {s['ratio']:>10.3f}    target <= {s['target_max']}"
        f"   {s['verdict']}",
        f"  (the first on each base, which makes its template with qemu-img create: "
        f"{s['first_ms'][0]:.2f} / {s['first_ms'][1]:.2f} ms)",
        "",
        f"full copy of a 2 GiB base (2 GiB of data, {cp['base_bytes']} bytes), "
        f"p50 (min) of {cp['copy_runs']}, load {cp['load'][0]}..{cp['load'][1]}:",
        f"  qemu-img convert qcow2->qcow2 + fsync {cp['p50_s_full_copy'] * 1000:>6.1f} ms  "
        f"({cp['min_s_full_copy'] * 1000:.1f})",
        f"  overlay + seed on that base   {cp['p50_ms_overlay_seed']:>10.2f} ms  "
        f"({cp['min_ms_overlay_seed']:.2f})",
        f"  copy / overlay+seed           {cp['ratio']:>10.1f}x   target >= "
        f"{cp['target_min']:g}x   {cp['verdict']}   (best / best {cp['best_ratio']:.1f}x)",
        "",
        f"imports vs a plain durable qemu-img convert of the same file, interleaved, p50 (min)"
        f" of {im['runs']} each, load {min(im['load'])}..{max(im['load'])}; the disk: "
        f"{im['raw_bytes'] // MIB} MiB raw holding {im['data_bytes'] // MIB} MiB of data "
        f"(qcow2: {im['qcow2_bytes'] // MIB} MiB):",
    ]
    for key, case in im["cases"].items():
        lines += render_case(key, case)
    passed = [k for k, x in im["cases"].items() if x["verdict"] == "PASS"]
    missed = [f"{k} ({x['ratio']:.3f})" for k, x in im["cases"].items()
              if x["verdict"] == "FAIL"]
    lines.append(f"  target >= {im['target_min']} met by: {', '.join(passed) or 'none'};"
                 f" missed by: {', '.join(missed) or 'none'}   {im['verdict']}")
    return "\n".join(lines)


def measure(runs: int, copy_runs: int, import_runs: int, import_mib: int,
            import_virtual_mib: int, log: Callable[[str], None]) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="vf-bench-images-"))
    try:
        free = shutil.disk_usage(work).free
        need = disk_needed(import_mib * MIB, import_virtual_mib * MIB)
        if free < need:
            raise RuntimeError(f"needs {need // GIB} GiB free in {work.parent}, "
                               f"has {free // GIB} GiB")
        log("overlay + seed on 1 GiB and 1 TiB bases ...")
        scaling = measure_scaling(work, runs)
        log("full copy of a 2 GiB base ...")
        copy = measure_copy(work, runs, copy_runs)
        log(f"imports of a {import_virtual_mib} MiB disk ({import_mib} MiB of data), qcow2 "
            f"and raw ...")
        imp = measure_import(work, import_mib * MIB, import_virtual_mib * MIB, import_runs)
        return {"scaling": scaling, "copy": copy, "import": imp}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(runs: int = 15, copy_runs: int = 3, import_runs: int = 3, import_mib: int = 1024,
         import_virtual_mib: int = 4096, as_json: bool = False, strict: bool = False) -> int:
    """Run the benchmark, print its figures, and return the exit code."""
    import sys
    if import_virtual_mib < import_mib:
        raise ValueError("the raw disk must be at least as large as its data")
    with sigterm_as_interrupt():
        report = measure(runs, copy_runs, import_runs, import_mib, import_virtual_mib,
                         lambda msg: print(msg, file=sys.stderr, flush=True))
    print(json.dumps(report, indent=2) if as_json else render(report))
    failed = any(part["verdict"] == "FAIL" for part in report.values())
    return 1 if strict and failed else 0
