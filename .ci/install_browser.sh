#!/usr/bin/env bash
# A Chromium for the Space's browser test (tests/test_space_browser.py).
#   Debian / Ubuntu: Debian's chromium package (apt-get), at /usr/bin/chromium; works offline from a mirror.
#   Anywhere else (Fedora, Arch, macOS, ...): Playwright's own Chromium build (`python -m playwright install
#   chromium`, a download from Playwright's servers), which the test uses when /usr/bin/chromium is absent.
# CHROMIUM_PATH names another Chromium binary; the test then uses that one.
set -euo pipefail
CHROMIUM="${CHROMIUM_PATH:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
    echo "chromium present: $("$CHROMIUM" --version 2>/dev/null | tail -n 1)"
    exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq chromium
    "$CHROMIUM" --version | tail -n 1
else
    echo "no apt-get here: installing Playwright's Chromium instead"
    python -m playwright install chromium
fi
