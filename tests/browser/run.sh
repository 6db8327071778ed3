#!/usr/bin/env bash
# Runs the headless-Chromium sign-in test (Playwright) against the real phivault binary.
# Installs what it needs: Debian's chromium (apt) when /usr/bin/chromium is missing, and
# the pinned playwright-core from package-lock.json (npm ci; no browser download).
#
#   PHIVAULT_BIN   the binary to test (default: <repo>/target/release/phivault); must exist.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
BIN="${PHIVAULT_BIN:-$REPO/target/release/phivault}"
case "$BIN" in /*) ;; *) BIN="$PWD/$BIN" ;; esac
if [ ! -x "$BIN" ]; then
    echo "run.sh: phivault binary not found or not executable: $BIN" >&2
    exit 2
fi

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$CHROMIUM" ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

cd "$HERE"
if ! cmp -s package-lock.json node_modules/.package-lock.json 2>/dev/null; then
    npm ci --no-audit --no-fund --silent
fi
PHIVAULT_BIN="$BIN" CHROMIUM="$CHROMIUM" node login.test.mjs
