#!/usr/bin/env python3
"""The query lists of the search benchmarks (scripts/bench_search.sh, bench_search_ab.sh):
patients (id, family, birth date) read through the API, observation codes from the
synthetic bundles, and one-month date windows; written as wrk Lua tables OUT/{obs,pat,date}.paths.lua
(the caller prepends the Authorization header).

usage: bench_search_queries.py ORIGIN CA_PEM TOKEN_FILE BUNDLES_DIR OUT_DIR
"""
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
    with open(os.path.join(out, name + ".paths.lua"), "w") as f:
        f.write("paths = {" + ",".join(json.dumps(p) for p in paths) + "}\n")
        f.write("i = 0\nrequest = function()\n  i = i + 1\n  return wrk.format(\"GET\", paths[(i % #paths) + 1])\nend\n")
print(f"== {len(patients)} patients, {len(codes)} observation codes, {len(dat)} date windows")
