"""The `virtfleet` command: run each part, manage the database and tokens, one-machine mode.

Owns argument parsing and process wiring only. Bad settings end with the ConfigError message
(naming the setting), never a traceback.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from fleet.apicli import TOKEN_FILE
from fleet.config import Settings, load_settings
from fleet.exceptions import ConfigError
from fleet.imagecli import image as image_group
from fleet.vmcli import vm as vm_group


def _settings(ctx: click.Context) -> Settings:
    if ctx.obj is None:
        try:
            ctx.obj = load_settings()
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
    return ctx.obj


def _logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@click.group()
def main() -> None:
    """virtfleet: a small private cloud for KVM hosts."""


main.add_command(image_group)
main.add_command(vm_group)


@main.group()
def db() -> None:
    """The state store."""


@db.command("upgrade")
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Create or migrate the database to the newest schema."""
    from fleet.store.migrate import upgrade
    settings = _settings(ctx)
    upgrade(settings.db_url)
    click.echo("database is up to date")


@main.group()
def admin() -> None:
    """Administration."""


@admin.command("create-token")
@click.option("--user", default="admin", show_default=True)
@click.option("--project", default="admin", show_default=True)
@click.option("--admin/--no-admin", "is_admin", default=False, help="grant admin rights")
@click.pass_context
def create_token_cmd(ctx: click.Context, user: str, project: str, is_admin: bool) -> None:
    """Create an API token (printed once; only its hash is stored)."""
    from fleet.store.session import Store
    from web.auth import create_token
    settings = _settings(ctx)
    store = Store(settings.db_url)
    try:
        with store.session() as s:
            token = create_token(s, user, project, admin=is_admin)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(token)


@main.command()
@click.pass_context
def web(ctx: click.Context) -> None:
    """Run the API and web pages (gunicorn)."""
    from web.server import serve
    settings = _settings(ctx)
    _logging(settings)
    serve(settings)


@main.command()
@click.pass_context
def scheduler(ctx: click.Context) -> None:
    """Run the scheduler service (control queue, liveness)."""
    from scheduler.service import run
    settings = _settings(ctx)
    _logging(settings)
    run(settings)


@main.command()
@click.pass_context
def worker(ctx: click.Context) -> None:
    """Run this host's worker (its queue, heartbeats, libvirt events)."""
    from worker.service import run
    settings = _settings(ctx)
    _logging(settings)
    try:
        run(settings)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


@main.group()
def bench() -> None:
    """Benchmarks (each starts its own throwaway cluster)."""


@bench.command("submit")
@click.option("--runs", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(min=0))
@click.option("--json", "as_json", is_flag=True, help="print all figures as one JSON object")
@click.option("--strict", is_flag=True, help="exit 1 when a target is missed")
def bench_submit(runs: int, warmup: int, as_json: bool, strict: bool) -> None:
    """Time API submit -> running domain against a bare virsh define + start."""
    from bench.submit import main as run_bench
    sys.exit(run_bench(runs=runs, warmup=warmup, as_json=as_json, strict=strict))


@bench.command("burst")
@click.option("--requests", "requests_total", default=200, show_default=True)
@click.option("--room", default=150, show_default=True, help="VMs the hosts have room for")
@click.option("--json", "as_json", is_flag=True)
@click.option("--hosts-nice", default=10, show_default=True, type=click.IntRange(0, 19),
              help="niceness of the simulated hosts' workers (0: as the control plane)")
@click.option("--strict", is_flag=True, help="exit 1 when a target is missed")
def bench_burst(requests_total: int, room: int, hosts_nice: int, as_json: bool,
                strict: bool) -> None:
    """Concurrent creates through two API processes against a fixed room."""
    from bench.burst import main as run_burst
    figures = run_burst(requests_total, room, as_json, hosts_nice)
    sys.exit(1 if strict and not figures["pass"] else 0)


