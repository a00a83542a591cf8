"""Configuration: defaults for one machine, overridden by a TOML file and VIRTFLEET_* variables.

Owns the list of settings, their types and checks. A bad value raises ConfigError naming the
setting, so start-up stops with a message an operator can act on. Must not open connections.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet.exceptions import ConfigError

ENV_PREFIX = "VIRTFLEET_"
"""Environment variables named VIRTFLEET_<SETTING> (upper case) override the file."""

CONFIG_ENV = "VIRTFLEET_CONFIG"
"""Path of the TOML config file; default /etc/virtfleet/virtfleet.toml when it exists."""

DEFAULT_CONFIG_FILE = Path("/etc/virtfleet/virtfleet.toml")

HOST_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}\Z")  # \Z: `$` allows a final newline


def _default_host_name() -> str:
    name = re.sub(r"[^a-z0-9-]", "-", socket.gethostname().lower().split(".")[0]).strip("-")
    return (name or "host")[:63]


@dataclass(frozen=True)
class Settings:
    """Every setting of virtfleet; see README for what each means."""

    state_dir: Path = Path("/var/lib/virtfleet")
    database_url: str = ""
    redis_url: str = "redis://127.0.0.1:6379/0"
    libvirt_uri: str = "qemu:///system"
    storage_dir: Path = Path("/var/lib/virtfleet/storage")
    host_name: str = field(default_factory=_default_host_name)
    virt_type: str = "auto"
    network: str = "network:default"
    web_bind: str = "127.0.0.1:8080"
    web_workers: int = 1
    web_threads: int = 32
    public_url: str = ""
    heartbeat_interval: float = 5.0
    missed_heartbeats: int = 3
    cpu_allocation_ratio: float = 4.0
    ram_allocation_ratio: float = 1.0
    disk_allocation_ratio: float = 1.0
    placement_policy: str = "spread"
    host_subset_size: int = 1
    host_cache_ttl: float = 1.0
    task_time_limit: int = 3600
    worker_concurrency: int = 4
    host_token: str = ""
    console_bind: str = "127.0.0.1:6081"
    console_public_url: str = ""
    console_token_ttl: int = 60
    max_image_bytes: int = 64 * 1024**3
    max_virtual_bytes: int = 2 * 1024**4
    cache_max_bytes: int = 20 * 1024**3
    cache_gc_interval: float = 300.0
    ready_timeout: float = 900.0
    log_level: str = "INFO"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.state_dir / 'virtfleet.db'}"

    @property
    def base_url(self) -> str:
        return self.public_url or f"http://{self.web_bind}"

    @property
    def console_url(self) -> str:
        """Where browsers and clients reach this host's console server ('' if it has none)."""
        if not self.console_bind:
            return ""
        return (self.console_public_url or f"ws://{self.console_bind}").rstrip("/")

    @property
    def network_kind(self) -> str:
        return self.network.split(":", 1)[0]

    @property
    def network_source(self) -> str:
        return self.network.split(":", 1)[1]


def _coerce(name: str, typ: Any, raw: Any) -> Any:
    try:
        if typ in (Path, "Path"):
            return Path(str(raw))
        if typ in (int, "int"):
            if isinstance(raw, bool):
                raise ValueError
            return int(raw)
        if typ in (float, "float"):
            return float(raw)
        return str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"setting '{name}' has an invalid value {raw!r}") from None


