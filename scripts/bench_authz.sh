#!/usr/bin/env bash
# What authorization by person costs (issue 4): the same read and the same search with a
# back-end client's system/ token, a patient's token and a clinician's token, the last two
# from real SMART App Launch sign-ins (password + TOTP + consent + PKCE): the patient's
# access is confined to their compartment, the clinician's to the patients their
# practitioner treats (worked out from the records), and both accounts are re-checked.
# Runs alternate.
#   scripts/bench_authz.sh [PATIENTS] [WRK_CONNECTIONS] [SECONDS] [ROUNDS]
# Needs wrk and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
PATIENTS=${1:-200}
CONNS=${2:-32}
SECS=${3:-10}
ROUNDS=${4:-2}
. scripts/bench_common.sh
"$BIN" synth --patients "$PATIENTS" --seed 7 --out "$W/bundles" >/dev/null
start
"$BIN" client add --data-dir "$W/data" --name bench --scope 'system/*.cruds' --token-url "$ORIGIN/auth/token" --out "$W/creds.json" 2>/dev/null
"$LOAD" "$ORIGIN" "$W/data/tls/ca.pem" "$W/creds.json" "$W/bundles" 16 >/dev/null
TOKEN_OUT=$W/token "$LOAD" "$ORIGIN" "$W/data/tls/ca.pem" "$W/creds.json" - >/dev/null
APP=$("$BIN" app add --data-dir "$W/data" --name bench-app --redirect-uri https://app.invalid/cb \
    --scope 'patient/*.rs user/*.rs launch/patient' --allow-bearer | python3 -c 'import json,sys; print(json.load(sys.stdin)["client_id"])')
python3 - "$ORIGIN" "$W/data/tls/ca.pem" "$W/token" "$W" "$BIN" "$APP" <<'PY'
import base64, hashlib, hmac, html, json, os, re, ssl, struct, subprocess, sys, time
import urllib.error, urllib.parse, urllib.request
origin, ca, token_file, out, binary, app = sys.argv[1:7]
system = open(token_file).read().strip()
ctx = ssl.create_default_context(cafile=ca)
class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a, **k):
        return None
opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx), NoRedirect)
def call(url, data=None, headers={}):
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        r = opener.open(req)
        return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()
def get_json(path, tok):
    return json.loads(call(origin + path, headers={"Authorization": "Bearer " + tok})[2])
pat = get_json("/fhir/Patient?_count=1", system)["entry"][0]["resource"]["id"]
obs = get_json(f"/fhir/Patient/{pat}/Observation?_count=1", system)["entry"][0]["resource"]
code = obs["code"]["coding"][0]
code_q = urllib.parse.quote(code["system"] + "|" + code["code"], safe="")
password = "bench-harbor-violet-42"
def add_user(username, role, link_flag, link):
    uri = subprocess.run([binary, "user", "add", "--data-dir", os.path.join(out, "data"), "--username",
        username, "--role", role, link_flag, link], input=password + "\n",
        capture_output=True, text=True, check=True).stdout.strip()
    b32 = urllib.parse.parse_qs(urllib.parse.urlparse(uri).query)["secret"][0]
    return base64.b32decode(b32 + "=" * (-len(b32) % 8))
