"""`virtfleet bench ready`: API submit → ``ready`` for a real Debian 12 cloud guest, next to a
hand-run ``virsh`` boot of the same overlay and seed until cloud-init's final message.

Owns the measurement loop and its report. Starts its own throwaway cluster
(:mod:`bench.cluster`: web, scheduler, one worker ``bench`` on ``qemu:///system``, QEMU TCG),
registers the cached Debian 12 image (:mod:`demo.debian`), a keypair and a throwaway NAT fleet
network, then alternates:

* API round: ``POST /vms`` (the keypair, a ``#cloud-config`` with a user, ``write_files`` and
  ``runcmd``, a static address on the fleet network), polled until the API shows ``ready``;
  deleted and waited for until gone.
* bare round: the same overlay (from the worker's cached base) and the same seed (the same
  composed user-data and network-config, the address the API round just gave back), the
  worker's domain XML renamed so the worker does not report it, ``virsh define`` + ``virsh
  start``, then the serial console log read until cloud-init prints ``Cloud-init v. ...
  finished at``.

The target (issue 5) is p50(API) / p50(bare) ≤ 1.1. Every domain, file and network it made is
removed, also on Ctrl-C or SIGTERM. A benchmark reports; it does not fail (``strict`` aside).
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import sys
import time
import uuid as uuidlib
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.stats import percentile, sigterm_as_interrupt

RATIO_TARGET = 1.1
"""API submit → ready may take at most this many times the bare boot (p50 over p50)."""

WORKER = "bench"
VIRT_URI = "qemu:///system"
VCPUS, MEMORY_MB, DISK_GB = 1, 512, 3
"""The guest each round boots."""

RUN_TIMEOUT = 900.0
"""Seconds one boot may take (Debian under TCG on a busy 2-core machine) before giving up."""

API_POLL = 0.25
"""Seconds between two GET /vms/<id> while waiting for ``ready``."""

LOG_POLL = 0.1
"""Seconds between two reads of the bare domain's console log."""

FINAL_RE = re.compile(rb"Cloud-init v\. \S+ finished at [^\n]*")
"""cloud-init's final message on the serial console (cc_final_message's default)."""

BARE_PREFIX = "vfbench-"
"""Bare domains are not ``vf-...``, so the worker does not forward their events."""

USER_DATA = """\
#cloud-config
users:
  - default
  - name: benchuser
    shell: /bin/sh
write_files:
  - path: /etc/virtfleet-bench.txt
    content: "written by cloud-config\\n"
runcmd:
  - [sh, -c, 'echo "bench-runcmd: $(cat /etc/virtfleet-bench.txt)" > /dev/ttyS0']
"""
"""What both rounds' guests are asked to do: a user, a file, a command."""


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def summarize(values: Sequence[float]) -> dict[str, float | int]:
    """``{n, p50, min, max}`` in seconds, rounded to ms; ``{n: 0}`` when empty."""
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50": round(percentile(values, 50), 3),
            "min": round(min(values), 3), "max": round(max(values), 3)}


def build_report(samples: dict[str, list[float]], *, runs: int, warmup: int,
                 notes: Sequence[str], error: str | None) -> dict[str, Any]:
    """All figures from the raw samples (seconds)."""
    s = {k: summarize(v) for k, v in samples.items()}
    api, bare = s["api_submit_to_ready"], s["bare_define_to_final"]
    ratio = None
    if api.get("n") and bare.get("n") and bare["p50"]:
        ratio = round(float(api["p50"]) / float(bare["p50"]), 3)
    verdict = "n/a" if ratio is None else ("PASS" if ratio <= RATIO_TARGET else "FAIL")
    paired = [a / b for a, b in zip(samples["api_submit_to_ready"],
                                    samples["bare_define_to_final"], strict=False) if b]
    return {"runs": runs, "warmup": warmup,
            "guest": {"vcpus": VCPUS, "memory_mb": MEMORY_MB, "disk_gb": DISK_GB},
            **s,
            "target": {"ratio": ratio, "limit": RATIO_TARGET, "verdict": verdict,
                       "paired_ratios": [round(x, 3) for x in paired]},
            "samples_s": {k: [round(x, 3) for x in v] for k, v in samples.items()},
            "notes": list(notes), "error": error}


