#!/usr/bin/env bash
# Builds the local Debian base image the Podman tests use instead of a registry image:
# `debootstrap --variant=minbase` into a temporary directory, imported with `podman import`.
# Idempotent: does nothing when the image already exists. Honours CONTAINERS_CONF (defaults to
# the test configuration next to this script).
#
# Usage: tests/podman/make-base-image.sh [IMAGE]   (default localhost/paude-test-base:bookworm)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
image="${1:-localhost/paude-test-base:bookworm}"
suite="${PAUDE_TEST_SUITE:-bookworm}"
mirror="${PAUDE_TEST_MIRROR:-http://deb.debian.org/debian}"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/containers.conf}"
# debootstrap lives in /usr/sbin, which a non-login PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

for tool in podman debootstrap tar; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "make-base-image: $tool is missing; install it with: apt-get install -y podman runc debootstrap" >&2
    exit 1
  fi
done

if podman image exists "$image"; then
  echo "make-base-image: $image already exists"
  exit 0
fi

# Several test processes may call this at once: one builds, the others wait for it.
lock="/tmp/paude-make-base-image.lock"
exec 9>"$lock"
flock 9
if podman image exists "$image"; then
  echo "make-base-image: $image already exists"
  exit 0
fi

root="$(mktemp -d /tmp/paude-base.XXXXXX)"
trap 'rm -rf "$root"' EXIT
echo "make-base-image: debootstrap --variant=minbase $suite (about 30 s)"
if ! debootstrap --variant=minbase "$suite" "$root" "$mirror" >"$root.log" 2>&1; then
  tail -n 20 "$root.log" >&2
  echo "make-base-image: debootstrap failed; the full log is $root.log" >&2
  exit 1
fi
rm -f "$root.log"
tar -C "$root" -c . | podman import --quiet - "$image" >/dev/null
echo "make-base-image: imported $image"
