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

source "$(dirname "${BASH_SOURCE[0]}")/lib/apt.sh"
apt_use_root install-chromium "'chromium' is missing" "Debian's 'chromium' package"
# fonts-dejavu-core: without any font the screenshot is boxes.
apt_install install-chromium "the tests need Debian's 'chromium' package" \
    chromium fonts-dejavu-core

if ! command -v chromium >/dev/null 2>&1; then
    echo "install-chromium: the 'chromium' package installed but 'chromium' is not on PATH" >&2
    exit 1
fi
chromium --version
