#!/usr/bin/env bash
# `make image`: build the Dockerfile with buildah (no Docker engine) on the debootstrapped base
# of scripts/image-base.sh, into the local containers-storage (vfs: no overlay module needed).
#
# Warm builds: when the image's recorded build-context digest (sources, Dockerfile, base image
# id) matches, nothing is rebuilt (a buildah run with every layer cached still takes ~2 minutes
# on vfs, which copies each stage's layers); otherwise --layers reuses every unchanged step.
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

storage=(--storage-driver vfs)
context=(Dockerfile .dockerignore pyproject.toml README.md rag_service operator/embedshift_operator)
digest=$(
    cd "$here"
    {
        podman "${storage[@]}" image inspect --format '{{.Id}}' "$BASE_IMAGE"
        find "${context[@]}" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 \
            | LC_ALL=C sort -z | xargs -0 sha256sum
    } | sha256sum | cut -d' ' -f1
)
built=$(podman "${storage[@]}" image inspect --format \
    '{{index .Labels "io.embedshift.build-context"}}' "$IMAGE" 2>/dev/null || true)
if [[ "$built" == "$digest" ]]; then
    echo "build-image: $IMAGE is up to date (build context $digest)"
    exit 0
fi

extra=()
# pip in the build stage trusts what this machine trusts (an egress proxy's CA, say): the
# bundle is mounted for the RUN steps only, never copied into a layer.
if [[ -r "$HOST_CA" ]]; then
    extra+=(--volume "$HOST_CA:$HOST_CA:ro")
fi

# --isolation chroot: RUN steps need no OCI runtime or cgroups, so the build works inside
# containers and sandboxes too (crun here: "cgroups in hybrid mode not supported").
# The labels that change per build go on the command line: buildah's layer cache ignores
# ARG values, so the Dockerfile's LABEL step would keep the first build's revision and date.
created=$(date -u +%Y-%m-%dT%H:%M:%SZ)
buildah "${storage[@]}" bud \
    --isolation "${BUILDAH_ISOLATION:-chroot}" \
    --layers \
    --file "$here/Dockerfile" \
    --build-arg "BASE=$BASE_IMAGE" \
    --build-arg "VERSION=$version" \
    --build-arg "REVISION=$revision" \
    --build-arg "CREATED=$created" \
    --label "org.opencontainers.image.version=$version" \
    --label "org.opencontainers.image.revision=$revision" \
    --label "org.opencontainers.image.created=$created" \
    --label "io.embedshift.build-context=$digest" \
    "${extra[@]}" \
    --tag "$IMAGE" \
    "$here"
