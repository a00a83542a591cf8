"""The control plane's image job: inspect an imported file with qemu-img, convert raw to qcow2,
and make the image `active` — or `error`, with a reason safe to show.

Owns what TASK_INSPECT_IMAGE does to a file in `<state_dir>/imports/<image id>` (written by
the web, format pinned from its header — the image's `disk_format`; for an admin's raw file
on the controller, a symbolic link to it, read as raw; for a sparse raw upload, the qcow2
scheduler/streamconvert.py made of it as it came), the runner that keeps that work off the
control queue's thread (a conversion takes seconds to minutes; heartbeats must not wait
behind it), picking up imports a restart interrupted, and what EV_IMAGE_CACHED means for a
host.

Before an image is `active` its file is in the store under its content address (the sha256
hosts check: of the stored bytes, computed by the web for a qcow2 as it came in, here for a
conversion), checked by `qemu-img info` (a conversion: before and after), synced to disk, and
its name in the store synced too (the directory). What can overlap does: a qcow2's fsync runs
while qemu-img inspects it; a conversion's hash, fsync and check run together.

qemu-img runs only through worker.images (used here as a library), always with the pinned
format, under time and memory limits. Must not: fetch anything, probe a format, or leave a
half-made file in `<state_dir>/images/` (content-addressed: a file there is complete).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from fleet import contract as c
from fleet.config import Settings
from fleet.proc import ProcError
from fleet.scrub import scrub
from fleet.store.models import Event, Host, Image
from fleet.store.session import Store
from scheduler.events import record
from worker import images

log = logging.getLogger(__name__)

JOB_THREADS = 1
"""Image jobs run one at a time per scheduler process (each is disk-bound)."""

CONVERT_PREFIX = ".convert-"
"""Names of the conversions in progress in the image store (hidden: never served)."""


class ImportFailed(Exception):
    """The import cannot finish; the message is safe to show."""


def imports_dir(settings: Settings) -> Path:
    return settings.state_dir / "imports"


def images_dir(settings: Settings) -> Path:
    return settings.state_dir / "images"


@dataclass(frozen=True)
class Result:
    sha256: str
    size_bytes: int
    virtual_size_bytes: int
    timings: dict[str, float]
    twin_copy: Path | None = None
    """A conversion that came out as bytes the store already had: the caller removes it
    once the image is active (removing a large file takes a while; nobody waits for it)."""
    started_at: float = 0.0
    """When the job began (epoch seconds): with the event's `finished_at`, what a client
    sees between its request and the image active is told apart from the job itself."""


HASH_STEP = 4 * 1024 * 1024
"""Bytes of a mapped file given to sha256 at a time (hashlib lets the GIL go for each)."""


def sha256_of(path: Path) -> str:
    """sha256 of a file the job made (nobody changes it meanwhile), hashed straight from the
    page cache through a read-only mapping: no copy into a buffer first (1 GiB: ~0.70 s
    against ~0.78 s with read(2) on the test machine, where sha256 alone is ~0.70 s)."""
    digest = hashlib.sha256()
    with path.open("rb", buffering=0) as fh:
        size = os.fstat(fh.fileno()).st_size
        if not size:
            return digest.hexdigest()
        with mmap.mmap(fh.fileno(), size, prot=mmap.PROT_READ) as mapped:
            mapped.madvise(mmap.MADV_SEQUENTIAL)
            with memoryview(mapped) as view:
                for at in range(0, size, HASH_STEP):
                    digest.update(view[at:at + HASH_STEP])
    return digest.hexdigest()


def hash_and_sync(path: Path, also: Callable[[], Any] | None = None,
                  timings: dict[str, float] | None = None) -> tuple[str, Any]:
    """sha256 of `path` while the kernel writes it to disk, and `also()` (a check of the
    file) meanwhile: the three overlap (hashing reads the page cache on this thread and
    releases the GIL as it hashes; fsync waits for the disk, `also` for its subprocess, on
    threads of their own). Returns the sha256 and what `also` returned. `timings`, when
    given, gets ``hash_s`` (the sha256) and ``sync_wait_s`` (then the wait for the rest)."""
    t0 = time.perf_counter()
    with path.open("rb") as fh, ThreadPoolExecutor(max_workers=2,
                                                   thread_name_prefix="image-hash") as pool:
        synced = pool.submit(os.fsync, fh.fileno())
        checked = pool.submit(also) if also is not None else None
        sha = sha256_of(path)
        t1 = time.perf_counter()
        synced.result()
        result = checked.result() if checked is not None else None
    if timings is not None:
        timings["hash_s"] = t1 - t0
        timings["sync_wait_s"] = time.perf_counter() - t1
    return sha, result


def _hash_checked_qcow2(path: Path, settings: Settings, timings: dict[str, float],
                        refused: str = "") -> tuple[str, dict[str, Any]]:
    """:func:`hash_and_sync` of a qcow2 made on the controller, checked meanwhile by
    ``qemu-img info`` (refused: ImportFailed, its message after `refused`)."""
    try:
        return hash_and_sync(path, lambda: images.check_untrusted(
            path, "qcow2", settings.max_virtual_bytes), timings)
    except images.UnsafeImage as exc:
        raise ImportFailed(f"{refused}{exc}") from None


def _publish_file(tmp: Path, sha: str, store_dir: Path, keep: bool = False) -> bool:
    """Give a finished (synced) file its content address, durably (the store's directory is
    synced after the new name); with `keep`, as a second name (a hard link), leaving `tmp`
    where it is. False when a twin was there already (it wins, and `tmp` is left as it is)."""
    final = store_dir / sha
    if final.exists():
        return False
    os.chmod(tmp, 0o644)
    if keep:
        os.link(tmp, final)
    else:
        os.replace(tmp, final)
    sync_dir(store_dir)
    return True


def sync_dir(path: Path) -> None:
    """fsync a directory: the names made or changed in it survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def process(src: Path, fmt: str, settings: Settings, known_sha256: str = "") -> Result:
    """Inspect `src` read as `fmt` and put the qcow2 hosts will get into the image store.

    qcow2 is checked and kept as it is (`known_sha256`, computed while it was stored, saves
    reading it again: it is then synced while qemu-img checks it; without one — the qcow2
    the web made of a sparse raw upload as it came — it is hashed and synced while qemu-img
    checks it); raw is converted to qcow2
    (with ``-f raw``: `src` may be a link to an admin's file) and the result hashed, synced
    and checked again at once. `src` stays (the caller removes it once the store says how
    this ended). Raises ImportFailed (or ProcError/OSError, turned into a reason by the
    caller).
    """
    started_at = time.time()
    if fmt not in ("qcow2", "raw"):
        raise ImportFailed(f"format {fmt!r} is not importable")
    store_dir = images_dir(settings)
    store_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    if fmt == "qcow2" and known_sha256:
        return _keep_qcow2(src, known_sha256, store_dir, settings, timings, started_at)
    if fmt == "qcow2":  # a sparse raw upload, converted as it came: checked while hashed
        sha, data = _hash_checked_qcow2(src, settings, timings)
        size = src.stat().st_size
        t2 = time.perf_counter()
        _publish_file(src, sha, store_dir, keep=True)
        timings["publish_s"] = time.perf_counter() - t2
        return Result(sha, size, int(data["virtual-size"]), timings, started_at=started_at)
    t0 = time.perf_counter()
    try:
        data = images.check_untrusted(src, fmt, settings.max_virtual_bytes)
    except images.UnsafeImage as exc:
        raise ImportFailed(str(exc)) from None
    vsize = int(data["virtual-size"])
    timings["inspect_s"] = time.perf_counter() - t0
    tmp = convert_path(store_dir, src.name)
    tmp.unlink(missing_ok=True)
    try:
        t1 = time.perf_counter()
        images.convert_untrusted(src, "raw", tmp, flush=False)  # synced below, once
        t2 = time.perf_counter()
        timings["convert_s"] = t2 - t1
        sha, out = _hash_checked_qcow2(tmp, settings, timings,
                                       "the converted image is not right: ")
        if int(out["virtual-size"]) != vsize:
            raise ImportFailed("the converted image has another virtual size")
        t3 = time.perf_counter()
        size = tmp.stat().st_size
        published = _publish_file(tmp, sha, store_dir)
        timings["publish_s"] = time.perf_counter() - t3
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Result(sha, size, vsize, timings, None if published else tmp, started_at)


