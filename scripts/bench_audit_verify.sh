#!/usr/bin/env bash
# How long `phivault audit verify` takes over a large audit log (issue 5: 10 million events
# in under a minute): initialise a data directory, append EVENTS realistic events through
# the real store (examples/audit_fill.rs: chain, Merkle frontier, signed heads and
# checkpoints), then time the offline verification, and once more with every checkpoint
# exported to a witness file.
#   scripts/bench_audit_verify.sh [EVENTS]
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS=${1:-10000000}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release -q -p phivault --example audit_fill
cargo build --release -q -p phivault
BIN=$CARGO_TARGET_DIR/release/phivault
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
"$BIN" init --data-dir "$W/data" >/dev/null
echo "fill: $("$CARGO_TARGET_DIR/release/examples/audit_fill" "$W/data" "$EVENTS")"
echo "database: $(du -h "$W/data/phivault.db" | cut -f1)"
"$BIN" audit checkpoints --data-dir "$W/data" >"$W/witness"
echo "checkpoints: $(wc -l <"$W/witness")"
ms() { echo $(( $(date +%s%N) / 1000000 )); }
for run in 1 2; do
  s=$(ms)
  "$BIN" audit verify --data-dir "$W/data"
  echo "verify run $run: $(( $(ms) - s )) ms"
done
s=$(ms)
"$BIN" audit verify --data-dir "$W/data" --witness "$W/witness"
echo "verify with the witness: $(( $(ms) - s )) ms"
