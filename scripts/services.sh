#!/usr/bin/env bash
# Start (or check) what virtfleet needs on this machine: Redis, virtlogd, libvirtd and the
# libvirt `default` network. Uses systemd where it runs, otherwise starts the daemons itself.
# Only starts what is not already answering; never stops anything it did not start.
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
    virsh -c qemu:///system net-info default | grep -q 'Active:.*yes' \
      || virsh -c qemu:///system net-start default >/dev/null \
      || echo "warning: the libvirt 'default' network could not start" >&2
  fi
}

case "${1:-start}" in
  start) start_redis; start_libvirt ;;
  *) echo "usage: $0 start" >&2; exit 2 ;;
esac