def _keep_qcow2(src: Path, sha: str, store_dir: Path, settings: Settings,
                timings: dict[str, float], started_at: float) -> Result:
    """A qcow2 whose sha256 the web computed as it stored it: synced (the web had the
    kernel write it out as it came: little is left) while qemu-img inspects it, then given
    its content address."""
    t0 = time.perf_counter()
    with src.open("rb") as fh, ThreadPoolExecutor(max_workers=1,
                                                  thread_name_prefix="image-sync") as pool:
        synced = pool.submit(os.fsync, fh.fileno())
        try:
            data = images.check_untrusted(src, "qcow2", settings.max_virtual_bytes)
        except images.UnsafeImage as exc:
            raise ImportFailed(str(exc)) from None
        finally:
            t1 = time.perf_counter()
            timings["inspect_s"] = t1 - t0
            synced.result()
        size = os.fstat(fh.fileno()).st_size
    t2 = time.perf_counter()
    timings["sync_s"] = t2 - t1
    _publish_file(src, sha, store_dir, keep=True)
    timings["publish_s"] = time.perf_counter() - t2
    return Result(sha, size, int(data["virtual-size"]), timings, started_at=started_at)


def convert_path(store_dir: Path, image_id: str) -> Path:
    """Where the qcow2 of a raw import is written before it has its content address."""
    return store_dir / f"{CONVERT_PREFIX}{image_id}.qcow2"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ImportFailed):
        text = str(exc)
    elif isinstance(exc, ProcError):
        text = f"qemu-img could not read the image ({exc})"
    else:
        text = "the image could not be imported (see the scheduler's log)"
    return scrub(text)


