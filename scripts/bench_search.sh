#!/usr/bin/env bash
# Search benchmarks against the real server (release build) on 127.0.0.1; every request
# is authenticated, over TLS, and audited durably (one event per search, listing every
# resource returned). Record the figures in BENCHMARKS.md.
#   scripts/bench_search.sh [PATIENTS] [IMPORT_CONCURRENCY] [WRK_CONNECTIONS] [SECONDS]
# Needs wrk and python3 (apt-get install wrk).
#
# Three searches, each with its values rotated over many patients so no single query is
# hot: Observation?patient=X&code=Y, Patient?family=F&birthdate=D, and
# Observation?date=geA&date=ltB (a one-month window, _count=10).
set -euo pipefail
cd "$(dirname "$0")/.."
PATIENTS=${1:-1000}
CONC=${2:-16}
CONNS=${3:-32}
SECS=${4:-20}
. scripts/bench_common.sh

"$BIN" synth --patients "$PATIENTS" --seed 7 --out "$W/bundles" >/dev/null
start
"$BIN" client add --data-dir "$W/data" --name bench --scope 'system/*.cruds' --token-url "$ORIGIN/auth/token" --out "$W/creds.json" 2>/dev/null
echo "== import: $PATIENTS patients as transaction Bundles, $CONC concurrent clients (indexing every R4 search parameter)"
"$LOAD" "$ORIGIN" "$W/data/tls/ca.pem" "$W/creds.json" "$W/bundles" "$CONC" | tee "$W/import.json"
stop
DB=$(du -cb "$W/data"/phivault.db* | tail -1 | cut -f1)
JSON=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["json_bytes"])' "$W/import.json")
python3 -c "import sys; db,js=int(sys.argv[1]),int(sys.argv[2]); print(f'== size after import: database {db} B / imported JSON {js} B = {db/js:.3f}')" "$DB" "$JSON"

start
TOKEN_OUT=$W/token "$LOAD" "$ORIGIN" "$W/data/tls/ca.pem" "$W/creds.json" - >/dev/null
# Query values: patients (id, family, birth date) read through the API, codes from the
# synthetic bundles; written as wrk Lua tables.
python3 - "$ORIGIN" "$W/data/tls/ca.pem" "$W/token" "$W/bundles" "$W" <<'PY'
import json, os, ssl, sys, urllib.parse, urllib.request
origin, ca, token_file, bundles, out = sys.argv[1:6]
token = open(token_file).read().strip()
ctx = ssl.create_default_context(cafile=ca)
def get(url):
    req = urllib.request.Request(url, headers={"Authorization": "Bearer " + token})
    with urllib.request.urlopen(req, context=ctx) as r:
        return json.load(r)
patients = []
url = origin + "/fhir/Patient?_count=1000"
while url and len(patients) < 2000:
    b = get(url)
    for e in b.get("entry", []):
        r = e["resource"]
        patients.append((r["id"], r["name"][0]["family"], r["birthDate"]))
    url = next((l["url"] for l in b.get("link", []) if l["relation"] == "next"), None)
codes = {}
for f in sorted(os.listdir(bundles)):
    for e in json.load(open(os.path.join(bundles, f)))["entry"]:
        r = e["resource"]
        if r["resourceType"] == "Observation":
            c = r["code"]["coding"][0]
            codes[c["system"] + "|" + c["code"]] = True
codes = sorted(codes)
q = lambda s: urllib.parse.quote(s, safe="")
obs = [f"/fhir/Observation?patient={p[0]}&code={q(codes[i % len(codes)])}" for i, p in enumerate(patients)]
pat = [f"/fhir/Patient?family={q(p[1])}&birthdate={p[2]}" for p in patients]
months = [(y, m) for y in range(2016, 2026) for m in range(1, 13)]
def nxt(y, m):
    return (y + 1, 1) if m == 12 else (y, m + 1)
dat = [f"/fhir/Observation?date=ge{y}-{m:02d}-01&date=lt{nxt(y,m)[0]}-{nxt(y,m)[1]:02d}-01&_count=10" for y, m in months]
for name, paths in [("obs", obs), ("pat", pat), ("date", dat)]:
    with open(os.path.join(out, name + ".lua"), "w") as f:
        f.write('wrk.headers["Authorization"] = "Bearer %s"\n' % token)
        f.write("paths = {" + ",".join(json.dumps(p) for p in paths) + "}\n")
        f.write("i = 0\nrequest = function()\n  i = i + 1\n  return wrk.format(\"GET\", paths[(i % #paths) + 1])\nend\n")
print(f"== {len(patients)} patients, {len(codes)} observation codes, {len(dat)} date windows")
PY
for name in obs pat date; do
  echo "== search $name: wrk -t2 -c$CONNS -d${SECS}s"
  wrk -t2 -c"$CONNS" -d"${SECS}s" --latency -s "$W/$name.lua" "$ORIGIN"
done
stop
"$BIN" audit verify --data-dir "$W/data"
"$BIN" index check --data-dir "$W/data" | tail -1 || true
