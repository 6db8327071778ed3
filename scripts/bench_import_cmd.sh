#!/usr/bin/env bash
# `phivault import` (the command) of `synth --patients N --seed 1` into a fresh release-built
# server with --jobs 1, 2 and 4, ROUNDS rounds. Each run is followed by one of the same
# bundles without the synth identifiers and `ifNoneExist` (what synth wrote before issue 16:
# plain POSTs), to show what the conditional creates cost. Prints seconds, patients/s,
# resources/s and the server's CPU time per run.
#   scripts/bench_import_cmd.sh [PATIENTS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
PATIENTS=${1:-1000}
ROUNDS=${2:-2}
. scripts/bench_common.sh
"$BIN" synth --patients "$PATIENTS" --seed 1 --out "$W/bundles" >/dev/null
python3 - "$W/bundles" "$W/plain" <<'PY'
import json, os, sys
src, dst = sys.argv[1:3]
os.makedirs(dst)
for f in sorted(os.listdir(src)):
    b = json.load(open(os.path.join(src, f)))
    for e in b["entry"]:
        e["request"].pop("ifNoneExist", None)
        r = e["resource"]
        ids = [i for i in r.get("identifier", []) if i.get("system") != "urn:phivault:synth"]
        if ids:
            r["identifier"] = ids
        else:
            r.pop("identifier", None)
    json.dump(b, open(os.path.join(dst, f), "w"), separators=(",", ":"), sort_keys=True)
PY

one() { # DIR JOBS -> "seconds patients/s resources/s server-cpu-ms"
  rm -rf "$W/data" "$W/creds.json" "$W/resume.json"
  start
  "$BIN" client add --data-dir "$W/data" --name bench --scope 'system/*.cruds' --token-url "$ORIGIN/auth/token" --out "$W/creds.json" 2>/dev/null
  local c0 c1 t0 t1
  c0=$(awk '{print $14+$15}' "/proc/$SPID/stat")
  t0=$(date +%s%N)
  "$BIN" import --client "$W/creds.json" --jobs "$2" --resume "$W/resume.json" "$1" 2>"$W/summary"
  t1=$(date +%s%N)
  c1=$(awk '{print $14+$15}' "/proc/$SPID/stat")
  stop
  # wall time of the whole command (start, token, import, summary)
  python3 - "$W/summary" "$PATIENTS" "$(((t1 - t0) / 1000000))" "$(((c1 - c0) * 1000 / $(getconf CLK_TCK)))" <<'PY'
import re, sys
s = open(sys.argv[1]).read()
n = int(re.search(r"(\d+) resources \(", s)[1])
secs = int(sys.argv[3]) / 1000
print(f"{secs:.2f} {int(sys.argv[2]) / secs:.0f} {n / secs:.0f} {sys.argv[4]}")
PY
}

echo "== phivault import of $PATIENTS patients (synth --seed 1), $ROUNDS rounds"
printf '%-6s %-5s %-30s %s\n' round jobs "ifNoneExist: s p/s res/s cpu-ms" "plain POST: s p/s res/s cpu-ms"
for r in $(seq "$ROUNDS"); do
  for j in 1 2 4; do
    a=$(one "$W/bundles" "$j")
    b=$(one "$W/plain" "$j")
    printf '%-6s %-5s %-30s %s\n' "$r" "$j" "$a" "$b"
  done
done
