#!/usr/bin/env bash
# The Dockerfile's BASE for `make image` on a machine that cannot pull from a registry: Debian
# bookworm (debootstrap, Debian's own mirror) with python3.11, venv and pip, imported into the
# local containers-storage as $BASE_IMAGE.
#
# Cached: the imported image is the cache; when it exists, this exits at once. Remove it
# (`podman --storage-driver vfs rmi $BASE_IMAGE`) to rebuild it from Debian's packages.
set -euo pipefail

BASE_IMAGE=${BASE_IMAGE:-localhost/embedshift-base:bookworm-python3.11}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
STORAGE=(--storage-driver vfs)

if podman "${STORAGE[@]}" image exists "$BASE_IMAGE"; then
    exit 0
fi
if [[ "$(id -u)" -ne 0 ]]; then
    echo "image-base: debootstrap needs root to build $BASE_IMAGE" >&2
    exit 1
fi

root=$(mktemp -d /var/tmp/embedshift-base.XXXXXX)
trap 'rm -rf "$root"' EXIT

# minbase: dpkg, apt and essentials only; python3 is bookworm's 3.11. ca-certificates: pip
# reaches PyPI over TLS.
debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$root/rootfs" "$MIRROR"

# No package caches or lists in the base: they would only make every layer above larger.
rm -rf "$root"/rootfs/var/cache/apt/archives/*.deb "$root"/rootfs/var/lib/apt/lists/* \
    "$root"/rootfs/var/log/* "$root"/rootfs/root/.cache

tar -C "$root/rootfs" --numeric-owner -c . \
    | podman "${STORAGE[@]}" import \
        --change 'CMD ["python3"]' \
        --change 'ENV LANG=C.UTF-8' \
        - "$BASE_IMAGE"
echo "image-base: built $BASE_IMAGE"
