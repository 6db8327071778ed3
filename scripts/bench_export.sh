#!/usr/bin/env bash
# Issue 21, acceptance 2: Bulk Data export throughput on this machine, one release build:
#   scripts/bench_export.sh [PATIENTS] [ROUNDS]
# `synth --patients N --seed 7` imported (`phivault import --jobs 4`), then ROUNDS times
# each: a system-level `$export` kicked off by a back-end client and polled every 20 ms
# until its manifest (kick-off to manifest: every record opened under the client's grant
# and written as NDJSON sealed in the exchange area), then every file fetched (opened and
# streamed over TLS); the same with the client's export key registered (each file
# encrypted end to end, ECDH-ES + A256GCM, before it is sealed); and, the server stopped,
# `phivault export` (offline, end to end to a recipient key). Prints resources/s of each.
# Needs python3 (the test virtualenv's, for `cryptography` to make the EC keys).
set -euo pipefail
cd "$(dirname "$0")/.."
PATIENTS=${1:-1000}
ROUNDS=${2:-3}
. scripts/bench_common.sh
export XDG_CONFIG_HOME=$W/config
PY="$(tests/python/venv.sh)/bin/python"
"$BIN" synth --patients "$PATIENTS" --seed 7 --out "$W/bundles" >/dev/null
start
"$BIN" client add --data-dir "$W/data" --name loader --scope 'system/*.cruds' \
  --token-url "$ORIGIN/auth/token" --out "$W/loader.json" 2>/dev/null
"$BIN" import --client "$W/loader.json" --jobs 4 "$W/bundles" 2>"$W/import.txt"
grep -o '[0-9]* resources ([^)]*)' "$W/import.txt" | head -1 | sed 's/^/imported /'
"$PY" - "$W" <<'PY'
import json, sys
from cryptography.hazmat.primitives.asymmetric import ec
import base64
w = sys.argv[1]
k = ec.generate_private_key(ec.SECP256R1())
n = k.public_key().public_numbers()
b = lambda i: base64.urlsafe_b64encode(i.to_bytes(32, "big")).rstrip(b"=").decode()
json.dump({"kty": "EC", "crv": "P-256", "x": b(n.x), "y": b(n.y), "use": "enc", "kid": "bench"}, open(f"{w}/pub.jwk", "w"))
PY
"$BIN" client add --data-dir "$W/data" --name reader --scope 'system/*.rs' \
  --token-url "$ORIGIN/auth/token" --out "$W/reader.json" 2>/dev/null
"$BIN" client add --data-dir "$W/data" --name e2e --scope 'system/*.rs' \
  --token-url "$ORIGIN/auth/token" --out "$W/e2e.json" --export-key "$W/pub.jwk" 2>/dev/null
TOKEN_OUT=$W/reader.token "$LOAD" "$ORIGIN" "$W/data/tls/ca.pem" "$W/reader.json" - >/dev/null
TOKEN_OUT=$W/e2e.token "$LOAD" "$ORIGIN" "$W/data/tls/ca.pem" "$W/e2e.json" - >/dev/null
cat >"$W/run.py" <<'PY'
import json, ssl, sys, time, urllib.request
origin, ca, token, rounds = sys.argv[1], sys.argv[2], open(sys.argv[3]).read().strip(), int(sys.argv[4])
ctx = ssl.create_default_context(cafile=ca)
def req(url, headers=None):
    h = {"Authorization": "Bearer " + token}
    h.update(headers or {})
    return urllib.request.urlopen(urllib.request.Request(url, headers=h), context=ctx)
out = []
for _ in range(rounds):
    t0 = time.monotonic()
    r = req(origin + "/fhir/$export", {"Prefer": "respond-async", "Accept": "application/fhir+json"})
    status = r.headers["Content-Location"]
    while True:
        r = req(status)
        if r.status == 200:
            m = json.load(r)
            break
        time.sleep(0.02)
    t1 = time.monotonic()
    n = sum(f["count"] for f in m["output"])
    size = 0
    for f in m["output"]:
        size += len(req(f["url"]).read())
    t2 = time.monotonic()
    out.append((n / (t1 - t0), n / (t2 - t1), size / (t2 - t1) / 1e6, n, len(m["output"])))
    urllib.request.urlopen(urllib.request.Request(status, method="DELETE", headers={"Authorization": "Bearer " + token}), context=ctx)
out.sort()
mid = out[len(out) // 2]
print(f"{mid[3]} resources in {mid[4]} files: export {mid[0]:.0f} resources/s (median of {rounds}; all: {', '.join(f'{o[0]:.0f}' for o in out)}), download {mid[1]:.0f} resources/s ({mid[2]:.1f} MB/s)")
PY
echo "== sealed in the exchange area (NDJSON served over TLS)"
python3 "$W/run.py" "$ORIGIN" "$W/data/tls/ca.pem" "$W/reader.token" "$ROUNDS"
echo "== end to end to the client's key (ECDH-ES + A256GCM), then sealed"
python3 "$W/run.py" "$ORIGIN" "$W/data/tls/ca.pem" "$W/e2e.token" "$ROUNDS"
stop
echo "== phivault export (offline, end to end to a recipient key)"
"$BIN" export --data-dir "$W/data" --out "$W/offline" --recipient-key "$W/pub.jwk"
