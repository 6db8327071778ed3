"""Search conformance over synthetic data, against the real phivault binary.

A fresh server is loaded with `phivault synth --patients 40 --seed 11` (POSTed as
transaction Bundles) plus a few hand-written resources of other types. Every case's
expected result set is computed here, independently of the server, by scanning the
JSON that was sent (with `urn:uuid:` references rewritten to the ids the server
assigned) with straightforward implementations of the FHIR R4 search rules. Results
are compared as sets of `Type/id` (order only where the case is about `_sort`), after
following every `next` link to the end.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
import unicodedata
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
from fhirpy import SyncFHIRClient

from test_backend_services import (
    HTTP_TIMEOUT_S,
    get_token,
    phivault_bin,
    running_server,
)

PATIENTS = 40
SEED = 11


# ------------------------------------------------------------------ server and data


@pytest.fixture(scope="module")
def srv():
    with running_server("phivault-search-", "search") as server, \
            tempfile.TemporaryDirectory(prefix="phivault-synth-") as t:
        synth = Path(t) / "bundles"
        out = subprocess.run(
            [str(phivault_bin()), "synth", "--patients", str(PATIENTS), "--seed", str(SEED), "--out", str(synth)],
            capture_output=True, text=True, timeout=120,
        )
        assert out.returncode == 0, out.stderr
        yield server, synth


def rewrite(v, m):
    if isinstance(v, dict):
        return {k: (m.get(x, x) if k == "reference" and isinstance(x, str) else rewrite(x, m)) for k, x in v.items()}
    if isinstance(v, list):
        return [rewrite(x, m) for x in v]
    return v


def extra_resources(patient_ids: list[str]) -> list[dict]:
    """Resources of further types (number and uri parameters, and types the synthetic
    bundles do not hold)."""
    p = patient_ids
    out = []
    for i, prob in enumerate(["0.25", "0.5", "0.75", "0.9", "0.125"]):
        out.append({"resourceType": "RiskAssessment", "status": "final",
                    "subject": {"reference": f"Patient/{p[i]}"},
                    "prediction": [{"probabilityDecimal": float(prob)}]})
    for i, uri in enumerate(["http://example.org/protocol/a", "http://example.org/protocol/b",
                             "http://example.org/other/c"]):
        out.append({"resourceType": "Procedure", "status": "completed",
                    "subject": {"reference": f"Patient/{p[i]}"},
                    "instantiatesUri": [uri],
                    "code": {"coding": [{"system": "http://snomed.info/sct", "code": ["80146002", "73761001", "80146002"][i]}]},
                    "performedDateTime": ["2019-05-01", "2021-07-15T10:00:00Z", "2023-01-02"][i]})
    for i, (cvx, when) in enumerate([("140", "2021-10-01"), ("208", "2021-04-12"), ("140", "2022-10-20"), ("115", "2019-03-03")]):
        out.append({"resourceType": "Immunization", "status": "completed",
                    "vaccineCode": {"coding": [{"system": "http://hl7.org/fhir/sid/cvx", "code": cvx}]},
                    "patient": {"reference": f"Patient/{p[i]}"}, "occurrenceDateTime": when})
    for i, code in enumerate(["227493005", "91936005", "227493005"]):
        out.append({"resourceType": "AllergyIntolerance",
                    "code": {"coding": [{"system": "http://snomed.info/sct", "code": code}]},
                    "patient": {"reference": f"Patient/{p[i]}"}})
    for i in range(3):
        out.append({"resourceType": "Coverage", "status": "active",
                    "beneficiary": {"reference": f"Patient/{p[i]}"},
                    "payor": [{"display": "Medicaid"}]})
    return out


@pytest.fixture(scope="module")
def world(srv):
    server, synth = srv
    tok = get_token(server)["access_token"]
    s = requests.Session()
    s.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would override verify
    s.verify = server.ca_path
    s.headers.update({"Authorization": f"Bearer {tok}", "Accept": "application/fhir+json"})
    t0 = datetime.now(timezone.utc) - timedelta(seconds=2)
    resources: dict[str, list[dict]] = {}
    patient_of: dict[str, str] = {}  # "Type/id" -> patient id
    for f in sorted(synth.iterdir()):
        bundle = json.loads(f.read_text())
        r = s.post(server.fhir_base, json=bundle, headers={"Content-Type": "application/fhir+json"}, timeout=HTTP_TIMEOUT_S)
        assert r.status_code == 200, r.text
        m = {}
        for e, g in zip(bundle["entry"], r.json()["entry"]):
            loc = g["response"]["location"]
            rel = loc.split("/fhir/", 1)[1].split("/_history/")[0]
            m[e["fullUrl"]] = rel
        for e in bundle["entry"]:
            res = rewrite(e["resource"], m)
            res["id"] = m[e["fullUrl"]].split("/")[1]
            resources.setdefault(res["resourceType"], []).append(res)
    pids = [p["id"] for p in resources["Patient"]]
    for res in extra_resources(pids):
        r = s.post(f"{server.fhir_base}/{res['resourceType']}", json=res,
                   headers={"Content-Type": "application/fhir+json"}, timeout=HTTP_TIMEOUT_S)
        assert r.status_code == 201, r.text
        res["id"] = r.json()["id"]
        resources.setdefault(res["resourceType"], []).append(res)
    return {"server": server, "session": s, "token": tok, "R": resources, "t0": t0}


# ------------------------------------------------------------------ independent semantics


def norm(s: str) -> str:
    s = unicodedata.normalize("NFKD", s.lower())
    s = "".join(c for c in s if not unicodedata.combining(c))
    return " ".join(re.split(r"[^0-9a-z]+", s)).strip()


def interval(s: str) -> tuple[float, float]:
    """[lo, hi) in seconds since the epoch for a FHIR date/dateTime of any precision."""
    if re.fullmatch(r"\d{4}", s):
        a = datetime(int(s), 1, 1, tzinfo=timezone.utc)
        return a.timestamp(), datetime(int(s) + 1, 1, 1, tzinfo=timezone.utc).timestamp()
    if re.fullmatch(r"\d{4}-\d{2}", s):
        y, mo = map(int, s.split("-"))
        a = datetime(y, mo, 1, tzinfo=timezone.utc)
        b = datetime(y + (mo == 12), mo % 12 + 1, 1, tzinfo=timezone.utc)
        return a.timestamp(), b.timestamp()
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", s):
        a = datetime.fromisoformat(s).replace(tzinfo=timezone.utc)
        return a.timestamp(), (a + timedelta(days=1)).timestamp()
    t = s.replace("Z", "+00:00")
    a = datetime.fromisoformat(t)
    if a.tzinfo is None:
        a = a.replace(tzinfo=timezone.utc)
    width = 60 if re.fullmatch(r".*T\d{2}:\d{2}([+-].*|Z)?", s) else 1
    return a.timestamp(), a.timestamp() + width


def date_ok(prefix: str, v: tuple[float, float], q: tuple[float, float]) -> bool:
    return {
        "eq": q[0] <= v[0] and v[1] <= q[1],
        "ne": not (q[0] <= v[0] and v[1] <= q[1]),
        "gt": v[1] > q[1],
        "lt": v[0] < q[0],
        "ge": v[1] > q[0],
        "le": v[0] < q[1],
        "sa": v[0] >= q[1],
        "eb": v[1] <= q[0],
    }[prefix]


def period(p: dict) -> tuple[float, float]:
    lo = interval(p["start"])[0] if "start" in p else float("-inf")
    hi = interval(p["end"])[1] if "end" in p else float("inf")
    return lo, hi


def name_parts(r: dict) -> list[str]:
    out = []
    for n in r.get("name", []):
        out += [n.get("family", "")] + n.get("given", []) + n.get("prefix", []) + n.get("suffix", []) + [n.get("text", "")]
    return [x for x in out if x]


def codings(cc) -> list[dict]:
    if isinstance(cc, list):
        return [c for x in cc for c in x.get("coding", [])]
    return (cc or {}).get("coding", [])


def ref(r: dict, key: str) -> list[str]:
    v = r.get(key)
    vs = v if isinstance(v, list) else [v] if v else []
    return [x.get("reference") for x in vs if isinstance(x, dict) and x.get("reference")]


def tid(r: dict) -> str:
    return f"{r['resourceType']}/{r['id']}"


def select(world, rtype: str, pred) -> set[str]:
    return {tid(r) for r in world["R"].get(rtype, []) if pred(r)}


def fetch(world, path: str, *, expect: int = 200, headers=None, follow=True):
    """GET a search, following every next link; returns (match set, include set, bundles)."""
    s = world["session"]
    url = f"{world['server'].fhir_base}/{path}"
    matches, includes, bundles = [], [], []
    while url:
        r = s.get(url, headers=headers or {}, timeout=HTTP_TIMEOUT_S)
        assert r.status_code == expect, f"{path}: {r.status_code} {r.text[:500]}"
        if expect != 200:
            return r
        b = r.json()
        bundles.append(b)
        for e in b.get("entry", []):
            mode = e.get("search", {}).get("mode")
            if mode == "match":
                matches.append(tid(e["resource"]))
            elif mode == "include":
                includes.append(tid(e["resource"]))
        url = next((l["url"] for l in b.get("link", []) if l["relation"] == "next"), None) if follow else None
    assert len(matches) == len(set(matches)), f"{path}: a match appeared twice"
    return set(matches), set(includes), bundles


# ------------------------------------------------------------------ the cases

def cases(w):
    R = w["R"]
    pats = R["Patient"]
    p0, p1 = pats[0], pats[1]
    fam0 = p0["name"][0]["family"]
    given0 = p0["name"][0]["given"][0]
    city0 = p0["address"][0]["city"]
    zip0 = p0["address"][0]["postalCode"]
    state0 = p0["address"][0]["state"]
    mrn = next(i for i in p0["identifier"] if i["system"].startswith("urn:oid"))
    phone0 = next((t["value"] for t in p0.get("telecom", []) if t.get("system") == "phone"), None)
    bd0 = p0["birthDate"]
    obs = R["Observation"]
    hr = "8867-4"
    enc0 = R["Encounter"][0]
    enc_day = enc0["period"]["start"][:10]
    cond0 = R["Condition"][0]
    cond_code = codings(cond0["code"])[0]["code"]
    med_code = codings(R["MedicationRequest"][0]["medicationCodeableConcept"])[0]["code"]
    pract0 = R["Practitioner"][0]
    pract_fam = pract0["name"][0]["family"]
    doc0 = R["DocumentReference"][0]
    doc_type = codings(doc0["type"])[0]["code"]

    def P(pred):
        return lambda: select(w, "Patient", pred)

    def O(pred):
        return lambda: select(w, "Observation", pred)

    def qty(r):
        return r.get("valueQuantity", {})

    def starts(values, q):
        return any(norm(v).startswith(norm(q)) for v in values)

    bdi = lambda r: interval(r["birthDate"])  # noqa: E731
    eff = lambda r: interval(r["effectiveDateTime"])  # noqa: E731
    pat_ref = lambda r, key="subject": ref(r, key)  # noqa: E731
    pid = lambda r: r["id"]  # noqa: E731
    c = []
    add = lambda name, path, exp: c.append((name, path, exp))  # noqa: E731

    # string
    add("family prefix", f"Patient?family={quote(fam0[:3])}", P(lambda r: starts([n.get("family", "") for n in r["name"]], fam0[:3])))
    add("family full upper", f"Patient?family={quote(fam0.upper())}", P(lambda r: starts([n.get("family", "") for n in r["name"]], fam0)))
    add("given", f"Patient?given={quote(given0)}", P(lambda r: starts([g for n in r["name"] for g in n.get("given", [])], given0)))
    add("name prefix", f"Patient?name={quote(given0[:4].lower())}", P(lambda r: starts(name_parts(r), given0[:4])))
    add("family exact", f"Patient?family:exact={quote(fam0)}", P(lambda r: any(n.get("family") == fam0 for n in r["name"])))
    add("family exact lower", f"Patient?family:exact={quote(fam0.lower())}", P(lambda r: any(n.get("family") == fam0.lower() for n in r["name"])))
    mid = fam0[1:4]
    add("family contains", f"Patient?family:contains={quote(mid)}", P(lambda r: any(norm(mid) in norm(n.get("family", "")) for n in r["name"])))
    add("name contains", f"Patient?name:contains={quote(given0[1:4])}", P(lambda r: any(norm(given0[1:4]) in norm(x) for x in name_parts(r))))
    add("address-city", f"Patient?address-city={quote(city0)}", P(lambda r: starts([a.get("city", "") for a in r.get("address", [])], city0)))
    add("address-postalcode", f"Patient?address-postalcode={zip0}", P(lambda r: starts([a.get("postalCode", "") for a in r.get("address", [])], zip0)))
    add("address-state", f"Patient?address-state={state0}", P(lambda r: starts([a.get("state", "") for a in r.get("address", [])], state0)))
    add("address (any part)", f"Patient?address={quote(city0[:3].lower())}", P(lambda r: starts([x for a in r.get("address", []) for x in a.get("line", []) + [a.get(k, "") for k in ("city", "district", "state", "postalCode", "country", "text")]], city0[:3])))
    add("practitioner name", f"Practitioner?name={quote(pract_fam)}", lambda: select(w, "Practitioner", lambda r: starts(name_parts(r), pract_fam)))
    # token
    add("gender", "Patient?gender=female", P(lambda r: r.get("gender") == "female"))
    add("gender OR", "Patient?gender=male,other", P(lambda r: r.get("gender") in ("male", "other")))
    add("gender not", "Patient?gender:not=female", P(lambda r: r.get("gender") != "female"))
    add("identifier system|value", f"Patient?identifier={quote(mrn['system'] + '|' + mrn['value'], safe='')}", P(lambda r: any(i.get("system") == mrn["system"] and i.get("value") == mrn["value"] for i in r.get("identifier", []))))
    add("identifier value", f"Patient?identifier={mrn['value']}", P(lambda r: any(i.get("value") == mrn["value"] for i in r.get("identifier", []))))
    add("identifier no system", f"Patient?identifier=%7C{mrn['value']}", P(lambda r: any(i.get("value") == mrn["value"] and "system" not in i for i in r.get("identifier", []))))
    ssn = "http://hl7.org/fhir/sid/us-ssn"
    add("identifier system only", f"Patient?identifier={quote(ssn, safe='')}%7C", P(lambda r: any(i.get("system") == ssn for i in r.get("identifier", []))))
    add("identifier text", "Patient?identifier:text=social", P(lambda r: any(norm((i.get("type") or {}).get("text", "")).startswith("social") for i in r.get("identifier", []))))
    if phone0:
        add("phone", f"Patient?phone={quote(phone0)}", P(lambda r: any(t.get("value") == phone0 and t.get("system") == "phone" for t in r.get("telecom", []))))
    add("active", "Patient?active=true", P(lambda r: r.get("active") is True))
    add("code system|code", f"Observation?code=http%3A%2F%2Floinc.org%7C{hr}", O(lambda r: any(x.get("system") == "http://loinc.org" and x.get("code") == hr for x in codings(r["code"]))))
    add("code bare", f"Observation?code={hr}", O(lambda r: any(x.get("code") == hr for x in codings(r["code"]))))
    add("code no system", f"Observation?code=%7C{hr}", O(lambda r: any(x.get("code") == hr and "system" not in x for x in codings(r["code"]))))
    add("code system only", "Observation?code=http%3A%2F%2Floinc.org%7C", O(lambda r: any(x.get("system") == "http://loinc.org" for x in codings(r["code"]))))
    add("code text", "Observation?code:text=heart", O(lambda r: any(norm(x.get("display", "") or r["code"].get("text", "")).startswith("heart") for x in codings(r["code"]))))
    add("code OR", f"Observation?code={hr},8480-6", O(lambda r: any(x.get("code") in (hr, "8480-6") for x in codings(r["code"]))))
    add("category", "Observation?category=vital-signs", O(lambda r: any(x.get("code") == "vital-signs" for x in codings(r.get("category", [])))))
    add("category not", "Observation?category:not=laboratory", O(lambda r: not any(x.get("code") == "laboratory" for x in codings(r.get("category", [])))))
    add("status", "Observation?status=final", O(lambda r: r.get("status") == "final"))
    add("missing false", "Observation?value-quantity:missing=false", O(lambda r: "valueQuantity" in r))
    add("missing true", "Observation?value-string:missing=true", O(lambda r: "valueString" not in r))
    add("condition code", f"Condition?code={cond_code}", lambda: select(w, "Condition", lambda r: any(x.get("code") == cond_code for x in codings(r["code"]))))
    add("condition clinical-status", "Condition?clinical-status=active", lambda: select(w, "Condition", lambda r: any(x.get("code") == "active" for x in codings(r.get("clinicalStatus")))))
    add("medication code", f"MedicationRequest?code={med_code}", lambda: select(w, "MedicationRequest", lambda r: any(x.get("code") == med_code for x in codings(r.get("medicationCodeableConcept")))))
    add("encounter class", "Encounter?class=AMB", lambda: select(w, "Encounter", lambda r: r.get("class", {}).get("code") == "AMB"))
    add("document type", f"DocumentReference?type={doc_type}", lambda: select(w, "DocumentReference", lambda r: any(x.get("code") == doc_type for x in codings(r.get("type")))))
    add("immunization vaccine-code", "Immunization?vaccine-code=http%3A%2F%2Fhl7.org%2Ffhir%2Fsid%2Fcvx%7C140", lambda: select(w, "Immunization", lambda r: codings(r["vaccineCode"])[0]["code"] == "140"))
    add("allergy code", "AllergyIntolerance?code=227493005", lambda: select(w, "AllergyIntolerance", lambda r: codings(r["code"])[0]["code"] == "227493005"))
    add("procedure code", "Procedure?code=80146002", lambda: select(w, "Procedure", lambda r: codings(r["code"])[0]["code"] == "80146002"))
    # date
    for prec in (bd0[:4], bd0[:7], bd0):
        add(f"birthdate eq {len(prec)}", f"Patient?birthdate={prec}", P(lambda r, q=prec: date_ok("eq", bdi(r), interval(q))))
    for pre in ("ne", "lt", "le", "gt", "ge", "sa", "eb"):
        add(f"birthdate {pre}", f"Patient?birthdate={pre}{bd0}", P(lambda r, pre=pre: date_ok(pre, bdi(r), interval(bd0))))
    add("birthdate range", "Patient?birthdate=ge1960&birthdate=lt1980", P(lambda r: date_ok("ge", bdi(r), interval("1960")) and date_ok("lt", bdi(r), interval("1980"))))
    add("obs date window", "Observation?date=ge2021-01-01&date=lt2022-01-01", O(lambda r: date_ok("ge", eff(r), interval("2021-01-01")) and date_ok("lt", eff(r), interval("2022-01-01"))))
    add("obs date month", "Observation?date=2022-03", O(lambda r: date_ok("eq", eff(r), interval("2022-03"))))
    t = obs[0]["effectiveDateTime"][:16]
    add("obs date minute gt", f"Observation?date=gt{t}", O(lambda r: date_ok("gt", eff(r), interval(t))))
    add("encounter date day", f"Encounter?date={enc_day}", lambda: select(w, "Encounter", lambda r: date_ok("eq", period(r["period"]), interval(enc_day))))
    add("encounter date ge/le", f"Encounter?date=ge{enc_day}&date=le{enc_day}", lambda: select(w, "Encounter", lambda r: date_ok("ge", period(r["period"]), interval(enc_day)) and date_ok("le", period(r["period"]), interval(enc_day))))
    add("condition onset lt", "Condition?onset-date=lt2020", lambda: select(w, "Condition", lambda r: "onsetDateTime" in r and date_ok("lt", interval(r["onsetDateTime"]), interval("2020"))))
    add("medication authoredon", "MedicationRequest?authoredon=ge2022", lambda: select(w, "MedicationRequest", lambda r: date_ok("ge", interval(r["authoredOn"]), interval("2022"))))
    add("claim created", "Claim?created=le2021-12-31", lambda: select(w, "Claim", lambda r: date_ok("le", interval(r["created"]), interval("2021-12-31"))))
    add("immunization date", "Immunization?date=ge2021&date=lt2022", lambda: select(w, "Immunization", lambda r: date_ok("ge", interval(r["occurrenceDateTime"]), interval("2021")) and date_ok("lt", interval(r["occurrenceDateTime"]), interval("2022"))))
    t0 = (w["t0"]).strftime("%Y-%m-%dT%H:%M:%SZ")
    add("lastUpdated gt", f"Patient?_lastUpdated=gt{t0}", P(lambda r: True))
    add("lastUpdated lt", f"Patient?_lastUpdated=lt{t0}", P(lambda r: False))
    # reference
    add("subject Type/id", f"Observation?subject=Patient/{p0['id']}", O(lambda r: f"Patient/{p0['id']}" in pat_ref(r)))
    add("patient id", f"Observation?patient={p1['id']}", O(lambda r: f"Patient/{p1['id']}" in pat_ref(r)))
    add("subject:Patient id", f"Observation?subject:Patient={p0['id']}", O(lambda r: f"Patient/{p0['id']}" in pat_ref(r)))
    add("encounter ref", f"Observation?encounter=Encounter/{enc0['id']}", O(lambda r: f"Encounter/{enc0['id']}" in ref(r, "encounter")))
    add("coverage beneficiary", f"Coverage?beneficiary=Patient/{p0['id']}", lambda: select(w, "Coverage", lambda r: f"Patient/{p0['id']}" in ref(r, "beneficiary")))
    add("_id OR", f"Patient?_id={p0['id']},{p1['id']}", P(lambda r: r["id"] in (p0["id"], p1["id"])))
    # quantity and number
    add("value-quantity gt", "Observation?value-quantity=gt100", O(lambda r: "value" in qty(r) and qty(r)["value"] > 100))
    add("value-quantity unit", "Observation?value-quantity=lt5.5%7Chttp%3A%2F%2Funitsofmeasure.org%7C%25", O(lambda r: qty(r).get("code") == "%" and qty(r).get("system") == "http://unitsofmeasure.org" and qty(r)["value"] < 5.5))
    add("value-quantity eq precision", "Observation?value-quantity=60", O(lambda r: "value" in qty(r) and 59.5 <= qty(r)["value"] < 60.5))
    add("value-quantity ge le", "Observation?value-quantity=ge70&value-quantity=le90", O(lambda r: "value" in qty(r) and 70 <= qty(r)["value"] <= 90))
    add("number gt", "RiskAssessment?probability=gt0.5", lambda: select(w, "RiskAssessment", lambda r: r["prediction"][0]["probabilityDecimal"] > 0.5))
    add("number eq", "RiskAssessment?probability=0.25", lambda: select(w, "RiskAssessment", lambda r: 0.245 <= r["prediction"][0]["probabilityDecimal"] < 0.255))
    # uri
    add("uri", "Procedure?instantiates-uri=http%3A%2F%2Fexample.org%2Fprotocol%2Fa", lambda: select(w, "Procedure", lambda r: "http://example.org/protocol/a" in r.get("instantiatesUri", [])))
    add("uri below", "Procedure?instantiates-uri:below=http%3A%2F%2Fexample.org%2Fprotocol", lambda: select(w, "Procedure", lambda r: any(u.startswith("http://example.org/protocol") for u in r.get("instantiatesUri", []))))
    # AND of different parameters
    add("family AND gender", f"Patient?family={quote(fam0)}&gender={p0['gender']}", P(lambda r: starts([n.get("family", "") for n in r["name"]], fam0) and r.get("gender") == p0["gender"]))
    add("code AND patient", f"Observation?patient={p0['id']}&code={hr}", O(lambda r: f"Patient/{p0['id']}" in pat_ref(r) and any(x.get("code") == hr for x in codings(r["code"]))))
    # chains and _has
    pats_by_id = {p["id"]: p for p in pats}

    def patient_of(r):
        refs = pat_ref(r)
        return pats_by_id.get(refs[0].split("/")[1]) if refs and refs[0].startswith("Patient/") else None

    add("chain family", f"Observation?subject:Patient.family={quote(fam0)}", O(lambda r: (p := patient_of(r)) is not None and starts([n.get("family", "") for n in p["name"]], fam0)))
    add("chain gender AND code", f"Observation?subject:Patient.gender=male&code={hr}", O(lambda r: (p := patient_of(r)) is not None and p.get("gender") == "male" and any(x.get("code") == hr for x in codings(r["code"]))))
    pr_by_id = {p["id"]: p for p in R["Practitioner"]}
    add("chain practitioner name", f"Encounter?practitioner.name={quote(pract_fam)}", lambda: select(w, "Encounter", lambda r: any(x.startswith("Practitioner/") and starts(name_parts(pr_by_id[x.split('/')[1]]), pract_fam) for x in [p["individual"]["reference"] for p in r.get("participant", []) if "individual" in p])))
    with_hr = {pat_ref(o)[0].split("/")[1] for o in obs if any(x.get("code") == hr for x in codings(o["code"]))}
    add("_has observation", f"Patient?_has:Observation:patient:code={hr}", P(lambda r: r["id"] in with_hr))
    with_cond = {pat_ref(o)[0].split("/")[1] for o in R["Condition"] if any(x.get("code") == cond_code for x in codings(o["code"]))}
    add("_has condition", f"Patient?_has:Condition:subject:code={cond_code}", P(lambda r: r["id"] in with_cond))
    # compartment
    add("compartment obs", f"Patient/{p0['id']}/Observation?code={hr}", O(lambda r: f"Patient/{p0['id']}" in pat_ref(r) and any(x.get("code") == hr for x in codings(r["code"]))))
    add("compartment conditions", f"Patient/{p0['id']}/Condition", lambda: select(w, "Condition", lambda r: f"Patient/{p0['id']}" in pat_ref(r)))
    # paging
    add("paging all observations", "Observation?_count=7", O(lambda r: True))
    add("paging POST-free big page", "Observation?_count=1000", O(lambda r: True))
    return c


def self_link(b: dict) -> str:
    return next(l["url"] for l in b.get("link", []) if l["relation"] == "self")


def test_conformance_cases(world):
    cs = cases(world)
    assert len(cs) >= 60, len(cs)
    failures = []
    nontrivial = 0
    base = world["server"].fhir_base
    for name, path, exp in cs:
        want = exp()
        got, _, bundles = fetch(world, path)
        if got != want:
            failures.append(f"{name} [{path}]: missing {sorted(want - got)[:3]} extra {sorted(got - want)[:3]} ({len(got)} vs {len(want)})")
        # the self link of the first page (and of a continued one) is the search as the
        # server applied it: following it gives that page again
        for b in bundles[:2]:
            own = self_link(b)
            assert own.startswith(f"{base}/"), own
            again, _, _ = fetch(world, own[len(base) + 1:], follow=False)
            page = {tid(e["resource"]) for e in b.get("entry", []) if e["search"]["mode"] == "match"}
            if again != page:
                failures.append(f"{name} [{path}]: self link {own} gave another page")
        rtype = path.split("?")[0].split("/")[-1] if "?" in path else path.split("/")[-1]
        if 0 < len(want) < len(world["R"].get(rtype, [])):
            nontrivial += 1
    assert not failures, "\n".join(failures)
    assert nontrivial >= 45, f"only {nontrivial} cases are selective"


def test_includes_revincludes_and_iterate(world):
    R = world["R"]
    hr = "8867-4"
    p0 = R["Patient"][0]
    matches, inc, _ = fetch(world, f"Observation?code={hr}&_include=Observation:subject")
    want_inc = {o["subject"]["reference"] for o in R["Observation"] if any(c.get("code") == hr for c in codings(o["code"]))}
    assert inc == want_inc
    m, inc, _ = fetch(world, f"Patient?_id={p0['id']}&_revinclude=Observation:subject")
    assert m == {f"Patient/{p0['id']}"}
    assert inc == select(world, "Observation", lambda r: r["subject"]["reference"] == f"Patient/{p0['id']}")
    o = next(o for o in R["Observation"] if "encounter" in o)
    enc = next(e for e in R["Encounter"] if f"Encounter/{e['id']}" == o["encounter"]["reference"])
    m, inc, _ = fetch(world, f"Observation?_id={o['id']}&_include=Observation:encounter&_include:iterate=Encounter:practitioner")
    want = {o["encounter"]["reference"]} | {p["individual"]["reference"] for p in enc.get("participant", []) if p["individual"]["reference"].startswith("Practitioner/")}
    assert inc == want
    # an abusive iterate is bounded: either served within the caps or refused as too costly
    r = world["session"].get(
        f"{world['server'].fhir_base}/Patient?_revinclude:iterate=Observation:subject&_include:iterate=Observation:patient"
        "&_revinclude:iterate=Encounter:subject&_include:iterate=Encounter:practitioner&_count=1000",
        timeout=HTTP_TIMEOUT_S)
    assert r.status_code in (200, 400), r.status_code
    if r.status_code == 200:
        assert len(r.json().get("entry", [])) <= 2000
    else:
        assert r.json()["issue"][0]["code"] == "too-costly"


def test_everything_streams_the_compartment(world):
    R = world["R"]
    p0 = R["Patient"][0]
    ref = f"Patient/{p0['id']}"
    got, _, _ = fetch(world, f"Patient/{p0['id']}/$everything", follow=False)
    want = {ref}
    for rtype, key in [("Observation", "subject"), ("Encounter", "subject"), ("Condition", "subject"),
                       ("MedicationRequest", "subject"), ("Claim", "patient"), ("DocumentReference", "subject"),
                       ("RiskAssessment", "subject"), ("Procedure", "subject"), ("Immunization", "patient"),
                       ("AllergyIntolerance", "patient"), ("Coverage", "beneficiary")]:
        want |= select(world, rtype, lambda r, key=key: ref in [x.get("reference") for x in ([r.get(key)] if isinstance(r.get(key), dict) else r.get(key, []))])
    assert got == want


def test_paging_links_are_opaque_and_complete(world):
    p0 = world["R"]["Patient"][0]
    fam = p0["name"][0]["family"]
    got, _, bundles = fetch(world, f"Patient?family={quote(fam[:3])}&_count=1")
    assert len(bundles) == len(got) or len(bundles) == len(got) + 1
    base = world["server"].fhir_base
    for i, b in enumerate(bundles):
        for link in b.get("link", []):
            if link["relation"] == "self":
                # the client's own query as applied (a continued page adds its cursor)
                own = f"{base}/Patient?_count=1&family={quote(fam[:3])}"
                assert link["url"] == own or (i > 0 and link["url"].startswith(own + "&_cursor=")), link["url"]
            else:
                assert fam[:3].lower() not in link["url"].lower(), link["url"]
                assert "family" not in link["url"]


def test_totals_summary_sort_elements(world):
    R = world["R"]
    s = world["session"]
    base = world["server"].fhir_base
    b = s.get(f"{base}/Observation?code=8867-4&_total=accurate&_count=2", timeout=HTTP_TIMEOUT_S).json()
    want = len(select(world, "Observation", lambda r: any(x.get("code") == "8867-4" for x in codings(r["code"]))))
    assert b["total"] == want
    b = s.get(f"{base}/Observation?code=8867-4&_summary=count", timeout=HTTP_TIMEOUT_S).json()
    assert b["total"] == want and not b.get("entry")
    _, _, bundles = fetch(world, "Patient?_sort=birthdate&_count=9")
    dates = [e["resource"]["birthDate"] for bb in bundles for e in bb.get("entry", [])]
    assert dates == sorted(dates) and len(dates) == len(R["Patient"])
    _, _, bundles = fetch(world, "Patient?_sort=-birthdate&_count=50")
    dates = [e["resource"]["birthDate"] for bb in bundles for e in bb.get("entry", [])]
    assert dates == sorted(dates, reverse=True)
    _, _, bundles = fetch(world, "Observation?_sort=-_lastUpdated&_count=25")
    lu = [e["resource"]["meta"]["lastUpdated"] for bb in bundles for e in bb.get("entry", [])]
    assert lu == sorted(lu, reverse=True) and len(lu) == len(R["Observation"])
    b = s.get(f"{base}/Patient?_elements=gender&_count=3", timeout=HTTP_TIMEOUT_S).json()
    for e in b["entry"]:
        assert set(e["resource"]) <= {"resourceType", "id", "meta", "gender"}, e["resource"].keys()
        assert any(t.get("code") == "SUBSETTED" for t in e["resource"]["meta"].get("tag", []))


def test_post_search_and_errors(world):
    s = world["session"]
    base = world["server"].fhir_base
    r = s.post(f"{base}/Patient/_search", data="gender=female", headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 200
    assert {tid(e["resource"]) for e in r.json()["entry"]} == select(world, "Patient", lambda p: p.get("gender") == "female") or r.json().get("link")
    for q in ["Patient?nonsense=1", "Patient?birthdate=1970-13-01", "Patient?gender:contains=fe",
              "Observation?value-quantity=big", "Observation?subject.name.family=x", "Patient?_sort=nope"]:
        r = s.get(f"{base}/{q}", timeout=HTTP_TIMEOUT_S)
        assert r.status_code == 400, (q, r.status_code)
        assert r.json()["resourceType"] == "OperationOutcome"
    r = s.get(f"{base}/Patient?nonsense=1&gender=female", headers={"Prefer": "handling=lenient"}, timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 200
    entries = r.json()["entry"]
    assert any(e["search"]["mode"] == "outcome" for e in entries)
    r = s.get(f"{base}/Observation?_count=100000", timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 200 and len(r.json().get("entry", [])) <= 1000


def test_fhirpy_searches_with_paging(world):
    server = world["server"]
    client = SyncFHIRClient(server.fhir_base, authorization=f"Bearer {world['token']}",
                            requests_config={"verify": server.ca_path, "timeout": HTTP_TIMEOUT_S})
    got = {f"Observation/{o['id']}" for o in client.resources("Observation").search(code="8867-4").limit(3).fetch_all()}
    want = select(world, "Observation", lambda r: any(x.get("code") == "8867-4" for x in codings(r["code"])))
    assert got == want and len(want) > 3
    fam = world["R"]["Patient"][0]["name"][0]["family"]
    got = {f"Patient/{p['id']}" for p in client.resources("Patient").search(family=fam).fetch_all()}
    assert f"Patient/{world['R']['Patient'][0]['id']}" in got
    # fhirpy's count() asks `_count=0&_totalMethod=count` and reads `total`
    assert client.resources("Observation").search(code="8867-4").count() == len(want)
    assert client.resources("Patient").search(family=fam).count() == len(got)
    assert client.resources("Patient").count() == len(world["R"]["Patient"])
    p0 = world["R"]["Patient"][0]["id"]
    assert client.resources("Observation").search(subject=f"Patient/{p0}").count() == len(
        select(world, "Observation", lambda r: r["subject"]["reference"] == f"Patient/{p0}"))
    assert client.resources("Observation").search(code="no-such-code").count() == 0
