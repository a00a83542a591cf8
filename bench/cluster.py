"""A whole virtfleet on this machine, for tests and benchmarks: web, scheduler and workers
as separate processes over real Redis and libvirtd, in a temporary state directory.

Owns starting them, waiting until they answer, an API client, and tearing everything down
(every VM deleted, every process it started stopped by pid, every file removed), even when
the caller failed. Never stops a process it did not start.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from fleet.config import load_settings
from fleet.store.migrate import upgrade
from fleet.store.session import Store

OWNER_KEY = "virtfleet:test-cluster-owner"
"""Marks a Redis database as taken by one running test cluster."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cidr(virt: Any) -> str:
    """A /24 in 10.200-249.x that no libvirt network on ``virt``'s host overlaps (for a
    throwaway fleet network)."""
    from worker.networks import describe
    used = []
    for name in virt.network_names():
        cidr = describe(virt.network_xml(name) or "<network/>")["cidr"]
        if cidr:
            used.append(ipaddress.ip_network(cidr))
    for _ in range(100):
        net = ipaddress.ip_network(f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(256)}"
                                   ".0/24")
        if not any(net.overlaps(u) for u in used):
            return str(net)
    raise RuntimeError("no free /24 found in 10.200.0.0-10.249.255.0")


def redis_db_url(db: int) -> str:
    return f"redis://127.0.0.1:6379/{db}"


