#!/usr/bin/env bash
# Follows the README's "First run" section literally on a fresh clone: extracts its
# marked code blocks (<!-- first-run: server|client|python -->), starts the server block
# in the background exactly as written (cargo run --release … serve on 127.0.0.1:8443),
# runs the client block and the Python snippet from the clone's directory as a newcomer
# would, and checks that they reach a first search result. Stops the server it started.
#
#   CARGO_TARGET_DIR  shared with the other tests so registry crates are not built twice
#                     (cargo still builds the clone's own crates from the clone's sources)
#   PHIVAULT_PYENV    the virtualenv of tests/python (PyJWT, requests)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PYENV="${PHIVAULT_PYENV:-$REPO/target/pyenv}"

if (exec 3<>/dev/tcp/127.0.0.1/8443) 2>/dev/null; then
    echo "readme: port 8443 is in use; the README's first run serves there" >&2
    exit 1
fi

WORK="$(mktemp -d)"
SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ]; then
        kill -TERM -- "-$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

git clone --quiet "$REPO" "$WORK/phivault"
cd "$WORK/phivault"
for block in server client python; do
    python3 "$HERE/extract.py" README.md "$block" >"$WORK/$block.txt"
done

echo "readme: starting the server block (first build of the release binary may take minutes)"
setsid bash -euo pipefail "$WORK/server.txt" >"$WORK/server.out" 2>"$WORK/server.err" &
SERVER_PID=$!
for _ in $(seq 1 2400); do
    grep -q "^listening on " "$WORK/server.out" 2>/dev/null && break
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "readme: the server block exited" >&2
        tail -30 "$WORK/server.err" >&2
        exit 1
    fi
    sleep 0.5
done
grep -q "^listening on https://127.0.0.1:8443" "$WORK/server.out" || {
    echo "readme: the server did not say it listens on https://127.0.0.1:8443" >&2
    tail -30 "$WORK/server.err" >&2
    exit 1
}
grep -q "NEW, EMPTY data directory" "$WORK/server.err" || {
    echo "readme: the first run did not announce the new data directory" >&2
    exit 1
}

echo "readme: running the client block"
bash -euo pipefail "$WORK/client.txt" >"$WORK/client.out" 2>"$WORK/client.err" || {
    echo "readme: the client block failed" >&2
    tail -30 "$WORK/client.err" >&2
    exit 1
}
python3 - "$WORK/client.out" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
bundle = json.loads(text[text.index('{"resourceType":"Bundle"'):].split("\n")[0])
patients = [e["resource"] for e in bundle.get("entry", []) if e["resource"]["resourceType"] == "Patient"]
assert bundle["type"] == "searchset" and patients, f"no Patient in the first search: {text[:500]}"
print(f"readme: the curl search found {len(patients)} patient(s), e.g. Patient/{patients[0]['id']}")
PY

echo "readme: running the Python snippet"
"$PYENV/bin/python" "$WORK/python.txt" >"$WORK/python.out" 2>"$WORK/python.err" || {
    echo "readme: the Python snippet failed" >&2
    tail -30 "$WORK/python.err" >&2
    exit 1
}
lines=$(grep -c "^Patient/" "$WORK/python.out" || true)
[ "$lines" -ge 1 ] || {
    echo "readme: the Python snippet printed no patient" >&2
    cat "$WORK/python.out" >&2
    exit 1
}
echo "readme: the Python snippet found $lines patient(s)"
echo "readme: first run OK"
