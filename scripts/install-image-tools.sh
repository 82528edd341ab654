#!/usr/bin/env bash
# Install Debian's buildah, podman, runc and debootstrap for `make image` and the image test.
#
# Idempotent: exits at once when all three are there. No Docker engine is needed: buildah builds
# the Dockerfile, podman runs the result, debootstrap makes the base image from Debian's packages
# (`scripts/image-base.sh`), so nothing is pulled from a container registry.
set -euo pipefail

# runc: crun (podman's default) refuses a hybrid cgroup v1/v2 host ("cgroups in hybrid mode not
# supported"), which some VMs and CI runners are; runc runs there.
TOOLS=(buildah podman runc debootstrap)

missing=()
for tool in "${TOOLS[@]}"; do
    if ! command -v "$tool" >/dev/null 2>&1 && [[ ! -x "/usr/sbin/$tool" ]]; then
        missing+=("$tool")
    fi
done
if [[ "${#missing[@]}" -eq 0 ]]; then
    exit 0
fi

if [[ "$(id -u)" -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        echo "install-image-tools: ${missing[*]} missing and this is not root (no sudo either);" \
            "install Debian's '${missing[*]}' packages by hand" >&2
        exit 1
    fi
else
    SUDO=()
fi

# Through env: sudo would drop an exported DEBIAN_FRONTEND.
if ! "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q; then
    echo "install-image-tools: 'apt-get update' failed; 'make image' needs Debian's" \
        "'${missing[*]}' packages" >&2
    exit 1
fi
# uidmap and the vfs-friendly defaults come with the packages' recommends we do not need:
# buildah/podman run as root here, with --storage-driver vfs (no overlay module needed).
if ! "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    --no-install-recommends "${missing[@]}"; then
    echo "install-image-tools: 'apt-get install ${missing[*]}' failed" >&2
    exit 1
fi
