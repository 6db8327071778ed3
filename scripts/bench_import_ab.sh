#!/usr/bin/env bash
# Import throughput of this tree against another build, in interleaved pairs (the VM's
# speed drifts by ±30 % within minutes, so only runs minutes apart compare):
#   scripts/bench_import_ab.sh OTHER_TARGET_DIR [PATIENTS] [IMPORT_CONCURRENCY] [PAIRS]
# OTHER_TARGET_DIR holds a release build of the other commit (release/phivault and
# release/examples/load_import), e.g. 059babf, the store before search:
#   git worktree add /work/base 059babf
#   (cd /work/base && CARGO_TARGET_DIR=/work/target-base cargo build --release -p phivault --example load_import && CARGO_TARGET_DIR=/work/target-base cargo build --release -p phivault)
# Each run: a fresh data directory, `phivault serve`, a client, then every bundle of
# `synth --patients N --seed 7` as a transaction with N concurrent importers (the import
# step of scripts/bench.sh), reporting resources/s and the server's CPU time.
set -euo pipefail
cd "$(dirname "$0")/.."
OTHER=${1:?usage: bench_import_ab.sh OTHER_TARGET_DIR [PATIENTS] [CONC] [PAIRS]}
PATIENTS=${2:-1000}
CONC=${3:-16}
PAIRS=${4:-3}
. scripts/bench_common.sh
HEAD_BIN=$BIN
HEAD_LOAD=$LOAD
"$BIN" synth --patients "$PATIENTS" --seed 7 --out "$W/bundles" >/dev/null

one() { # BIN LOAD -> "resources/s cpu_ms"
  BIN=$1
  rm -rf "$W/data" "$W/creds.json" # (older builds refuse to overwrite credentials)
  start
  "$BIN" client add --data-dir "$W/data" --name bench --scope 'system/*.cruds' --token-url "$ORIGIN/auth/token" --out "$W/creds.json" 2>/dev/null
  local c0 c1 rps
  c0=$(awk '{print $14+$15}' "/proc/$SPID/stat")
  rps=$("$2" "$ORIGIN" "$W/data/tls/ca.pem" "$W/creds.json" "$W/bundles" "$CONC" |
    python3 -c 'import json,sys; print(round(json.load(sys.stdin)["resources_per_s"]))')
  c1=$(awk '{print $14+$15}' "/proc/$SPID/stat")
  stop
  echo "$rps $(((c1 - c0) * 1000 / $(getconf CLK_TCK)))"
}

echo "== import of $PATIENTS patients, $CONC importers: this tree vs $OTHER, $PAIRS interleaved pairs"
printf '%-6s %-28s %-28s %s\n' pair "this tree res/s (cpu ms)" "other res/s (cpu ms)" ratio
for i in $(seq "$PAIRS"); do
  read -r a ac < <(one "$HEAD_BIN" "$HEAD_LOAD")
  read -r b bc < <(one "$OTHER/release/phivault" "$OTHER/release/examples/load_import")
  printf '%-6s %-28s %-28s %s\n' "$i" "$a ($ac)" "$b ($bc)" "$(python3 -c "print(f'{$a/$b:.2f}')")"
done
