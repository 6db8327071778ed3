#!/usr/bin/env bash
# Creates (or reuses) the test virtualenv with the pinned third-party clients and test
# servers of tests/python/requirements.txt (fhirpy, fhirclient, PyJWT, moto's KMS server)
# and prints its path. Reinstalls only when requirements.txt changed.
#   PHIVAULT_PYENV  the virtualenv (default: <repo>/target/pyenv)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PYENV="${PHIVAULT_PYENV:-$REPO/target/pyenv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$PYENV/bin/python" ]; then
    "$PYTHON" -m venv "$PYENV" >&2
fi
STAMP="$PYENV/.phivault-requirements"
if ! cmp -s "$HERE/requirements.txt" "$STAMP" 2>/dev/null; then
    "$PYENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$HERE/requirements.txt" >&2
    cp "$HERE/requirements.txt" "$STAMP"
fi
echo "$PYENV"
