"""Burst benchmark: N concurrent create requests through two API processes against room for
exactly R VMs. Prints how many were accepted and refused, the slowest answer, and whether
any host's used capacity ever went above its capacity while a sampler watched the store.

Simulated hosts: `virtfleet worker` processes on libvirt's test:/// driver, each with its own
capacity; the web, scheduler and workers are real processes over real Redis.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from sqlalchemy import select

from bench.cluster import Api, Cluster, free_port
from bench.stats import cpu_times, percentile, steal_share
from demo.image import build_demo_image, default_image_path
from fleet.config import load_settings
from fleet.store.models import Claim, Host
from fleet.store.session import TIMINGS_ENV, Store

NODE_XML = """<node>
  <cpu><mhz>2000</mhz><model>x86_64</model><active>{cpus}</active>
    <nodes>1</nodes><sockets>1</sockets><cores>{cpus}</cores><threads>1</threads></cpu>
  <memory>{kib}</memory>
</node>
"""


HOSTS_NICE = 10
"""Niceness of the simulated hosts' workers. On a fleet they are other machines; here they
share the control plane's two CPUs, and building 150 VMs at once takes about as much CPU as
answering the 200 requests: at nice 10 they yield it to the control plane, as other machines
would."""

_WRITE_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}).*store write by (\S+): "
                         r"waited ([\d.]+) ms, held ([\d.]+) ms \(([\d.]+) ms")


def store_writes(log: Path, since: float) -> dict[str, dict[str, float]]:
    """Per writing function, from a process's log (VIRTFLEET_STORE_TIMINGS): how many write
    transactions it made from `since` (a time.time()) on, their total and longest wait for
    the writer lock, their total and longest hold of it, and the CPU time the holding thread
    used while it held it."""
    out: dict[str, dict[str, float]] = {}
    if not log.exists():
        return out
    for line in log.read_text(errors="replace").splitlines():
        m = _WRITE_LINE.search(line)
        if m is None:
            continue
        at, name, wait, hold, cpu = m.groups()
        if datetime.strptime(at, "%Y-%m-%d %H:%M:%S,%f").timestamp() < since:
            continue  # before the burst
        w = out.setdefault(name, {"count": 0, "wait_ms": 0.0, "max_wait_ms": 0.0,
                                  "hold_ms": 0.0, "max_hold_ms": 0.0, "hold_cpu_ms": 0.0})
        w["hold_cpu_ms"] += float(cpu)
        w["count"] += 1
        w["wait_ms"] += float(wait)
        w["hold_ms"] += float(hold)
        w["max_wait_ms"] = max(w["max_wait_ms"], float(wait))
        w["max_hold_ms"] = max(w["max_hold_ms"], float(hold))
    return out


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process so far, from /proc (0.0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _family(pid: int) -> list[int]:
    """A process and its children (gunicorn's workers under its arbiter)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return [pid, *kids]


def cpu_by_process(procs: dict[str, Any]) -> dict[str, float]:
    """CPU seconds so far of each cluster process with its children, and of this one."""
    out = {name: sum(_cpu_seconds(p) for p in _family(proc.pid))
           for name, proc in procs.items()}
    out["bench client"] = _cpu_seconds(os.getpid())
    return out


def run(requests_total: int = 200, room: int = 150, hosts: int = 3,
        hosts_nice: int = HOSTS_NICE) -> dict[str, Any]:
    if room % hosts:
        raise ValueError("room must divide evenly among hosts")
    tmp = Path(tempfile.mkdtemp(prefix="vf-burst-"))
    try:
        return _run(tmp, requests_total, room, hosts, hosts_nice)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(tmp: Path, requests_total: int, room: int, hosts: int,
         hosts_nice: int) -> dict[str, Any]:
    per_host = room // hosts
    workers = {}
    for i in range(hosts):
        node = tmp / f"b{i}.xml"
        node.write_text(NODE_XML.format(cpus=per_host, kib=64 * 1024 * 1024))
        workers[f"b{i}"] = {"VIRTFLEET_LIBVIRT_URI": f"test://{node}",
                            "VIRTFLEET_NETWORK": "none:"}
    env = {"VIRTFLEET_CPU_ALLOCATION_RATIO": "1.0", "VIRTFLEET_LOG_LEVEL": "WARNING",
           "VIRTFLEET_HEARTBEAT_INTERVAL": "5", TIMINGS_ENV: "1"}
    with Cluster(workers=workers, env=env, worker_nice=hosts_nice) as c:
        c.register_image("demo", build_demo_image(default_image_path()))
        port2 = free_port()
        c.start("web2", ["web"], {"VIRTFLEET_WEB_BIND": f"127.0.0.1:{port2}"})
        api2 = Api(f"http://127.0.0.1:{port2}", c.api.token)
        deadline = time.monotonic() + 30
        while True:
            try:
                if api2.get("/hosts", timeout=2).ok:
                    break
            except requests.ConnectionError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.2)
        store = Store(load_settings(env=c.settings_env).db_url)
        over: list[str] = []
        samples = 0
        stop = threading.Event()

        def sampler() -> None:
            # One Core statement per sample on one connection: the sampler shares the
            # machine's CPUs with the cluster it watches.
            nonlocal samples
            query = select(Host.name, Host.used_vcpus, Host.vcpus, Host.used_memory_mb,
                           Host.memory_mb)
            with store.read_engine.connect() as conn:
                while not stop.is_set():
                    for name, uv, v, um, m in conn.execute(query):
                        if uv > v or um > m:
                            over.append(f"{name}: {uv}/{v} vcpus")
                    samples += 1
                    time.sleep(0.005)

        apis = [c.api, api2]
        messages: dict[str, int] = {}
        barrier = threading.Barrier(requests_total)

        def one(i: int) -> tuple[int, float]:
            # Connected and encoded before the barrier, http.client rather than requests:
            # the 200 clients stand for other machines, so what they cost this one is kept
            # small, and the clock runs from the request's sending to its answer's end.
            api = apis[i % 2]
            url = urlsplit(api.base)
            body = json.dumps({"name": f"burst-{i}", "image": "demo", "vcpus": 1,
                               "memory_mb": 64}).encode()
            headers = {"Authorization": f"Bearer {api.token}",
                       "Content-Type": "application/json"}
            conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=30)
            try:
                conn.connect()
                barrier.wait()
                t0 = time.perf_counter()
                conn.request("POST", "/api/v1/vms", body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
                took = time.perf_counter() - t0
            finally:
                conn.close()
            if r.status != 202:
                try:
                    text = str(json.loads(data).get("message", data))
                except ValueError:
                    text = data.decode(errors="replace")
                messages[text[:200]] = r.status
            return r.status, took

        watcher = threading.Thread(target=sampler, daemon=True)
        watcher.start()
        t_start, t_start_wall = time.perf_counter(), time.time()
        cpu_before = cpu_by_process(c.procs)
        machine_before = cpu_times()
        with ThreadPoolExecutor(max_workers=requests_total) as pool:
            results = list(pool.map(one, range(requests_total)))
        wall = time.perf_counter() - t_start
        cpu_after = cpu_by_process(c.procs)
        steal = steal_share(machine_before, cpu_times())
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        time.sleep(0.2)
        stop.set()
        watcher.join()
        writes = {name: store_writes(c.log_path(name), t_start_wall)
                  for name in ("web", "web2", "scheduler")}
        with store.sessions() as s:
            claims = len(s.scalars(select(Claim)).all())
            used = {h.name: (h.used_vcpus, h.vcpus) for h in s.scalars(select(Host))}
        store.dispose()
        codes: dict[int, int] = {}
        for code, _ in results:
            codes[code] = codes.get(code, 0) + 1
        lat = [t for _, t in results]
        figures = {
            "requests": requests_total, "room": room, "api_processes": 2,
            "accepted_202": codes.get(202, 0), "refused_409": codes.get(409, 0),
            "other": {k: v for k, v in codes.items() if k not in (202, 409)},
            "claims_in_store": claims, "used_vcpus_per_host": used,
            "capacity_exceeded_samples": len(over), "samples": samples,
            "latency_p50_s": round(statistics.median(lat), 3),
            "latency_p95_s": round(percentile(lat, 95), 3),
            "latency_max_s": round(max(lat), 3), "wall_s": round(wall, 3),
            "refusal_messages": sorted(messages),
            "store_writes": writes,
            "cpu_s_during_burst": {k: round(cpu_after[k] - cpu_before.get(k, 0.0), 2)
                                   for k in cpu_after},
            "load_average": load, "hosts_nice": hosts_nice,
            "steal": None if steal is None else round(steal, 4),
        }
        figures["pass"] = (figures["accepted_202"] == room
                           and figures["refused_409"] == requests_total - room
                           and claims == room and not over and max(lat) <= 2.0)
        return figures


def main(requests_total: int = 200, room: int = 150, as_json: bool = False,
         hosts_nice: int = HOSTS_NICE) -> dict[str, Any]:
    f = run(requests_total, room, hosts_nice=hosts_nice)
    if as_json:
        print(json.dumps(f, indent=2))
    else:
        print(f"burst: {f['requests']} concurrent creates over {f['api_processes']} API "
              f"processes, room for {f['room']} (simulated hosts' workers at nice "
              f"{f['hosts_nice']})")
        print(f"  accepted (202): {f['accepted_202']}   refused (409): {f['refused_409']}   "
              f"other: {f['other'] or 'none'}")
        print(f"  claims in store: {f['claims_in_store']}   used vCPUs per host: "
              f"{f['used_vcpus_per_host']}")
        print(f"  capacity exceeded in {f['capacity_exceeded_samples']} of {f['samples']} "
              "store samples taken during the burst")
        print(f"  answer time: p50 {f['latency_p50_s']} s, p95 {f['latency_p95_s']} s, "
              f"max {f['latency_max_s']} s (target: every answer within 2 s); "
              f"wall {f['wall_s']} s")
        for msg in f["refusal_messages"]:
            print(f"  refused with: {msg}")
        steal = "unknown" if f["steal"] is None else f"{f['steal'] * 100:.1f}%"
        print(f"  CPU seconds used during the burst ({os.cpu_count()} CPUs, load average "
              f"{f['load_average']}, the hypervisor's steal {steal} of the machine's CPU "
              f"time): " + ", ".join(
                  f"{k} {v:.2f}" for k, v in f["cpu_s_during_burst"].items()))
        print("  store write transactions (count, total/longest wait for the writer lock, "
              "total/longest hold, the holder's CPU), per process and function:")
        for proc, by_name in f["store_writes"].items():
            for name, w in sorted(by_name.items(), key=lambda kv: -kv[1]["hold_ms"]):
                print(f"    {proc:<9} {name:<24} {int(w['count']):>5}  wait "
                      f"{w['wait_ms'] / 1000:7.2f} s / {w['max_wait_ms']:7.1f} ms  hold "
                      f"{w['hold_ms'] / 1000:6.2f} s / {w['max_hold_ms']:6.1f} ms  cpu "
                      f"{w['hold_cpu_ms'] / 1000:6.2f} s")
        print(f"  {'PASS' if f['pass'] else 'FAIL'}")
    return f
