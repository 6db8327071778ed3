#!/usr/bin/env bash
# Issue 18's A/B: this tree against another build (the one before), each on its own data
# directory (their stores differ in form: MACs, heads and the signed state), in
# interleaved pairs because the VM's speed drifts within minutes:
#   scripts/bench_integrity_ab.sh OTHER_PHIVAULT_BINARY [PATIENTS] [WRK_CONNECTIONS] [SECONDS] [PAIRS]
# Per build: `synth --patients N --seed 7` imported once (16 importers, timed) and the
# query lists written from that build's own ids. Then each pair, for each build:
#   - start-up: `serve` from spawn to its `listening on` line, on its 1,000-patient store;
#   - read: `GET /fhir/Observation/{id}` over every observation id, wrk, and the three
#     searches of scripts/bench_search.sh (obs: patient + code, pat: family + birth date,
#     date: one-month windows across patients), with the server's CPU time per request;
#   - import: the same bundles into a fresh data directory (16 importers), timed.
# Needs wrk and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
OTHER=${1:?usage: bench_integrity_ab.sh OTHER_PHIVAULT_BINARY [PATIENTS] [CONNS] [SECONDS] [PAIRS]}
PATIENTS=${2:-1000}
CONNS=${3:-32}
SECS=${4:-10}
PAIRS=${5:-3}
WARMUP=${WARMUP:-3}
. scripts/bench_common.sh
HEAD_BIN=$BIN
export XDG_CONFIG_HOME=$W/config
"$HEAD_BIN" synth --patients "$PATIENTS" --seed 7 --out "$W/bundles" >/dev/null

# start BIN on DIR; sets SPID, ORIGIN and STARTUP_MS (spawn to its `listening on` line)
serve_on() {
  local bin=$1 dir=$2
  : >"$W/out"
  local t0 t1
  t0=$(date +%s%N)
  "$bin" serve --data-dir "$dir" --listen 127.0.0.1:0 >"$W/out" 2>>"$W/err" &
  SPID=$!
  for _ in $(seq 4000); do grep -q listening "$W/out" 2>/dev/null && break; sleep 0.002; done
  t1=$(date +%s%N)
  ORIGIN=$(sed -n 's/^listening on //p' "$W/out")
  STARTUP_MS=$(( (t1 - t0) / 1000000 ))
}

# import the bundles into a fresh directory with BIN; prints seconds and resources/s
import_into() {
  local bin=$1 dir=$2
  serve_on "$bin" "$dir"
  "$bin" client add --data-dir "$dir" --name bench --scope 'system/*.cruds' \
    --token-url "$ORIGIN/auth/token" --out "$dir.creds.json" 2>/dev/null
  local t0 t1 n
  t0=$(date +%s%N)
  "$LOAD" "$ORIGIN" "$dir/tls/ca.pem" "$dir.creds.json" "$W/bundles" 16 >/dev/null
  t1=$(date +%s%N)
  n=$(python3 -c "
import json,os,sys
d=sys.argv[1]; print(sum(len(json.load(open(os.path.join(d,f)))['entry']) for f in os.listdir(d)))" "$W/bundles")
  stop
  python3 -c "s=($t1-$t0)/1e9; print(f'{s:.2f} s, {$n/s:.0f} resources/s')"
}

for b in head other; do
  bin=$HEAD_BIN; [ $b = other ] && bin=$OTHER
  echo "== $b: first import: $(import_into "$bin" "$W/$b")"
  serve_on "$bin" "$W/$b"
  TOKEN_OUT=$W/$b.token "$LOAD" "$ORIGIN" "$W/$b/tls/ca.pem" "$W/$b.creds.json" - >/dev/null
  mkdir -p "$W/q-$b"
  python3 scripts/bench_search_queries.py "$ORIGIN" "$W/$b/tls/ca.pem" "$W/$b.token" "$W/bundles" "$W/q-$b" >/dev/null
  python3 - "$ORIGIN" "$W/$b/tls/ca.pem" "$W/$b.token" "$W/q-$b" <<'PY'
import json, os, ssl, sys, urllib.request
origin, ca, tok, out = sys.argv[1:5]
token = open(tok).read().strip()
ctx = ssl.create_default_context(cafile=ca)
ids, url = [], origin + "/fhir/Observation?_count=1000"
while url and len(ids) < 5000:
    req = urllib.request.Request(url, headers={"Authorization": "Bearer " + token})
    b = json.load(urllib.request.urlopen(req, context=ctx))
    ids += [e["resource"]["id"] for e in b.get("entry", [])]
    url = next((l["url"] for l in b.get("link", []) if l["relation"] == "next"), None)
with open(os.path.join(out, "get.paths.lua"), "w") as f:
    f.write("paths = {" + ",".join(json.dumps("/fhir/Observation/" + i) for i in ids) + "}\n")
    f.write("i = 0\nrequest = function()\n  i = i + 1\n  return wrk.format(\"GET\", paths[(i % #paths) + 1])\nend\n")
PY
  stop
done

run() {
  local bin=$1 b=$2
  serve_on "$bin" "$W/$b"
  echo "$b start-up: $STARTUP_MS ms"
  TOKEN_OUT=$W/$b.token "$LOAD" "$ORIGIN" "$W/$b/tls/ca.pem" "$W/$b.creds.json" - >/dev/null
  for name in get obs pat date; do
    { printf 'wrk.headers["Authorization"] = "Bearer %s"\n' "$(cat "$W/$b.token")"; cat "$W/q-$b/$name.paths.lua"; } >"$W/$b.$name.lua"
  done
  wrk -t2 -c"$CONNS" -d"${WARMUP}s" -s "$W/$b.get.lua" "$ORIGIN" >/dev/null
  for name in get obs pat date; do
    local out c0 c1 reqs
    c0=$(awk '{print $14+$15}' "/proc/$SPID/stat")
    out=$(wrk -t2 -c"$CONNS" -d"${SECS}s" --latency -s "$W/$b.$name.lua" "$ORIGIN")
    c1=$(awk '{print $14+$15}' "/proc/$SPID/stat")
    reqs=$(grep -Eo '[0-9]+ requests in' <<<"$out" | grep -Eo '^[0-9]+')
    echo "$b $name: $(grep -E 'Requests/sec' <<<"$out" | tr -s ' '), server CPU $(python3 -c "print(round(($c1-$c0)*1e6/100/$reqs))") us/request, non-2xx $(grep -Eo 'Non-2xx or 3xx responses: [0-9]+' <<<"$out" | grep -Eo '[0-9]+$' || echo 0)"
  done
  stop
  rm -rf "$W/imp-$b" "$W/imp-$b.creds.json"
  echo "$b import: $(import_into "$bin" "$W/imp-$b")"
}
for p in $(seq "$PAIRS"); do
  echo "== pair $p"
  run "$OTHER" other
  run "$HEAD_BIN" head
done
