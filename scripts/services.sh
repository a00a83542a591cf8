#!/usr/bin/env bash
# Start (or check) what virtfleet needs on this machine: Redis, virtlogd, libvirtd and the
# libvirt `default` network. Uses systemd where it runs, otherwise starts the daemons itself.
# Only starts what is not already answering; never stops anything it did not start.
#   services.sh start        one-machine mode: Redis and libvirt
#   services.sh start-test   the same, plus a throwaway PostgreSQL for the tests
set -euo pipefail

have_systemd() { [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }

redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
libvirt_up() { virsh -c qemu:///system version >/dev/null 2>&1; }

start_redis() {
  redis_up && return 0
  if have_systemd; then systemctl start redis-server; else
    redis-server --bind 127.0.0.1 --port 6379 --daemonize yes --save '' --appendonly no \
      --logfile /var/log/redis-virtfleet.log
  fi
  for _ in $(seq 50); do redis_up && return 0; sleep 0.1; done
  echo "Redis did not start" >&2; return 1
}

fix_kvm_node() {
  # Without udev (containers, no systemd) /dev/kvm stays root-only. libvirtd then finds KVM
  # "enabled when probing but not available now" and re-probes QEMU on every define (30 s).
  # Give it the owner and mode Debian's udev rule gives it.
  if [ -c /dev/kvm ] && getent group kvm >/dev/null; then
    [ "$(stat -c %G /dev/kvm)" = kvm ] || chgrp kvm /dev/kvm || true
    chmod 0660 /dev/kvm 2>/dev/null || true
  fi
}

start_libvirt() {
  fix_kvm_node
  if have_systemd; then
    libvirt_up || systemctl start virtlogd libvirtd
  else
    pgrep -x virtlogd >/dev/null || virtlogd -d
    libvirt_up || { pgrep -x libvirtd >/dev/null || libvirtd -d; }
  fi
  for _ in $(seq 100); do libvirt_up && break; sleep 0.1; done
  libvirt_up || { echo "libvirtd did not start" >&2; return 1; }
  # The first use makes libvirtd probe QEMU (tens of seconds here): do it now, not mid-build.
  timeout 300 virsh -c qemu:///system domcapabilities --virttype qemu >/dev/null 2>&1 || true
  if virsh -c qemu:///system net-info default >/dev/null 2>&1; then
    # Not `virsh | grep -q`: with pipefail, grep's early exit fails the pipe (SIGPIPE).
    [[ $(virsh -c qemu:///system net-info default) =~ Active:[[:space:]]*yes ]] \
      || virsh -c qemu:///system net-start default >/dev/null \
      || echo "warning: the libvirt 'default' network could not start" >&2
  fi
}

PG_TEST_DIR=/var/tmp/virtfleet-pg
PG_TEST_PORT=55432
PG_TEST_DB=virtfleet_test

pg_bin() {
  # The newest PostgreSQL installed from Debian's packages.
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1) || true
  [ -n "$d" ] && [ -x "$d/pg_ctl" ] || { echo "PostgreSQL is not installed" >&2; return 1; }
  echo "$d"
}

start_postgres_test() {
  # A throwaway cluster for the tests: trust auth on 127.0.0.1 only, its own port and socket
  # directory, no systemd. Created once, started when not running; never touches other clusters.
  local bin data=$PG_TEST_DIR/data as_pg=(runuser -u postgres --)
  bin=$(pg_bin)
  mkdir -p "$PG_TEST_DIR"
  chown postgres:postgres "$PG_TEST_DIR"
  chmod 0700 "$PG_TEST_DIR"
  if [ ! -s "$data/PG_VERSION" ]; then
    "${as_pg[@]}" "$bin/initdb" -D "$data" -U postgres --auth=trust --encoding=UTF8 \
      --no-instructions >"$PG_TEST_DIR/initdb.log" 2>&1 \
      || { cat "$PG_TEST_DIR/initdb.log" >&2; return 1; }
    # Only TCP from 127.0.0.1 (and the private socket below); nothing else may connect.
    printf '%s\n' 'local all all trust' 'host all all 127.0.0.1/32 trust' >"$data/pg_hba.conf"
    chown postgres:postgres "$data/pg_hba.conf"
  fi
  if ! "${as_pg[@]}" "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    "${as_pg[@]}" "$bin/pg_ctl" -D "$data" -l "$PG_TEST_DIR/server.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -p $PG_TEST_PORT -k $PG_TEST_DIR -c fsync=off" \
      start >/dev/null || { tail -n 20 "$PG_TEST_DIR/server.log" >&2; return 1; }
  fi
  local ready=0
  for _ in $(seq 100); do
    if "$bin/pg_isready" -q -h 127.0.0.1 -p "$PG_TEST_PORT"; then ready=1; break; fi
    sleep 0.1
  done
  [ $ready -eq 1 ] || { echo "PostgreSQL did not start" >&2; return 1; }
  if [ "$("${as_pg[@]}" "$bin/psql" -h "$PG_TEST_DIR" -p "$PG_TEST_PORT" -U postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname = '$PG_TEST_DB'" postgres)" != 1 ]; then
    "${as_pg[@]}" "$bin/createdb" -h "$PG_TEST_DIR" -p "$PG_TEST_PORT" -U postgres "$PG_TEST_DB"
  fi
}

case "${1:-start}" in
  start) start_redis; start_libvirt ;;
  start-test) start_redis; start_libvirt; start_postgres_test ;;
  *) echo "usage: $0 start|start-test" >&2; exit 2 ;;
esac
