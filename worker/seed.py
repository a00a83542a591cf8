"""NoCloud seed ISOs: the only module that builds ISO images (with pycdlib).

Owns: the cloud-init NoCloud seed contract — an ISO9660 volume labelled ``cidata``
with Joliet and Rock Ridge names ``meta-data`` (YAML with ``instance-id`` and
``local-hostname``), ``user-data``, ``network-config`` and optionally ``vendor-data``
— written atomically and durably, on the caller's thread or (:func:`start_seed_iso`) on one
of its own while the caller does something else, and reading such an image back.

Must not: decide what the user-data says, where the seed lives, or attach it to a
domain (that is the designer's and the build flow's job).
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import threading
from pathlib import Path

import pycdlib
import yaml

VOLUME_ID = "cidata"
"""The volume label cloud-init's NoCloud datasource looks for."""

SEED_MODE = 0o600
"""File mode of a written seed: user-data may carry secrets (libvirt relabels it for QEMU)."""

# Rock Ridge / Joliet name -> ISO9660 level-1 name (8.3, upper case).
_ISO_NAMES = {
    "meta-data": "/META_DAT.;1",
    "user-data": "/USER_DAT.;1",
    "network-config": "/NETWORK_.;1",
    "vendor-data": "/VENDOR_D.;1",
}


def _bytes(data: str | bytes) -> bytes:
    return data.encode("utf-8") if isinstance(data, str) else bytes(data)


def meta_data(instance_id: str, hostname: str) -> bytes:
    """Return the NoCloud ``meta-data`` document as YAML bytes."""
    doc = {"instance-id": instance_id, "local-hostname": hostname}
    return yaml.safe_dump(doc, default_flow_style=False, sort_keys=False).encode("utf-8")


def build_seed_iso(
    dest: Path,
    *,
    instance_id: str,
    hostname: str,
    user_data: str | bytes,
    network_config: str | None = None,
    vendor_data: str | None = None,
) -> Path:
    """Write a NoCloud seed ISO to ``dest`` atomically and return ``dest``.

    ``network-config`` is always present (empty when not given); ``vendor-data`` only
    when given. ``user_data`` bytes are stored byte-exact, strings as UTF-8.
    """
    if not instance_id:
        raise ValueError("meta-data needs an instance-id")
    dest = Path(dest)
    files = {
        "meta-data": meta_data(instance_id, hostname),
        "user-data": _bytes(user_data),
        "network-config": _bytes(network_config or ""),
    }
    if vendor_data is not None:
        files["vendor-data"] = _bytes(vendor_data)

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=1, vol_ident=VOLUME_ID, joliet=3, rock_ridge="1.09")
    try:
        for name, data in files.items():
            iso.add_fp(
                io.BytesIO(data),
                len(data),
                _ISO_NAMES[name],
                rr_name=name,
                joliet_path=f"/{name}",
            )
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as fp:
                iso.write_fp(fp)
                fp.flush()
                os.fsync(fp.fileno())
            os.chmod(tmp_name, SEED_MODE)
            os.replace(tmp_name, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
    finally:
        iso.close()
    return dest


class SeedInProgress:
    """A seed ISO being written on a thread of its own (see :func:`start_seed_iso`)."""

    def __init__(self, dest: Path, kwargs: dict[str, str | bytes | None]) -> None:
        self.dest = Path(dest)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(kwargs,),
                                        name=f"seed-{self.dest.parent.name}", daemon=True)
        self._thread.start()

    def _run(self, kwargs: dict[str, str | bytes | None]) -> None:
        try:
            build_seed_iso(self.dest, **kwargs)  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001 - raised again by wait()
            self._error = exc

    def wait(self) -> Path:
        """Wait until the seed is written; returns its path or raises what writing raised."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.dest

    def settle(self) -> None:
        """Wait until the thread is done, whatever happened (before its directory is
        removed: nothing may be written into it afterwards)."""
        self._thread.join()


def start_seed_iso(
    dest: Path,
    *,
    instance_id: str,
    hostname: str,
    user_data: str | bytes,
    network_config: str | None = None,
    vendor_data: str | None = None,
) -> SeedInProgress:
    """Start :func:`build_seed_iso` on a thread of its own and return at once.

    The build flow writes the seed while ``qemu-img create`` makes the overlay: pycdlib
    needs the GIL for a millisecond or so, the rest of both is waiting (on a subprocess, on
    fsync), so the two cost about as much as the slower one. The caller must call
    :meth:`SeedInProgress.wait` (or :meth:`~SeedInProgress.settle` when it gives up).
    """
    if not instance_id:
        raise ValueError("meta-data needs an instance-id")
    return SeedInProgress(dest, {"instance_id": instance_id, "hostname": hostname,
                                 "user_data": user_data, "network_config": network_config,
                                 "vendor_data": vendor_data})


def read_seed_iso(path: Path) -> dict[str, bytes]:
    """Return the files in the root of a seed ISO, keyed by Rock Ridge name."""
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        out: dict[str, bytes] = {}
        for child in iso.list_children(rr_path="/"):
            if child.is_dot() or child.is_dotdot() or child.is_dir():
                continue
            name = child.rock_ridge.name().decode("utf-8")
            buf = io.BytesIO()
            iso.get_file_from_iso_fp(buf, rr_path=f"/{name}")
            out[name] = buf.getvalue()
        return out
    finally:
        iso.close()