@bench.command("placement")
@click.option("--hosts", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option("--decisions", default=3000, show_default=True, type=click.IntRange(min=1))
@click.option("--db", default="both", show_default=True,
              type=click.Choice(["sqlite", "postgresql", "both"]))
@click.option("--pg-url", default=None,
              help="PostgreSQL to use (a fresh schema, dropped afterwards); default "
                   "$VIRTFLEET_TEST_PG_URL or the cluster of `scripts/services.sh start-test`")
@click.option("--host-cache-ttl", type=float, default=None,
              help="override host_cache_ttl (0: no host cache)")
@click.option("--deciders", default=1, show_default=True, type=click.IntRange(1, 64),
              help="threads deciding at once in each process (as an API process's request "
                   "threads do)")
@click.option("--processes", default=1, show_default=True, type=click.IntRange(1, 16),
              help="processes deciding at once, each with its own connections and host cache "
                   "(as API processes or controllers sharing one database do)")
@click.option("--host-subset-size", default=1, show_default=True, type=click.IntRange(1, 100),
              help="each decision picks at random among the best N hosts (the setting "
                   "host_subset_size: fewer collisions between deciding processes)")
@click.option("--warmup", default=50, show_default=True, type=click.IntRange(min=0),
              help="untimed decisions each decider makes first (its connections, compiled "
                   "statements and first read of every host), checked with the others")
@click.option("--json", "as_json", is_flag=True, help="print all figures as one JSON object")
@click.option("--strict", is_flag=True, help="exit 1 when a target is missed")
def bench_placement(hosts: int, decisions: int, db: str, pg_url: str | None,
                    host_cache_ttl: float | None, deciders: int, processes: int,
                    host_subset_size: int, warmup: int, as_json: bool, strict: bool) -> None:
    """Placement decisions per second (each one transaction with its claim), per database."""
    from bench.placement import main as run_placement
    sys.exit(run_placement(hosts=hosts, decisions=decisions, db=db, pg_url=pg_url,
                           as_json=as_json, strict=strict, host_cache_ttl=host_cache_ttl,
                           deciders=deciders, processes=processes,
                           host_subset_size=host_subset_size, warmup=warmup))


@bench.command("images")
@click.option("--runs", default=15, show_default=True, type=click.IntRange(min=1),
              help="overlay + seed runs per base")
@click.option("--copy-runs", default=3, show_default=True, type=click.IntRange(min=1),
              help="full copies of the 2 GiB base")
@click.option("--import-runs", default=3, show_default=True, type=click.IntRange(min=1),
              help="imports (and as many plain conversions)")
@click.option("--import-mib", default=1024, show_default=True,
              type=click.IntRange(min=16, max=16384),
              help="data in the raw disk imported (MiB)")
@click.option("--import-virtual-mib", default=4096, show_default=True,
              type=click.IntRange(min=16, max=65536),
              help="size of that raw disk (MiB; the rest is holes, as in a cloud image)")
@click.option("--json", "as_json", is_flag=True, help="print all figures as one JSON object")
@click.option("--strict", is_flag=True, help="exit 1 when a target is missed")
def bench_images(runs: int, copy_runs: int, import_runs: int, import_mib: int,
                 import_virtual_mib: int, as_json: bool, strict: bool) -> None:
    """Overlay + seed on 1 GiB and 1 TiB bases, against a full copy; import against convert."""
    from bench.images import main as run_images
    if import_virtual_mib < import_mib:
        raise click.BadParameter("must be at least --import-mib", param_hint="--import-virtual-mib")
    sys.exit(run_images(runs=runs, copy_runs=copy_runs, import_runs=import_runs,
                        import_mib=import_mib, import_virtual_mib=import_virtual_mib,
                        as_json=as_json, strict=strict))


@bench.command("ready")
@click.option("--runs", default=3, show_default=True, type=click.IntRange(min=1),
              help="measured API + bare rounds")
@click.option("--warmup", default=0, show_default=True, type=click.IntRange(min=0),
              help="rounds run first and not counted (the host's image cache fills)")
@click.option("--json", "as_json", is_flag=True, help="print all figures as one JSON object")
@click.option("--strict", is_flag=True, help="exit 1 when the target is missed")
def bench_ready(runs: int, warmup: int, as_json: bool, strict: bool) -> None:
    """API submit -> ready of a Debian 12 cloud guest, against a bare virsh boot of it."""
    from bench.ready import main as run_ready
    sys.exit(run_ready(runs=runs, warmup=warmup, as_json=as_json, strict=strict))


@main.group("demo")
def demo_group() -> None:
    """Guest images for tests and benchmarks."""


@demo_group.command("debian-image")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="cache dir (default: $VIRTFLEET_DEBIAN_CACHE, else "
                   "/var/cache/virtfleet/debian12 for root, else ~/.cache/virtfleet/debian12)")