def render(r: dict[str, Any]) -> str:
    lines = [f"virtfleet bench ready: {r['runs']} rounds after {r['warmup']} warm-up, Debian 12 "
             f"guest {r['guest']['vcpus']} vCPU / {r['guest']['memory_mb']} MiB under QEMU TCG",
             "", f"{'measure (s)':<58}{'n':>4}{'p50':>9}{'min':>9}{'max':>9}"]
    labels = (("api_submit_to_ready", "API: POST /vms -> API shows ready"),
              ("bare_define_to_final", "bare: virsh define + start -> cloud-init final msg"),
              ("api_boot_seconds", "  API VM: domain start -> ready line (worker's view)"),
              ("api_before_start", "  API VM: POST -> domain start (place, image, disks)"))

    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    for key, label in labels:
        x = r.get(key, {"n": 0})
        lines.append(f"{label:<58}{x.get('n', 0):>4}{cell(x.get('p50')):>9}"
                     f"{cell(x.get('min')):>9}{cell(x.get('max')):>9}")
    t = r["target"]
    ratio = "-" if t["ratio"] is None else f"{t['ratio']:.3f}x"
    lines += ["", f"target: p50(API -> ready) / p50(bare -> final message) = {ratio}, "
                  f"limit <= {t['limit']:g}x: {t['verdict']}",
              f"per-round ratios: {t['paired_ratios']}"]
    lines += [f"note: {n}" for n in r["notes"]]
    if r.get("error"):
        lines.append(f"ABORTED: {r['error']}")
    return "\n".join(lines)


def openssh_ed25519() -> str:
    """A fresh ed25519 public key in OpenSSH's one-line form (its private half is dropped)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pub = Ed25519PrivateKey.generate().public_key()
    line = pub.public_bytes(serialization.Encoding.OpenSSH,
                            serialization.PublicFormat.OpenSSH).decode()
    return f"{line} bench@virtfleet"


class ReadyBench:
    """One benchmark session inside a running :class:`bench.cluster.Cluster`."""

    def __init__(self, cluster: Any, image: dict[str, Any], public_key: str,
                 network: dict[str, Any]) -> None:
        from bench.submit import Bench

        self.cluster = cluster
        self.public_key = public_key
        self.network = network
        self.base = Bench(cluster, image, API_POLL, LOG_POLL)  # the bare path's helpers
        self.seq = 0

    def close(self) -> None:
        self.base.close()

    def api_round(self) -> dict[str, Any]:
        api = self.cluster.api
        self.seq += 1
        body = {"name": f"ready-{self.seq}", "image": "debian12", "vcpus": VCPUS,
                "memory_mb": MEMORY_MB, "disk_gb": DISK_GB, "keypairs": ["bench"],
                "network": self.network["name"], "address": "static", "user_data": USER_DATA}
        t0 = time.perf_counter()
        r = api.post("/vms", json=body)
        if r.status_code != 202:
            raise RuntimeError(f"POST /vms answered {r.status_code}: {r.text[:500]}")
        vm_id = r.json()["vm"]["id"]
        try:
            deadline = t0 + RUN_TIMEOUT
            while True:
                view = api.get(f"/vms/{vm_id}").json()
                if view["state"] == "ready":
                    t_ready = time.perf_counter()
                    break
                if view["state"] == "error":
                    raise RuntimeError(f"VM went to error: {view.get('state_reason')}")
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"VM {vm_id} not ready after {RUN_TIMEOUT:g}s")
                time.sleep(API_POLL)
        finally:
            api.delete(f"/vms/{vm_id}")
        api.wait_vm(vm_id, ("gone",), timeout=120, poll=0.2)
        boot = view.get("boot_seconds")
        if boot is None:
            boot = next((t.get("seconds") for t in view.get("timings") or []
                         if t.get("step") == "boot"), None)
        total = t_ready - t0
        return {"total": total, "boot": boot,
                "before_start": (total - boot) if boot is not None else None,
                "vm": view}

    def bare_round(self, name: str, mac: str, address: str) -> float:
        """Overlay + seed like the worker, virsh define + start, until cloud-init's final
        message on the console; returns seconds from define to that message."""
        from fleet import networks, userdata
        from fleet.proc import run
        from worker import cache, images
        from worker.build import GIB
        from worker.domain import design, instance_paths, to_xml
        from worker.seed import build_seed_iso

        b = self.base
        vm_id = str(uuidlib.uuid4())
        net = networks.from_row(SimpleNamespace(**self.network))
        vm = {"id": vm_id, "name": name, "project": "admin", "vcpus": VCPUS,
              "memory_mb": MEMORY_MB, "disk_gb": DISK_GB, "hostname": name, "mac": mac,
              "network": networks.spec(self.network["name"], net, self.network["id"])}
        paths = instance_paths(b.host.storage_dir, vm_id)
        paths.dir.mkdir(parents=True)
        b.bare_domains.add(vm_id)
        try:
            base = b.base_image()
            images.create_overlay(base, paths.disk, DISK_GB * GIB,
                                  base_size=cache.base_virtual_size(base))
            build_seed_iso(paths.seed, instance_id=vm_id, hostname=name,
                           user_data=userdata.compose(USER_DATA, hostname=name,
                                                      ssh_keys=[self.public_key]),
                           network_config=networks.network_config(mac, net, address))
            cfg = design(vm, b.host)
            cfg = dataclasses.replace(cfg, name=BARE_PREFIX + cfg.name.removeprefix("vf-"))
            xml_path = paths.dir / "domain.xml"
            xml_path.write_text(to_xml(cfg))
            virsh = ["virsh", "-c", VIRT_URI]
            t0 = time.perf_counter()
            run([*virsh, "define", str(xml_path)], timeout=60)
            run([*virsh, "start", vm_id], timeout=60)
            return wait_final_message(paths.console, t0 + RUN_TIMEOUT) - t0
        finally:
            b._remove_bare(vm_id)


def wait_final_message(log: Path, deadline: float) -> float:
    """perf_counter() when cloud-init's final message first appears in ``log``."""
    while time.perf_counter() < deadline:
        try:
            if FINAL_RE.search(log.read_bytes()):
                return time.perf_counter()
        except FileNotFoundError:
            pass
        time.sleep(LOG_POLL)
    raise TimeoutError(f"no cloud-init final message after {RUN_TIMEOUT:g}s")