@dataclass
class Api:
    """A tiny client of the REST API with one token."""

    base: str
    token: str
    session: requests.Session = field(default_factory=requests.Session)

    def __post_init__(self) -> None:
        self.session.headers["Authorization"] = f"Bearer {self.token}"
        # gunicorn closes an idle keep-alive connection after 2 s: a GET sent on it just then
        # is reset. Idempotent reads are retried on a fresh connection; writes never are.
        retry = Retry(total=3, connect=3, read=3, status=0, backoff_factor=0.05,
                      allowed_methods=frozenset({"GET", "HEAD"}), raise_on_status=False)
        self.session.mount("http://", HTTPAdapter(max_retries=retry))

    def call(self, method: str, path: str, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", 30)
        return self.session.request(method, self.base + "/api/v1" + path, **kw)

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.call("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> requests.Response:
        return self.call("POST", path, **kw)

    def delete(self, path: str, **kw: Any) -> requests.Response:
        return self.call("DELETE", path, **kw)

    def wait_vm(self, vm_id: str, states: tuple[str, ...], timeout: float = 120,
                poll: float = 0.05) -> dict[str, Any]:
        """Poll until the VM is in one of `states`; raises with the last view on timeout."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            r = self.get(f"/vms/{vm_id}")
            if r.status_code == 404 and "gone" in states:
                return {"state": "gone"}
            if r.ok:
                last = r.json()
                if last["state"] in states:
                    return last
            time.sleep(poll)
        raise TimeoutError(f"VM {vm_id} not in {states} after {timeout}s: {last}")


@dataclass
class Cluster:
    """Processes of one throwaway virtfleet. Use as a context manager."""

    workers: dict[str, dict[str, str]] = field(default_factory=lambda: {"local": {}})
    env: dict[str, str] = field(default_factory=dict)
    redis_db: int = 0
    keep: bool = False
    worker_nice: int = 0
    """Niceness of the worker processes. A benchmark of the control plane sets it: its
    simulated hosts stand for other machines, but here they share the control plane's CPUs."""
    root: Path = field(init=False)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, init=False)
    api: Api = field(init=False)
    settings_env: dict[str, str] = field(init=False)

    def __enter__(self) -> Cluster:
        self.redis_db = self._claim_redis_db()
        self.root = Path(tempfile.mkdtemp(prefix="vf-cluster-"))
        os.chmod(self.root, 0o755)  # libvirt-qemu must reach instance files below it
        port = free_port()
        self.settings_env = {
            "VIRTFLEET_STATE_DIR": str(self.root / "state"),
            "VIRTFLEET_REDIS_URL": redis_db_url(self.redis_db),
            "VIRTFLEET_WEB_BIND": f"127.0.0.1:{port}",
            "VIRTFLEET_HOST_TOKEN": "host-" + os.urandom(8).hex(),
            "VIRTFLEET_HEARTBEAT_INTERVAL": "1",
            "VIRTFLEET_MISSED_HEARTBEATS": "3",
            "VIRTFLEET_LOG_LEVEL": "INFO",
            **self.env,
        }
        try:
            self._flush_redis()
            settings = load_settings(env=self.settings_env)
            upgrade(settings.db_url)
            from web.auth import create_token
            store = Store(settings.db_url)
            with store.session() as s:
                token = create_token(s, "admin", "admin", admin=True)
            store.dispose()
            self.api = Api(settings.base_url, token)
            self.start("web", ["web"])
            self.start("scheduler", ["scheduler"])
            for name, extra in self.workers.items():
                self.start_worker(name, extra)
            self._wait_web()
            self.wait_hosts(set(self.workers))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    @staticmethod
    def _claim_redis_db() -> int:
        """A Redis database of our own (1-15), so clusters running side by side never share
        queues; marked with an expiring owner key and flushed before use and after."""
        import redis
        for db in range(1, 16):
            r = redis.Redis.from_url(redis_db_url(db))
            if r.set(OWNER_KEY, str(os.getpid()), nx=True, ex=4 * 3600):
                r.close()
                return db
            r.close()
        raise RuntimeError("no free Redis database for a test cluster (all 15 are in use)")

    def _flush_redis(self) -> None:
        import redis
        r = redis.Redis.from_url(redis_db_url(self.redis_db))
        for key in r.scan_iter():
            if key != OWNER_KEY.encode():
                r.delete(key)
        r.close()

    def _release_redis(self) -> None:
        import redis
        if self.redis_db:
            r = redis.Redis.from_url(redis_db_url(self.redis_db))
            r.flushdb()
            r.close()

    def log_path(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def start(self, name: str, args: list[str], extra_env: dict[str, str] | None = None,
              nice: int = 0) -> None:
        env = {**os.environ, **self.settings_env, **(extra_env or {})}
        argv = [sys.executable, "-m", "fleet.cli", *args]
        if nice:
            argv = ["nice", "-n", str(nice), *argv]  # nice(1) execs: the pid is Python's
        with self.log_path(name).open("ab") as log:
            self.procs[name] = subprocess.Popen(  # noqa: S603 - our own argv
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start_worker(self, name: str, extra: dict[str, str] | None = None) -> None:
        env = {"VIRTFLEET_HOST_NAME": name,
               "VIRTFLEET_STORAGE_DIR": str(self.root / f"storage-{name}"), **(extra or {})}
        self.start(f"worker-{name}", ["worker"], env, nice=self.worker_nice)

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)  # its own session: the process and its children only
            proc.wait(timeout=timeout)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def _wait_web(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if self.api.get("/hosts", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise TimeoutError("the web process did not answer")

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = self.log_path(name).read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")

    def wait_hosts(self, names: set[str], timeout: float = 120) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            hosts = self.api.get("/hosts").json()
            if names <= {h["name"] for h in hosts if h["alive"]}:
                return hosts
            time.sleep(0.2)
        raise TimeoutError(f"hosts {names} did not report in")

    def register_image(self, name: str, path: Path, timeout: float = 300) -> dict[str, Any]:
        """Register a controller file as an image and wait until it is `active` (the import
        is asynchronous: 202, then the control plane inspects and converts it)."""
        r = self.api.post("/images", json={"name": name, "source": str(path)}, timeout=timeout)
        r.raise_for_status()
        image = r.json()
        deadline = time.monotonic() + timeout
        while image["status"] == "importing" and time.monotonic() < deadline:
            time.sleep(0.05)
            self._check_alive()
            r = self.api.get(f"/images/{image['id']}")
            r.raise_for_status()
            image = r.json()
        if image["status"] != "active":
            raise RuntimeError(f"image {name} is {image['status']}: {image['status_reason']}")
        return image

    def delete_all_vms(self, timeout: float = 120) -> None:
        vms = self.api.get("/vms").json()
        for vm in vms:
            self.api.delete(f"/vms/{vm['id']}")
        for vm in vms:
            try:
                self.api.wait_vm(vm["id"], ("gone",), timeout=timeout)
            except TimeoutError:
                pass

    def __exit__(self, *exc: object) -> None:
        try:
            if hasattr(self, "api") and "web" in self.procs:
                try:
                    self.delete_all_vms()
                except Exception:  # noqa: BLE001 - clean-up goes on with what it can reach
                    pass
        finally:
            for name in list(self.procs):
                self.stop(name)
            self._remove_leftover_domains()
            self._release_redis()
            if not self.keep:
                shutil.rmtree(self.root, ignore_errors=True)

    def _remove_leftover_domains(self) -> None:
        """Domains whose disks live under our root are ours: remove any a failure left."""
        from worker.virt import Virt
        for uri in {w.get("VIRTFLEET_LIBVIRT_URI", "qemu:///system")
                    for w in self.workers.values()}:
            if not uri.startswith("qemu"):
                continue
            try:
                virt = Virt(uri)
                for dom in virt.list_domains():
                    if dom["name"].startswith("vf-") and self._owns(virt, dom["uuid"]):
                        virt.destroy_and_undefine(dom["uuid"])
                virt.close()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass

    def _owns(self, virt: Any, uuid: str) -> bool:
        for name in self.workers:
            if (self.root / f"storage-{name}" / "instances" / uuid).exists():
                return True
        return False