def inspect_image(store: Store, settings: Settings, image_id: str,
                  publish: Callable[[Event], None] | None = None) -> Event | None:
    """Finish the import of one image; returns the event recorded, or None when there was
    nothing to do (not importing any more, or another process has it in hand). `publish`,
    when given, is handed the event as soon as it is committed, before the files the import
    no longer needs are removed (that takes a while for a large one)."""
    with store.sessions() as s:
        image = s.get(Image, image_id)
        if image is None or image.status != "importing":
            return None
        # The format of the file in imports/: what was sent, or (a sparse raw upload,
        # converted as it came) the qcow2 the web made of it.
        fmt, known_sha = image.disk_format, image.sha256
    src = imports_dir(settings) / image_id
    # The lock says which process has the image in hand: the file itself, or, for a link to
    # an admin's file (which other imports may link to too), a lock file of the image's own.
    linked = src.is_symlink()
    lock = lock_path(src) if linked else src
    try:
        fh = lock.open("ab" if linked else "rb")
    except FileNotFoundError:
        return _finish(store, image_id, None, "the imported file is gone (the import was "
                                              "interrupted): register the image again")
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # another scheduler process is on it
        if not os.path.lexists(src):
            if linked:
                lock.unlink(missing_ok=True)
            return None  # it finished just before we took the lock
        if linked and not src.exists():
            src.unlink(missing_ok=True)
            lock.unlink(missing_ok=True)
            return _finish(store, image_id, None, "the file to import is no longer on the "
                                                  "controller: register the image again")
        started = time.perf_counter()
        result: Result | None = None
        reason = ""
        try:
            result = process(src, fmt, settings, known_sha)
            log.info("image %s imported in %.2fs (%s)", image_id,
                     time.perf_counter() - started,
                     {k: round(v, 3) for k, v in result.timings.items()})
        except Exception as exc:  # noqa: BLE001 - every failure becomes the image's reason
            if not isinstance(exc, ImportFailed | ProcError):
                log.exception("import of image %s failed", image_id)
            reason = _reason(exc)
        row = _finish(store, image_id, result, reason)
        if row is not None and publish is not None:
            try:
                publish(row)
            except Exception:  # noqa: BLE001 - the event is recorded; live views catch up
                log.exception("could not publish the end of image %s", image_id)
        # The file goes only once the store says how this ended (a store failure leaves it
        # for the next try): whoever finds it gone while the image is still importing knows
        # the import was really lost.
        src.unlink(missing_ok=True)
        if linked:
            lock.unlink(missing_ok=True)
        if result is not None and result.twin_copy is not None:
            result.twin_copy.unlink(missing_ok=True)
        return row


def lock_path(src: Path) -> Path:
    """The lock file of an import whose `imports/<id>` is a link to an admin's file."""
    return src.with_name(f".{src.name}.lock")


