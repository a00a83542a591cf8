"""Boots the real Debian 12 cloud image (demo.debian) once, directly through libvirt.

The domain is what virtfleet's designer makes (virtio disk on a qcow2 overlay, the NoCloud seed
on a virtio-scsi cdrom, serial console logged to a file) on qemu:///system under TCG; the test
only reads that console log: cloud-init must report the NoCloud seed in its final message, have
written a file and run runcmd, and applied a static network-config v2.  The image is built on
the first run (root, debootstrap, a few minutes) and cached.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from demo.debian import ensure_debian_image
from worker import images
from worker.domain import HostSettings, design, instance_paths, to_xml
from worker.seed import build_seed_iso

pytestmark = [pytest.mark.e2e, pytest.mark.libvirt]

LIBVIRT_URI = "qemu:///system"
BOOT_TIMEOUT = 1500.0
"""Seconds from start to cloud-init's final message: ~3 min on a busy 2-core machine under
TCG, ~6 min seen when other tests boot guests at the same time; generous on purpose."""

MAC = "52:54:00:5e:0d:12"
STATIC_ADDRESS = "10.213.7.5/24"
NETWORK_CONFIG = f"""\
version: 2
ethernets:
  eth0:
    match: {{macaddress: "{MAC}"}}
    set-name: eth0
    addresses: [{STATIC_ADDRESS}]
    gateway4: 10.213.7.1
    nameservers: {{addresses: [10.213.7.1]}}
"""

# The marker is computed by the guest's shell: user-data echoed anywhere cannot match it.
USER_DATA = """\
#cloud-config
write_files:
  - path: /run/vf-e2e-marker
    content: "from-write-files"
runcmd:
  - [sh, -c, 'echo "vf-e2e: runcmd $(cat /run/vf-e2e-marker) $((6 * 7))" > /dev/ttyS0']
  - [sh, -c, 'ip -4 -o addr show dev eth0 | sed "s/^/vf-e2e: ip /" > /dev/ttyS0']
"""
RUNCMD_LINE = "vf-e2e: runcmd from-write-files 42"
FINAL_RE = re.compile(
    r"Cloud-init v\. \S+ finished at .*Datasource (\S+) (\[[^\n]*?\])\.?\s+Up ([0-9.]+) seconds")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except (FileNotFoundError, PermissionError):
        return ""


@pytest.fixture(scope="module")
def debian_image() -> Path:
    if os.geteuid() != 0:
        pytest.skip("building and booting the Debian image needs root")
    for tool in ("debootstrap", "qemu-img", "qemu-system-x86_64"):
        if shutil.which(tool, path=os.pathsep.join((os.environ.get("PATH", ""), "/usr/sbin"))) \
                is None:
            pytest.skip(f"{tool} is not installed (quickstart.sh test installs it)")
    return ensure_debian_image()


def test_debian_image_boots_with_nocloud_seed(debian_image: Path) -> None:
    from worker.virt import Virt

    store = Path(tempfile.mkdtemp(prefix="vf-debian-e2e-"))
    os.chmod(store, 0o755)  # libvirt's qemu user reaches the instance files below it
    vm_id = str(uuid.uuid4())
    virt = Virt(LIBVIRT_URI)
    started = False
    try:
        host = HostSettings(virt_type="qemu", arch="x86_64", machine="pc", emulator=None,
                            network_kind="network", network_source="default",
                            storage_dir=store)
        paths = instance_paths(store, vm_id)
        paths.dir.mkdir(parents=True)
        os.chmod(paths.dir, 0o755)
        images.create_overlay(debian_image, paths.disk, None)
        build_seed_iso(paths.seed, instance_id=vm_id, hostname="vf-debian-e2e",
                       user_data=USER_DATA, network_config=NETWORK_CONFIG)
        xml = to_xml(design({"id": vm_id, "name": "debian-e2e", "vcpus": 1, "memory_mb": 512,
                             "mac": MAC}, host))
        virt.ensure_network_active("default")
        start = time.monotonic()
        started = True
        virt.define_and_start(xml)

        match = None
        while time.monotonic() - start < BOOT_TIMEOUT:
            match = FINAL_RE.search(_read(paths.console))
            if match:
                break
            if virt.state(vm_id) != "running":
                break
            time.sleep(1)
        elapsed = time.monotonic() - start
        log = _read(paths.console)
        assert match, (f"no cloud-init final message after {elapsed:.0f}s (domain "
                       f"{virt.state(vm_id)})\n--- console ---\n{log[-6000:]}")
        print(f"boot -> cloud-init final message: {elapsed:.1f}s (guest uptime "
              f"{match.group(3)}s); {match.group(0)}")
        assert match.group(1) == "DataSourceNoCloud", match.group(0)
        assert "seed=/dev/sr0" in match.group(2), match.group(0)

        # runcmd runs in cloud-final, before the final message; its output may trail it a bit.
        deadline = time.monotonic() + 60
        while RUNCMD_LINE not in log and time.monotonic() < deadline:
            time.sleep(1)
            log = _read(paths.console)
        assert RUNCMD_LINE in log, log[-6000:]
        ip_lines = [line for line in log.splitlines() if line.startswith("vf-e2e: ip ")]
        assert any(f"inet {STATIC_ADDRESS}" in line for line in ip_lines), (ip_lines, log[-4000:])
    finally:
        try:
            if started:
                virt.destroy_and_undefine(vm_id)
        finally:
            virt.close()
            shutil.rmtree(store, ignore_errors=True)