def _check(s: Settings) -> None:
    if s.virt_type not in ("auto", "kvm", "qemu"):
        raise ConfigError("setting 'virt_type' must be auto, kvm or qemu")
    if not HOST_NAME_RE.match(s.host_name):
        raise ConfigError("setting 'host_name' must match ^[a-z0-9][a-z0-9-]{0,62}$")
    if s.placement_policy not in ("spread", "pack"):
        raise ConfigError("setting 'placement_policy' must be spread or pack")
    if ":" not in s.network or s.network_kind not in ("network", "bridge", "none"):
        raise ConfigError("setting 'network' must be network:<name>, bridge:<name> or none:")
    if not s.redis_url.startswith(("redis://", "rediss://", "sentinel://")):
        raise ConfigError("setting 'redis_url' must start with redis://, rediss:// or sentinel://")
    if s.database_url and not s.database_url.startswith(("sqlite:", "postgresql")):
        raise ConfigError("setting 'database_url' must be a sqlite: or postgresql URL")
    if ":" not in s.web_bind:
        raise ConfigError("setting 'web_bind' must be HOST:PORT")
    _check_console(s)
    for name in ("heartbeat_interval", "cpu_allocation_ratio", "ram_allocation_ratio",
                 "disk_allocation_ratio"):
        if getattr(s, name) <= 0:
            raise ConfigError(f"setting '{name}' must be greater than zero")
    if not s.host_cache_ttl >= 0:
        raise ConfigError("setting 'host_cache_ttl' must be zero (no cache) or more seconds")
    for name in ("missed_heartbeats", "host_subset_size", "task_time_limit",
                 "worker_concurrency", "max_image_bytes", "max_virtual_bytes", "web_workers",
                 "web_threads"):
        if getattr(s, name) < 1:
            raise ConfigError(f"setting '{name}' must be at least 1")
    if s.cache_max_bytes < 0:
        raise ConfigError("setting 'cache_max_bytes' must be zero (keep no unused base) or more")
    if not s.cache_gc_interval > 0:
        raise ConfigError("setting 'cache_gc_interval' must be greater than zero")
    if not s.ready_timeout >= 0:
        raise ConfigError("setting 'ready_timeout' must be zero (wait forever) or more seconds")


def _check_console(s: Settings) -> None:
    if s.console_bind:
        host, sep, port = s.console_bind.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError("setting 'console_bind' must be HOST:PORT (port 1-65535), "
                              "or empty for no console server")
        if host.strip("[]") in ("", "0.0.0.0", "::") and not s.console_public_url:
            raise ConfigError("setting 'console_public_url' is needed when 'console_bind' "
                              "listens on every address (e.g. ws://kvm1.example:6081)")
    url = s.console_public_url
    if url and (not url.startswith(("ws://", "wss://")) or "?" in url or "#" in url
                or len(url.split("://", 1)[1].strip("/")) == 0):
        raise ConfigError("setting 'console_public_url' must be a ws:// or wss:// URL "
                          "without query or fragment")
    if not 1 <= s.console_token_ttl <= 3600:
        raise ConfigError("setting 'console_token_ttl' must be 1 to 3600 seconds")


def load_settings(env: dict[str, str] | None = None, path: Path | None = None,
                  **overrides: Any) -> Settings:
    """Defaults, then the TOML file, then VIRTFLEET_* variables, then keyword overrides."""
    env = dict(os.environ if env is None else env)
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    values: dict[str, Any] = {}
    path = path or (Path(env[CONFIG_ENV]) if env.get(CONFIG_ENV) else None)
    if path is None and DEFAULT_CONFIG_FILE.exists():
        path = DEFAULT_CONFIG_FILE
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"config file cannot be read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file is not valid TOML: {exc}") from None
        section = data.get("virtfleet", data)
        for key, raw in section.items():
            if key not in fields:
                raise ConfigError(f"unknown setting '{key}' in config file")
            values[key] = raw
    for key in fields:
        if ENV_PREFIX + key.upper() in env:
            values[key] = env[ENV_PREFIX + key.upper()]
    values.update({k: v for k, v in overrides.items() if v is not None})
    coerced = {k: _coerce(k, fields[k].type, v) for k, v in values.items()}
    if "state_dir" in coerced and "storage_dir" not in coerced:
        coerced["storage_dir"] = coerced["state_dir"] / "storage"
    settings = Settings(**coerced)
    _check(settings)
    return settings
