"""Boots the demo guest image under QEMU (TCG) with a NoCloud seed on a virtio-scsi cdrom."""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pycdlib
import pytest

from demo.image import build_demo_image, default_cache_dir, default_image_path

pytestmark = pytest.mark.e2e

QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT = 90.0
DHCP_TIMEOUT = 30.0
POWEROFF_TIMEOUT = 30.0

INSTANCE_ID = "i-demo-0042"
HOSTNAME = "demo-vm-1"
# The marker is computed by the guest's shell, so the script's source echoed anywhere can't match.
USER_DATA = '#!/bin/sh\necho "demo-marker-$((6 * 7))"\nexit 3\n'
MARKER = "demo-marker-42"


def _make_seed_iso(path: Path) -> None:
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    files = {
        "meta-data": f"instance-id: {INSTANCE_ID}\nlocal-hostname: {HOSTNAME}\n",
        "user-data": USER_DATA,
    }
    for name, text in files.items():
        data = text.encode()
        iso_name = "/" + name.replace("-", "_").upper() + ".;1"
        iso.add_fp(io.BytesIO(data), len(data), iso_name, rr_name=name, joliet_path="/" + name)
    iso.write(str(path))
    iso.close()


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _wait_for(
    proc: subprocess.Popen[bytes], log: Path, needles: list[str], timeout: float
) -> tuple[bool, float]:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        text = _read(log)
        if all(n in text for n in needles):
            return True, time.monotonic() - start
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    return False, time.monotonic() - start


def _qmp(sock_path: Path, command: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock_path))
        f = s.makefile("rwb")
        json.loads(f.readline())  # greeting
        for cmd in ("qmp_capabilities", command):
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            while True:  # skip asynchronous events until the command's answer
                reply = json.loads(f.readline())
                if "return" in reply or "error" in reply:
                    break
            assert "return" in reply, reply


def test_demo_image_boots_and_reads_nocloud_seed() -> None:
    if shutil.which(QEMU) is None or shutil.which("qemu-img") is None:
        pytest.skip("qemu-system-x86_64 / qemu-img not installed")
    cache = default_cache_dir()
    image = build_demo_image(default_image_path(cache), cache)

    work = Path(tempfile.mkdtemp(prefix="vf-demo-test-"))
    proc: subprocess.Popen[bytes] | None = None
    log = work / "serial.log"
    try:
        overlay = work / "overlay.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-f", "qcow2", "-F", "qcow2", "-b", str(image.resolve()),
             str(overlay)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        seed = work / "seed.iso"
        _make_seed_iso(seed)
        qmp = work / "qmp.sock"
        args = [
            QEMU, "-accel", "tcg", "-m", "256", "-smp", "1",
            "-display", "none", "-nodefaults", "-no-reboot",
            "-serial", f"file:{log}",
            "-qmp", f"unix:{qmp},server=on,wait=off",
            "-drive", f"file={overlay},if=virtio,format=qcow2",
            "-device", "virtio-scsi-pci",
            "-drive", f"file={seed},if=none,id=cd,format=raw,media=cdrom,readonly=on",
            "-device", "scsi-cd,drive=cd",
            "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0",
        ]  # fmt: skip
        stderr_path = work / "qemu.stderr"
        with stderr_path.open("wb") as stderr:
            proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
            )

        needles = [
            f"virtfleet-demo: instance-id={INSTANCE_ID}",
            f"virtfleet-demo: hostname={HOSTNAME}",
            MARKER,
            "virtfleet-demo: user-data exit=3",
            "virtfleet-demo: ready",
        ]
        ok, elapsed = _wait_for(proc, log, needles, BOOT_TIMEOUT)
        assert ok, (
            f"guest not ready after {elapsed:.1f}s; missing "
            f"{[n for n in needles if n not in _read(log)]}\n--- serial log ---\n{_read(log)}"
            f"\n--- qemu stderr ---\n{_read(stderr_path)}"
        )
        print(f"demo guest ready {elapsed:.1f}s after qemu start")
        text = _read(log)
        assert text.index(MARKER) < text.index("virtfleet-demo: ready")

        ok, _ = _wait_for(proc, log, ["virtfleet-demo: eth0 address="], DHCP_TIMEOUT)
        assert ok, f"no DHCP address reported\n{_read(log)}"

        # ACPI power button (what libvirt's shutdown sends): the guest powers itself off.
        _qmp(qmp, "system_powerdown")
        try:
            proc.wait(timeout=POWEROFF_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"guest ignored the ACPI power button\n{_read(log)}")
        assert "virtfleet-demo: power button, powering off" in _read(log)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
