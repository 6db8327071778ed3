#!/usr/bin/env bash
# Runs the third-party Python client tests (fhirpy and the SMART on FHIR fhirclient, with
# PyJWT for SMART Backend Services) against the real phivault binary.
#
#   PHIVAULT_BIN    the binary to test (default: <repo>/target/release/phivault); must exist.
#   PHIVAULT_PYENV  the virtualenv to create or reuse (default: <repo>/target/pyenv).
#   Extra arguments are passed to pytest.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"

BIN="${PHIVAULT_BIN:-$REPO/target/release/phivault}"
case "$BIN" in /*) ;; *) BIN="$PWD/$BIN" ;; esac
if [ ! -x "$BIN" ]; then
    echo "run.sh: phivault binary not found or not executable: $BIN" >&2
    echo "run.sh: build it with 'cargo build --release -p phivault' or set PHIVAULT_BIN" >&2
    exit 2
fi
export PHIVAULT_BIN="$BIN"

PYENV="$("$HERE/venv.sh")"

cd "$HERE"
export PYTHONDONTWRITEBYTECODE=1
set +e
"$PYENV/bin/python" -m pytest -q -p no:cacheprovider "$HERE" "$@"
rc=$?
set -e
exit $rc
