#!/usr/bin/env bash
# Install Debian's `chromium` package for the dashboard page's browser test
# (tests/rag_service/test_dashboard_page.py runs it headless: --dump-dom and --screenshot).
#
# Idempotent: exits at once when a chromium binary is already on PATH. Root (or sudo) only:
# anyone else gets one clear line saying what to install.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    exit 0
fi

if [[ "$(id -u)" -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        echo "install-chromium: 'chromium' is missing and this is not root (no sudo either);" \
            "install Debian's 'chromium' package by hand" >&2
        exit 1
    fi
else
    SUDO=()
fi

# Through env: sudo would drop an exported DEBIAN_FRONTEND.
if ! "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q; then
    echo "install-chromium: 'apt-get update' failed; the tests need Debian's 'chromium' package" >&2
    exit 1
fi
# fonts-dejavu-core: without any font the screenshot is boxes.
if ! "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    --no-install-recommends chromium fonts-dejavu-core; then
    echo "install-chromium: 'apt-get install chromium' failed; the tests need Debian's" \
        "'chromium' package" >&2
    exit 1
fi

if ! command -v chromium >/dev/null 2>&1; then
    echo "install-chromium: the 'chromium' package installed but 'chromium' is not on PATH" >&2
    exit 1
fi
chromium --version
