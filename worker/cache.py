"""The host's cache of base images: fetched from the control plane, sha256-checked, qcow2.

Owns `<storage_dir>/bases/<sha256>.qcow2`. A raw image is converted to qcow2 once, on the
way in. Concurrent builds of the same image wait on one file lock instead of fetching twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fleet import download
from worker import images


class CacheError(Exception):
    """The base image could not be brought into the cache."""


def bases_dir(storage_dir: Path) -> Path:
    return storage_dir / "bases"


def base_path(storage_dir: Path, sha256: str) -> Path:
    return bases_dir(storage_dir) / f"{sha256}.qcow2"


def cached(storage_dir: Path) -> list[str]:
    """The sha256 of every base in the cache (for heartbeats)."""
    d = bases_dir(storage_dir)
    return sorted(p.name.removesuffix(".qcow2") for p in d.glob("*.qcow2")) if d.is_dir() else []


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def base_virtual_size(base: Path) -> int:
    """The base's virtual size, read once and remembered beside it (bases never change)."""
    memo = base.with_suffix(".size")
    try:
        return int(memo.read_text())
    except (OSError, ValueError):
        size = images.virtual_size(base, "qcow2")
        tmp = memo.with_suffix(f".size.{os.getpid()}")
        tmp.write_text(str(size))
        os.replace(tmp, memo)
        return size


def ensure_base(storage_dir: Path, image: dict[str, Any], token: str) -> Path:
    """Return the cached qcow2 base for `image`, fetching and checking it if missing."""
    sha = str(image["sha256"])
    if len(sha) != 64 or any(ch not in "0123456789abcdef" for ch in sha):
        raise CacheError("the image reference has no valid sha256")
    final = base_path(storage_dir, sha)
    if final.exists():
        os.utime(final)  # least recently used is what a cache clean-up removes first
        return final
    with _lock(final):
        if final.exists():
            return final
        fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{sha[:12]}-")
        tmp = Path(tmp_name)
        converted = tmp.with_suffix(".qcow2")
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                for chunk in download.stream(image["url"], headers=headers, public_only=False):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != sha:
                raise CacheError("the downloaded image does not match its sha256")
            if image.get("disk_format", "qcow2") == "qcow2":
                os.replace(tmp, final)
            else:
                images.convert(tmp, str(image["disk_format"]), converted, "qcow2")
                os.replace(converted, final)
            os.chmod(final, 0o644)
            return final
        except Exception as exc:
            if isinstance(exc, CacheError):
                raise
            raise CacheError(f"the base image could not be fetched: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)
            converted.unlink(missing_ok=True)
