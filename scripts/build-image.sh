#!/usr/bin/env bash
# `make image`: build the Dockerfile with buildah (no Docker engine) on the debootstrapped base
# of scripts/image-base.sh, into the local containers-storage (vfs: no overlay module needed).
#
# --layers: every step is cached, so a second build with unchanged sources takes seconds.
set -euo pipefail

IMAGE=${IMAGE:-localhost/embedshift:latest}
BASE_IMAGE=${BASE_IMAGE:-localhost/embedshift-base:bookworm-python3.11}
HOST_CA=/etc/ssl/certs/ca-certificates.crt

here=$(cd "$(dirname "$0")/.." && pwd)
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$here/pyproject.toml")
revision=$(git -C "$here" rev-parse HEAD 2>/dev/null || echo unknown)
if [[ -n "$(git -C "$here" status --porcelain 2>/dev/null)" ]]; then
    revision="$revision-dirty"
fi

extra=()
# pip in the build stage trusts what this machine trusts (an egress proxy's CA, say): the
# bundle is mounted for the RUN steps only, never copied into a layer.
if [[ -r "$HOST_CA" ]]; then
    extra+=(--volume "$HOST_CA:$HOST_CA:ro")
fi

# --isolation chroot: RUN steps need no OCI runtime or cgroups, so the build works inside
# containers and sandboxes too (crun here: "cgroups in hybrid mode not supported").
buildah --storage-driver vfs bud \
    --isolation "${BUILDAH_ISOLATION:-chroot}" \
    --layers \
    --file "$here/Dockerfile" \
    --build-arg "BASE=$BASE_IMAGE" \
    --build-arg "VERSION=$version" \
    --build-arg "REVISION=$revision" \
    --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    "${extra[@]}" \
    --tag "$IMAGE" \
    "$here"
