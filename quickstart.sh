#!/usr/bin/env bash
# virtfleet on one Debian machine, as root, with or without systemd.
#   ./quickstart.sh up     install what is missing, start the services, run virtfleet
#   ./quickstart.sh test   install what is missing, start the services, run the tests
set -euo pipefail
cd "$(dirname "$0")"
here=$(pwd)
cmd=${1:-up}
shift || true

log() { printf '\n== %s\n' "$*"; }

apt_packages=(
  python3 python3-venv python3-dev gcc pkg-config libvirt-dev
  libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils dnsmasq-base iptables
  redis-server
  busybox-static syslinux syslinux-common mtools fdisk dosfstools cpio kmod xz-utils zstd
)
test_packages=(chromium chromium-driver postgresql debootstrap e2fsprogs)

install_system() {
  local want=("${apt_packages[@]}")
  [ "$cmd" = test ] && want+=("${test_packages[@]}")
  local missing=()
  for p in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

install_python() {
  local py=python3
  if [ ! -x .venv/bin/python ]; then
    log "creating the virtualenv .venv"
    "$py" -m venv .venv
  fi
  local stamp=.venv/.virtfleet-installed
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    log "installing virtfleet and its Python dependencies"
    .venv/bin/pip install -q --upgrade pip >/dev/null
    .venv/bin/pip install -q -e ".[test]"
    touch "$stamp"
  fi
}

install_system
install_python
export PATH="$here/.venv/bin:$PATH"

case "$cmd" in
  up)
    scripts/services.sh start
    exec .venv/bin/virtfleet up "$@"
    ;;
  test)
    scripts/services.sh start-test
    export VIRTFLEET_TEST_PG_URL=postgresql+psycopg://postgres@127.0.0.1:55432/virtfleet_test
    set +e
    .venv/bin/ruff check .
    lint=$?
    .venv/bin/python -m pytest -ra "$@"
    rc=$?
    set -e
    if [ $rc -eq 5 ]; then echo "pytest ran no tests: that is a failure" >&2; exit 1; fi
    [ $lint -ne 0 ] && [ $rc -eq 0 ] && rc=$lint
    exit $rc
    ;;
  *)
    echo "usage: $0 up|test [args]" >&2
    exit 2
    ;;
esac