def totp(secret, t):
    mac = hmac.new(secret, struct.pack(">Q", int(t) // 30), hashlib.sha1).digest()
    o = mac[-1] & 15
    return "%06d" % ((struct.unpack(">I", mac[o:o + 4])[0] & 0x7fffffff) % 1000000)
def sign_in(username, secret, scope):
    verifier = base64.urlsafe_b64encode(os.urandom(48)).rstrip(b"=").decode()
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    q = urllib.parse.urlencode({"response_type": "code", "client_id": app, "redirect_uri": "https://app.invalid/cb",
        "scope": scope, "state": "s", "aud": origin + "/fhir",
        "code_challenge": challenge, "code_challenge_method": "S256"})
    st, h, body = call(origin + "/auth/authorize?" + q)
    cookie = h["Set-Cookie"].split(";")[0]
    field = lambda n: html.unescape(re.search(f'name="{n}" value="([^"]*)"', body).group(1))
    form = {"flow": field("flow"), "csrf": field("csrf")}
    hdr = {"Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"}
    st, h, body = call(origin + "/auth/login", urllib.parse.urlencode(dict(form, username=username,
        password=password, otp=totp(secret, time.time()))).encode(), hdr)
    assert st == 200, (st, body)
    st, h, body = call(origin + "/auth/consent", urllib.parse.urlencode(dict(form, decision="approve")).encode(), hdr)
    code_ = urllib.parse.parse_qs(urllib.parse.urlparse(h["Location"]).query)["code"][0]
    st, h, body = call(origin + "/auth/token", urllib.parse.urlencode({"grant_type": "authorization_code",
        "code": code_, "redirect_uri": "https://app.invalid/cb", "client_id": app, "code_verifier": verifier}).encode(),
        {"Content-Type": "application/x-www-form-urlencoded"})
    return json.loads(body)["access_token"]
person = sign_in("bench.patient", add_user("bench.patient", "patient", "--patient", pat),
    "patient/Observation.rs launch/patient")
enc = get_json(f"/fhir/Patient/{pat}/Encounter?_count=1", system)["entry"][0]["resource"]
practitioner = enc["participant"][0]["individual"]["reference"].split("/")[1]
clinician = sign_in("bench.clinician", add_user("bench.clinician", "clinician", "--practitioner", practitioner),
    "user/Observation.rs")
n_sys = len(get_json(f"/fhir/Patient/{pat}/Observation?code={code_q}", system).get("entry", []))
n_pat = len(get_json(f"/fhir/Observation?code={code_q}", person).get("entry", []))
n_cli = len(get_json(f"/fhir/Observation?code={code_q}", clinician).get("entry", []))
assert n_sys == n_pat == n_cli and n_sys > 0, (n_sys, n_pat, n_cli)
for name, tok, path in [("read-system", system, f"/fhir/Observation/{obs['id']}"),
                        ("read-patient", person, f"/fhir/Observation/{obs['id']}"),
                        ("read-clinician", clinician, f"/fhir/Observation/{obs['id']}"),
                        ("search-system", system, f"/fhir/Patient/{pat}/Observation?code={code_q}"),
                        ("search-patient", person, f"/fhir/Observation?code={code_q}"),
                        ("search-clinician", clinician, f"/fhir/Observation?code={code_q}")]:
    with open(os.path.join(out, name + ".lua"), "w") as f:
        f.write('wrk.headers["Authorization"] = "Bearer %s"\nwrk.path = "%s"\n' % (tok, path))
print(f"== patient {pat}: one observation read; a search matching {n_sys} observations")
PY
# Two ways to compare, both alternating over ROUNDS rounds:
# 1. one variant at a time, with the server's CPU time per request;
# 2. the three tokens at once (CONNS/3 connections each), so that each sees the same
#    machine at the same moment (this VM's speed drifts by ±20 % over tens of seconds).
run() { # name connections seconds -> the wrk output in $W/$name.out
  wrk -t1 -c"$2" -d"$3s" --latency -s "$W/$1.lua" "$ORIGIN" >"$W/$1.out"
}
line() { # name
  echo "$1: $(awk '/Requests\/sec/ {print $2}' "$W/$1.out") req/s, p50 $(awk '$1=="50%" {print $2}' "$W/$1.out"), p99 $(awk '$1=="99%" {print $2}' "$W/$1.out"), non-2xx $(awk '/Non-2xx/ {print $4}' "$W/$1.out")"
}
for round in $(seq "$ROUNDS"); do
  echo "-- round $round: one at a time"
  for name in read-system read-patient read-clinician search-system search-patient search-clinician; do
    read -r u0 s0 < <(awk '{print $14, $15}' /proc/$SPID/stat)
    run "$name" "$CONNS" "$SECS"
    read -r u1 s1 < <(awk '{print $14, $15}' /proc/$SPID/stat)
    n=$(awk '/requests in/ {print $1}' "$W/$name.out")
    echo "$(line "$name"), server CPU $(( ((u1-u0)+(s1-s0)) * 10000 / n )) µs/request"
  done
  echo "-- round $round: side by side"
  for kind in read search; do
    pids=()
    for who in system patient clinician; do
      run "$kind-$who" $((CONNS / 3)) "$SECS" &
      pids+=($!)
    done
    wait "${pids[@]}"
    for who in system patient clinician; do line "$kind-$who"; done
  done
done
stop
"$BIN" audit verify --data-dir "$W/data"
