# Sourced by the benchmark scripts (from the repository root): the release build, a scratch
# directory $W removed on exit, and start/stop of `phivault serve` on $W/data (sets BIN,
# LOAD, W, SPID and, once started, ORIGIN).
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release -q -p phivault --example load_import
cargo build --release -q -p phivault
BIN=$CARGO_TARGET_DIR/release/phivault
LOAD=$CARGO_TARGET_DIR/release/examples/load_import
W=$(mktemp -d)
SPID=
trap '[ -n "$SPID" ] && kill $SPID 2>/dev/null; wait 2>/dev/null; rm -rf "$W"' EXIT
start() {
  : >"$W/out"
  "$BIN" serve --data-dir "$W/data" --listen 127.0.0.1:0 >"$W/out" 2>>"$W/err" &
  SPID=$!
  for _ in $(seq 200); do grep -q listening "$W/out" 2>/dev/null && break; sleep 0.05; done
  ORIGIN=$(sed -n 's/^listening on //p' "$W/out")
}
stop() { kill -TERM "$SPID"; wait "$SPID" || true; SPID=; }
