#!/usr/bin/env bash
# Installs sgbox for use, and only what the chosen cloud needs:
#
#   bash install.sh                  # sgbox itself (cargo install, release build) for AWS
#   bash install.sh --cloud local    # ... plus QEMU and the tools the local cloud runs on
#   bash install.sh --deps-only ...  # only the Debian packages (.ci/setup uses this)
#
# On Debian 12/13 as root (or with sudo). The test tooling (moto, Compose, validators, the
# stand-in registry) is .ci/setup's business, not a user's.
set -euo pipefail
cd "$(dirname "$0")"

cloud=aws
build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --cloud) cloud=${2:?--cloud needs aws, gcp or local}; shift 2 ;;
    --cloud=*) cloud=${1#--cloud=}; shift ;;
    --deps-only) build=0; shift ;;
    *) echo "install.sh: unknown argument $1 (use --cloud aws|gcp|local, --deps-only)" >&2; exit 2 ;;
  esac
done
case "$cloud" in aws|gcp|local) ;; *) echo "install.sh: --cloud $cloud: use aws, gcp or local" >&2; exit 2 ;; esac

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
need() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }

# Building sgbox: libssh2 links OpenSSL.
missing=()
if [ "$build" = 1 ] || [ "$cloud" = local ]; then
  need pkg-config || missing+=(pkg-config)
  dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)
fi
# The local cloud: QEMU (matching the machine's qemu-utils: from bookworm-backports on Debian 12),
# the NoCloud seed tool, ssh for `sgbox ssh`, and debootstrap + e2fsprogs for `sgbox image build`.
qemu=()
if [ "$cloud" = local ]; then
  need qemu-img || missing+=(qemu-utils)
  need genisoimage || missing+=(genisoimage)
  need ssh || missing+=(openssh-client)
  need debootstrap || missing+=(debootstrap)
  need mkfs.ext4 || missing+=(e2fsprogs)
  need qemu-system-x86_64 || qemu+=(qemu-system-x86)
fi

if [ "${#missing[@]}" -gt 0 ] || [ "${#qemu[@]}" -gt 0 ]; then
  bookworm=0
  if . /etc/os-release && [ "${VERSION_CODENAME:-}" = bookworm ]; then bookworm=1; fi
  if [ "${#qemu[@]}" -gt 0 ] && [ "$bookworm" = 1 ] \
     && ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\n' "${mirror:-http://deb.debian.org/debian}" \
      | $SUDO tee /etc/apt/sources.list.d/backports.sources >/dev/null
  fi
  echo "install: apt-get install ${missing[*]} ${qemu[*]}" >&2
  $SUDO apt-get update -q
  if [ "${#missing[@]}" -gt 0 ]; then
    $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
  if [ "${#qemu[@]}" -gt 0 ]; then
    if [ "$bookworm" = 1 ]; then
      $SUDO apt-get install -y -q --no-install-recommends -t bookworm-backports qemu-system-x86
    else
      $SUDO apt-get install -y -q --no-install-recommends qemu-system-x86
    fi
  fi
fi

if [ "$build" = 1 ]; then
  cargo install --locked --path . --quiet
  echo "install: $(command -v sgbox || echo "$HOME/.cargo/bin/sgbox") ($(sgbox --version 2>/dev/null || echo 'add ~/.cargo/bin to PATH'))" >&2
fi
