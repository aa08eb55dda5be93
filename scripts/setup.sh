#!/usr/bin/env bash
# Install what dynamem needs on a Debian 12 host (as root), then run one job:
#   bash scripts/setup.sh demo   build the embedded guest and run the quick comparison
#   bash scripts/setup.sh test   lint, type-check and run every test (real guests included)
#   bash scripts/setup.sh install   only install (scripts/nightly.sh uses it)
set -euo pipefail
cd "$(dirname "$0")/.."

job="${1:-}"
case "$job" in demo|test|install) ;; *) echo "usage: $0 demo|test|install" >&2; exit 2 ;; esac

# Host tools: QEMU, and what the guest build uses (apt-get download, dpkg-deb, depmod,
# readelf, cpio, zstd; gcc and libc6-dev compile the static in-guest sampler).
# git: the nightly's timeline repository. Without QEMU's recommended extras (its GUI,
# GStreamer and codecs, OVMF, block-extra): the guests boot with -kernel on SeaBIOS and
# use iPXE's virtio ROM, both hard dependencies of qemu-system-x86.
# Cloud images: debootstrap builds debian-cloud; sfdisk (fdisk) and e2fsprogs (mke2fs,
# debugfs) partition, fill and read image disks without mounting them.
apt_packages=(qemu-system-x86 qemu-utils kmod binutils cpio zstd gcc libc6-dev python3 python3-venv ca-certificates git
    debootstrap fdisk e2fsprogs)
# npm fetches the asv page's scripts (below); Debian's package only where none is installed.
command -v npm >/dev/null || apt_packages+=(npm)
# chromium: only the test that renders the asv page (with its recommends: fonts).
# openssh-server and -client: the cluster tests start their own sshd on loopback ports.
test_packages=()
if [ "$job" = test ]; then test_packages+=(chromium openssh-server openssh-client); fi

missing_of() {
    local pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || echo "$pkg"
    done
}
mapfile -t missing < <(missing_of "${apt_packages[@]}")
mapfile -t missing_test < <(missing_of "${test_packages[@]}")
if ((${#missing[@]} + ${#missing_test[@]})); then
    echo "setup: installing ${missing[*]} ${missing_test[*]}" >&2
    apt-get update -q
    if ((${#missing[@]})); then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
    if ((${#missing_test[@]})); then
        # Installing openssh-server must not start the system's own sshd: the tests run
        # theirs. policy-rc.d (only if none exists) tells the package scripts not to.
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            trap 'rm -f /usr/sbin/policy-rc.d' EXIT
            printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
            chmod +x /usr/sbin/policy-rc.d
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing_test[@]}"
        if trap -p EXIT | grep -q policy-rc.d; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
    fi
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
export PATH="$PWD/.venv/bin:$PATH"

# The scripts asv's published page loads (jQuery, flot, bootstrap), pinned, from the npm
# registry into the cache, so the HTML works offline; nothing third-party is committed.
python -c 'import sys; from dynamem.nightly import fetch_vendor, vendor_dir
missing = fetch_vendor(vendor_dir())
sys.exit(f"setup: npm could not fetch {missing}" if missing else 0)'

case "$job" in
demo)
    dynamem guest build
    dynamem doctor
    dynamem run --suite quick
    ;;
test)
    ruff check src tests bench analysis
    ruff format --check src tests bench analysis
    mypy
    pytest
    ;;
install) ;;
esac
