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

source "$(dirname "${BASH_SOURCE[0]}")/lib/apt.sh"
apt_use_root install-image-tools "${missing[*]} missing" "Debian's '${missing[*]}' packages"
# uidmap and the vfs-friendly defaults come with the packages' recommends we do not need:
# buildah/podman run as root here, with --storage-driver vfs (no overlay module needed).
apt_install install-image-tools "'make image' needs Debian's '${missing[*]}' packages" \
    "${missing[@]}"