def demo_debian_image(cache_dir: Path | None) -> None:
    """Build (as root; or find in the cache) the Debian 12 cloud image; print its path."""
    from demo.debian import DebianImageError, ensure_debian_image
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        click.echo(ensure_debian_image(cache_dir))
    except DebianImageError as exc:
        raise click.ClickException(str(exc)) from None


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _secret_file(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    return value


@main.command()
@click.option("--demo-image/--no-demo-image", default=True, show_default=True,
              help="build and register the tiny demo image")
@click.pass_context
def up(ctx: click.Context, demo_image: bool) -> None:
    """One machine: migrate, then run web, scheduler and a worker until Ctrl-C."""
    settings = _settings(ctx)
    from fleet.store.migrate import upgrade
    upgrade(settings.db_url)
    env = dict(os.environ)
    if not settings.host_token:
        env["VIRTFLEET_HOST_TOKEN"] = _secret_file(settings.state_dir / "host-token")
    token_file = settings.state_dir / TOKEN_FILE  # where `vm`/`image` look for it
    if not token_file.exists():
        from fleet.store.session import Store
        from web.auth import create_token
        with Store(settings.db_url).session() as s:
            token = create_token(s, "admin", "admin", admin=True, name="quickstart")
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
    token = token_file.read_text().strip()
    exe = [sys.executable, "-m", "fleet.cli"]
    # SIGTERM (systemd stop, `timeout`, CI) must stop the children just as Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    procs = [subprocess.Popen([*exe, part], env=env)  # noqa: S603 - our own argv
             for part in ("web", "scheduler", "worker")]
    try:
        if demo_image:
            _register_demo(settings, token)
        click.echo(f"\nvirtfleet is running at {settings.base_url}/\n"
                   f"  admin token: {token}\n  API docs:    {settings.base_url}/api/v1/docs\n"
                   "Press Ctrl-C to stop.\n")
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        raise click.ClickException("a virtfleet process exited; stopping the others")
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def retire_stale_demo(db_url: str, current_sha256: str) -> str | None:
    """An image named 'demo' that `up` registered (from a path on this machine, in the admin
    project) from another build of the demo image than this one (`current_sha256`: its
    qcow2's, which a path import stores as it is) is renamed 'demo-<first 8 of its id>', so
    that this build can be registered as 'demo': an earlier build's guest may not do what
    this virtfleet's user-data asks of it (its ready line). VMs made from it keep it.
    Returns its new name, or None when there was none to retire."""
    from sqlalchemy import select

    from fleet.store.models import Image, Project
    from fleet.store.session import Store
    store = Store(db_url)
    try:
        with store.session() as s:
            stale = s.scalars(select(Image).join(Project, Project.id == Image.project_id).where(
                Image.name == "demo", Project.name == "admin", Image.source == "local",
                Image.sha256 != current_sha256)).first()
            if stale is None:
                return None
            stale.name = f"demo-{stale.id[:8]}"
            return stale.name
    finally:
        store.dispose()


def _register_demo(settings: Settings, token: str) -> None:
    import requests

    from demo.image import IMAGE_TAG, build_demo_image
    path = build_demo_image(settings.state_dir / "demo" / f"virtfleet-demo-{IMAGE_TAG}.qcow2")
    with path.open("rb") as fh:
        sha256 = hashlib.file_digest(fh, "sha256").hexdigest()
    retired = retire_stale_demo(settings.db_url, sha256)
    if retired:
        click.echo(f"the demo image of an earlier virtfleet is now '{retired}'")
    url = f"{settings.base_url}/api/v1/images"
    headers = {"Authorization": f"Bearer {token}"}
    for _ in range(60):
        try:
            listed = requests.get(url, headers=headers, timeout=5)
            break
        except requests.ConnectionError:
            time.sleep(0.5)
    else:
        raise click.ClickException("the web process did not come up")
    if any(i["name"] == "demo" for i in listed.json()):
        return
    resp = requests.post(url, headers=headers, timeout=120,
                         json={"name": "demo", "source": str(path), "visibility": "public"})
    if resp.status_code not in (201, 202):
        raise click.ClickException(f"could not register the demo image: {resp.text}")
    image = resp.json()
    for _ in range(600):  # 202: the control plane inspects it; wait until it is usable
        if image["status"] != "importing":
            break
        time.sleep(0.2)
        image = requests.get(f"{url}/{image['id']}", headers=headers, timeout=10).json()
    if image["status"] != "active":
        raise click.ClickException(f"the demo image is {image['status']}: "
                                   f"{image.get('status_reason', '')}")
    click.echo("registered the demo image as 'demo'")


if __name__ == "__main__":
    main()
