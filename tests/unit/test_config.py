"""Settings: defaults, the TOML file, VIRTFLEET_* variables, and bad values stopping start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.config import Settings, load_settings
from fleet.exceptions import ConfigError

# An explicit, empty environment: the machine's /etc/virtfleet and VIRTFLEET_* never leak in.
NO_FILE = {"VIRTFLEET_CONFIG": ""}


@pytest.fixture(autouse=True)
def no_system_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The machine's /etc/virtfleet/virtfleet.toml must not change what these tests see."""
    monkeypatch.setattr("fleet.config.DEFAULT_CONFIG_FILE", tmp_path / "absent.toml")


def load(env: dict[str, str] | None = None, path: Path | None = None, **kw: object) -> Settings:
    return load_settings(env={**NO_FILE, "VIRTFLEET_HOST_NAME": "node1", **(env or {})},
                         path=path, **kw)


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "virtfleet.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    s = load()
    assert s.state_dir == Path("/var/lib/virtfleet")
    assert s.db_url == "sqlite:////var/lib/virtfleet/virtfleet.db"
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.libvirt_uri == "qemu:///system"
    assert s.virt_type == "auto"
    assert s.network_kind == "network" and s.network_source == "default"
    assert s.heartbeat_interval == 5.0
    assert s.missed_heartbeats == 3
    assert (s.cpu_allocation_ratio, s.ram_allocation_ratio, s.disk_allocation_ratio) == \
        (4.0, 1.0, 1.0)
    assert s.base_url == "http://127.0.0.1:8080"


def test_default_host_name_is_a_valid_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "My_Box.example.org")
    s = load_settings(env=NO_FILE, path=None)
    assert s.host_name == "my-box"


def test_state_dir_moves_storage_and_database(tmp_path: Path) -> None:
    s = load({"VIRTFLEET_STATE_DIR": str(tmp_path)})
    assert s.storage_dir == tmp_path / "storage"
    assert s.db_url == f"sqlite:///{tmp_path / 'virtfleet.db'}"


def test_toml_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, """
[virtfleet]
heartbeat_interval = 2.5
missed_heartbeats = 5
virt_type = "qemu"
network = "bridge:br0"
database_url = "postgresql+psycopg://vf@db/vf"
public_url = "https://cloud.example.org"
""")
    s = load(path=path)
    assert s.heartbeat_interval == 2.5
    assert s.missed_heartbeats == 5
    assert s.virt_type == "qemu"
    assert (s.network_kind, s.network_source) == ("bridge", "br0")
    assert s.db_url == "postgresql+psycopg://vf@db/vf"
    assert s.base_url == "https://cloud.example.org"


def test_toml_file_named_by_env_and_without_section(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'worker_concurrency = 7\n')
    s = load({"VIRTFLEET_CONFIG": str(path)})
    assert s.worker_concurrency == 7


def test_env_overrides_file_and_keywords_override_env(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[virtfleet]\nheartbeat_interval = 2.5\nlog_level = 'DEBUG'\n")
    s = load({"VIRTFLEET_HEARTBEAT_INTERVAL": "9", "VIRTFLEET_MISSED_HEARTBEATS": "4"},
             path=path)
    assert s.heartbeat_interval == 9.0
    assert s.missed_heartbeats == 4
    assert s.log_level == "DEBUG"  # from the file, not overridden
    s = load({"VIRTFLEET_HEARTBEAT_INTERVAL": "9"}, path=path, heartbeat_interval=1.5)
    assert s.heartbeat_interval == 1.5


@pytest.mark.parametrize("env, setting", [
    ({"VIRTFLEET_HEARTBEAT_INTERVAL": "abc"}, "heartbeat_interval"),
    ({"VIRTFLEET_MISSED_HEARTBEATS": "2.5"}, "missed_heartbeats"),
    ({"VIRTFLEET_HEARTBEAT_INTERVAL": "0"}, "heartbeat_interval"),
    ({"VIRTFLEET_CPU_ALLOCATION_RATIO": "-1"}, "cpu_allocation_ratio"),
    ({"VIRTFLEET_WORKER_CONCURRENCY": "0"}, "worker_concurrency"),
    ({"VIRTFLEET_VIRT_TYPE": "xen"}, "virt_type"),
    ({"VIRTFLEET_HOST_NAME": "Bad_Name"}, "host_name"),
    ({"VIRTFLEET_HOST_NAME": "node1\n"}, "host_name"),
    ({"VIRTFLEET_NETWORK": "default"}, "network"),
    ({"VIRTFLEET_NETWORK": "vlan:7"}, "network"),
    ({"VIRTFLEET_REDIS_URL": "http://127.0.0.1:6379"}, "redis_url"),
    ({"VIRTFLEET_DATABASE_URL": "mysql://db/vf"}, "database_url"),
    ({"VIRTFLEET_WEB_BIND": "8080"}, "web_bind"),
    ({"VIRTFLEET_READY_TIMEOUT": "-1"}, "ready_timeout"),
    ({"VIRTFLEET_READY_TIMEOUT": "soon"}, "ready_timeout"),
])
def test_bad_env_value_names_the_setting(env: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigError, match=f"'{setting}'"):
        load(env)


def test_bad_value_in_file_names_the_setting(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[virtfleet]\nvirt_type = "xen"\n')
    with pytest.raises(ConfigError, match="'virt_type'"):
        load(path=path)
    path = write_toml(tmp_path, '[virtfleet]\nmissed_heartbeats = true\n')
    with pytest.raises(ConfigError, match="'missed_heartbeats'"):
        load(path=path)


def test_unknown_key_in_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[virtfleet]\nheartbeat_intervall = 3\n')
    with pytest.raises(ConfigError, match="unknown setting 'heartbeat_intervall'"):
        load(path=path)


def test_unreadable_or_invalid_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load(path=tmp_path / "missing.toml")
    path = write_toml(tmp_path, "[virtfleet\nx = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(path=path)


def test_system_config_file_is_read_when_present(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    system = write_toml(tmp_path, "[virtfleet]\nvirt_type = 'kvm'\n")
    monkeypatch.setattr("fleet.config.DEFAULT_CONFIG_FILE", system)
    assert load().virt_type == "kvm"


def test_unknown_env_variables_are_ignored() -> None:
    s = load({"VIRTFLEET_NOT_A_SETTING": "x", "VIRTFLEET_TEST_PG_URL": "postgresql://x"})
    assert s.virt_type == "auto"


def test_ready_timeout_zero_means_no_limit() -> None:
    assert load({}).ready_timeout == 900.0
    assert load({"VIRTFLEET_READY_TIMEOUT": "0"}).ready_timeout == 0.0
