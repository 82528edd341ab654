#!/usr/bin/env bash
# Install Debian's `prometheus` package (the server and promtool) and `prometheus-alertmanager`
# (amtool, which checks the example Alertmanager route) for the test suite.
#
# Idempotent: exits at once when prometheus, promtool and amtool are on PATH, or Debian's are
# installed. The tests start their own
# Prometheus on a free loopback port, so the packaged daemon must not start: machines without
# systemd (containers, CI) would fail the maintainer scripts, and a running daemon would hold
# port 9090 and the package's TSDB for nothing.
set -euo pipefail

BINARY=/usr/bin/prometheus
AMTOOL=/usr/bin/amtool
POLICY=/usr/sbin/policy-rc.d

# Tools already on PATH win (the tests look there first): a Prometheus you installed yourself,
# e.g. `PATH=/opt/prometheus:/opt/alertmanager:$PATH make test`, is used and apt is not run.
if command -v prometheus >/dev/null && command -v promtool >/dev/null \
    && command -v amtool >/dev/null; then
    exit 0
fi
if [[ -x "$BINARY" && -x "$AMTOOL" ]]; then
    exit 0
fi

source "$(dirname "${BASH_SOURCE[0]}")/lib/apt.sh"
apt_use_root install-prometheus "$BINARY is missing" "Debian's 'prometheus' package"

# invoke-rc.d asks policy-rc.d before starting any service; 101 means "action forbidden".
# Only a policy we wrote is removed again: an existing one (Docker images ship one) is the
# machine's own.
created_policy=0
cleanup() {
    if [[ "$created_policy" -eq 1 ]]; then
        "${SUDO[@]}" rm -f "$POLICY"
    fi
}
trap cleanup EXIT

if [[ ! -e "$POLICY" ]]; then
    created_policy=1
    printf '#!/bin/sh\n# Written by embedshift scripts/install-prometheus.sh for one install.\nexit 101\n' \
        | "${SUDO[@]}" tee "$POLICY" >/dev/null
    "${SUDO[@]}" chmod 0755 "$POLICY"
fi

apt_install install-prometheus \
    "the tests need Debian's 'prometheus' and 'prometheus-alertmanager' packages" \
    prometheus prometheus-alertmanager

for installed in "$BINARY" "$AMTOOL"; do
    if [[ ! -x "$installed" ]]; then
        echo "install-prometheus: the packages installed but $installed is missing" >&2
        exit 1
    fi
done
"$BINARY" --version
