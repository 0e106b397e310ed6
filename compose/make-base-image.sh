#!/bin/sh
# Build the image's base locally, for a site without an image registry: a minimal Debian root file system
# made by debootstrap from Debian's packages (python3, venv, iproute2 for tc), imported into Docker.
#   Usage: compose/make-base-image.sh [TAG]          (root; needs debootstrap and a reachable Debian mirror)
#   SUITE (default bookworm), MIRROR (default http://deb.debian.org/debian)
# Does nothing when TAG exists already. Build the image on it with --build-arg BASE_IMAGE=TAG.
set -eu

TAG="${1:-splitllm-base:bookworm}"
SUITE="${SUITE:-bookworm}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"

if docker image inspect "$TAG" >/dev/null 2>&1; then
    echo "make-base-image: $TAG exists" >&2
    exit 0
fi
command -v debootstrap >/dev/null || { echo "make-base-image: needs debootstrap (apt-get install -y debootstrap)" >&2; exit 1; }
ROOTFS=$(mktemp -d /tmp/splitllm-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT
echo "make-base-image: debootstrap $SUITE into $ROOTFS (a few minutes)" >&2
debootstrap --variant=minbase --include=python3,python3-venv,iproute2,ca-certificates \
    "$SUITE" "$ROOTFS" "$MIRROR" >&2
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/tmp/*
tar -C "$ROOTFS" --numeric-owner -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/sh"]' - "$TAG" >&2
echo "make-base-image: $TAG made" >&2