def _finish(store: Store, image_id: str, result: Result | None, reason: str) -> Event | None:
    with store.session() as s:
        values: dict[str, Any]
        if result is not None:
            values = {"status": "active", "status_reason": "", "sha256": result.sha256,
                      "size_bytes": result.size_bytes, "disk_format": "qcow2",
                      "virtual_size_bytes": result.virtual_size_bytes}
        else:
            values = {"status": "error", "status_reason": reason}
        moved = s.execute(update(Image).where(Image.id == image_id,
                                              Image.status == "importing").values(**values)
                          .execution_options(synchronize_session=False)).rowcount
        image = s.get(Image, image_id)
        if not moved or image is None:
            return None
        data: dict[str, Any] = {"image_id": image_id, "name": image.name,
                                "status": values["status"]}
        if result is not None:
            data.update(sha256=result.sha256, virtual_size_bytes=result.virtual_size_bytes,
                        timings={k: round(v, 3) for k, v in result.timings.items()},
                        started_at=round(result.started_at, 3),
                        finished_at=round(time.time(), 3))
        else:
            data["reason"] = reason
        row = record(s, c.make_event(c.EV_IMAGE_ACTIVE if result else c.EV_IMAGE_ERROR,
                                     **data), image.project_id)
        s.flush()
        return row


def on_image_cached(session: Session, event: dict[str, Any]) -> Event:
    """A host has the image in its cache (its next heartbeat says so too)."""
    sha = str(event.get("data", {}).get("sha256", ""))
    host = session.scalars(select(Host).where(Host.name == event.get("host", ""))).first()
    if host is not None and sha and sha not in (host.cached_images or []):
        host.cached_images = [*(host.cached_images or []), sha]
    return record(session, event)


def on_image_cache_failed(session: Session, event: dict[str, Any]) -> Event:
    return record(session, event)


HANDLERS: dict[str, Callable[[Session, dict[str, Any]], Event]] = {
    c.EV_IMAGE_CACHED: on_image_cached,
    c.EV_IMAGE_CACHE_FAILED: on_image_cache_failed,
}
"""Events from hosts about their image caches (admins see them: no project)."""


LEFTOVER_SECONDS = 24 * 3600.0
"""Files (and links) in the imports directory that no importing image owns (an upload cut
off, a web process killed between storing a file and writing its image) go after this
long."""


def remove_leftovers(directory: Path, importing: set[str],
                     older_than: float = LEFTOVER_SECONDS, prefix: str = "") -> list[str]:
    """Remove old files of `directory` (those whose names start with `prefix`) that are not
    the file of an importing image."""
    removed: list[str] = []
    if not directory.is_dir():
        return removed
    now = time.time()
    for p in directory.iterdir():
        try:
            if (p.name in importing or not p.name.startswith(prefix)
                    or not (p.is_symlink() or p.is_file())
                    or now - p.lstat().st_mtime < older_than):
                continue
            p.unlink()
            removed.append(p.name)
        except FileNotFoundError:
            continue
    if removed:
        log.info("removed %d leftover files from %s", len(removed), directory)
    return removed


class Runner:
    """Runs image jobs on threads of their own, each image once at a time."""

    def __init__(self, store: Store, settings: Settings,
                 publish: Callable[[Event], None], threads: int = JOB_THREADS) -> None:
        self.store, self.settings, self.publish = store, settings, publish
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="imagejob")
        self._lock = threading.Lock()
        self._queued: set[str] = set()

    def submit(self, image_id: str) -> None:
        with self._lock:
            if image_id in self._queued:
                return
            self._queued.add(image_id)
        self._pool.submit(self._run, image_id)

    def _run(self, image_id: str) -> None:
        try:
            inspect_image(self.store, self.settings, image_id, self.publish)
        except Exception:  # noqa: BLE001 - the next resume tries again
            log.exception("image job %s failed", image_id)
        finally:
            with self._lock:
                self._queued.discard(image_id)

    def resume(self) -> None:
        """Queue every image still `importing` (a restart lost its job), and remove what
        crashed uploads left in the imports directory and crashed jobs in the store."""
        def find() -> None:
            try:
                with self.store.sessions() as s:
                    ids = list(s.scalars(select(Image.id).where(Image.status == "importing")))
                remove_leftovers(imports_dir(self.settings),
                                 {*ids, *(lock_path(Path(i)).name for i in ids)})
                remove_leftovers(images_dir(self.settings),
                                 {convert_path(Path(), i).name for i in ids},
                                 prefix=CONVERT_PREFIX)
            except Exception:  # noqa: BLE001 - a store hiccup at start-up; the next start retries
                log.exception("could not look for interrupted image imports")
                return
            for image_id in ids:
                self.submit(image_id)
        self._pool.submit(find)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