def measure(runs: int, warmup: int) -> dict[str, Any]:
    from bench.cluster import Cluster, free_cidr
    from demo.debian import ensure_debian_image
    from fleet.contract import network_libvirt_name
    from worker.virt import Virt

    _progress("making sure the Debian 12 image is built (cached after the first time)...")
    image_file = ensure_debian_image()
    samples: dict[str, list[float]] = {k: [] for k in (
        "api_submit_to_ready", "bare_define_to_final", "api_boot_seconds", "api_before_start")}
    error = None
    net_name = f"bench-{secrets.token_hex(3)}"
    virt = Virt(VIRT_URI)
    _progress("starting a throwaway cluster (web, scheduler, worker 'bench')...")
    try:
        with Cluster(workers={WORKER: {"VIRTFLEET_VIRT_TYPE": "qemu"}}) as cl:
            image = cl.register_image("debian12", image_file, timeout=900)
            r = cl.api.post("/keypairs", json={"name": "bench",
                                               "public_key": openssh_ed25519()})
            r.raise_for_status()
            public_key = r.json()["public_key"]
            r = cl.api.post("/networks", json={"name": net_name, "mode": "nat",
                                               "cidr": free_cidr(virt)})
            r.raise_for_status()
            bench = ReadyBench(cl, image, public_key, r.json())
            try:
                for i in range(warmup + runs):
                    warm = i < warmup
                    label = (f"warm-up {i + 1}/{warmup}" if warm
                             else f"round {i - warmup + 1}/{runs}")
                    a = bench.api_round()
                    vm = a["vm"]
                    static = vm.get("static_address") or next(
                        (x["ip"] for x in vm.get("addresses") or []
                         if x.get("source") == "static"), "")
                    bare = bench.bare_round(f"bare-{i + 1}", vm["mac"], static)
                    _progress(f"{label}: API -> ready {a['total']:.1f} s (boot "
                              f"{a['boot'] if a['boot'] is not None else '-'} s) | bare -> "
                              f"final message {bare:.1f} s")
                    if warm:
                        continue
                    samples["api_submit_to_ready"].append(a["total"])
                    samples["bare_define_to_final"].append(bare)
                    if a["boot"] is not None:
                        samples["api_boot_seconds"].append(float(a["boot"]))
                        samples["api_before_start"].append(float(a["before_start"]))
            except Exception as exc:  # noqa: BLE001 - report what was measured, then fail
                error = f"{type(exc).__name__}: {exc}"
                _progress(f"aborted: {error}")
            finally:
                bench.close()
                cl.delete_all_vms()
                cl.api.delete(f"/networks/{net_name}")
    finally:
        virt.remove_network(network_libvirt_name(net_name))
        virt.close()
    notes = [
        "API and bare rounds alternate, one guest at a time, same image, overlay size, "
        "user-data (composed the same way), network-config and static address.",
        "the API round ends when GET /vms/<id> first shows 'ready' (polled every "
        f"{API_POLL:g} s): the worker saw the ready line, which the guest prints once "
        "cloud-init has written result.json, i.e. after the final message.",
        "the bare round ends when cloud-init's final message appears in the console log "
        f"(read every {LOG_POLL:g} s); it excludes overlay + seed creation, the API round "
        "includes placement, image cache, overlay, seed and define.",
    ]
    return build_report(samples, runs=runs, warmup=warmup, notes=notes, error=error)


def main(runs: int = 3, warmup: int = 0, as_json: bool = False, strict: bool = False) -> int:
    """Run the benchmark, print its figures, and return the exit code."""
    if runs < 1 or warmup < 0:
        raise ValueError("runs must be at least 1 and warmup at least 0")
    with sigterm_as_interrupt():
        report = measure(runs, warmup)
    print(json.dumps(report, indent=2) if as_json else render(report))
    if report.get("error"):
        return 1
    return 1 if strict and report["target"]["verdict"] == "FAIL" else 0
