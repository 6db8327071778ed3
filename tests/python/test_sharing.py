"""SMART Health Links, end-to-end encrypted bulk export and the share-link audit rule,
against the real phivault binary, opened only with third-party libraries.

* jwcrypto (PyPI) decrypts what the server sends: share-link files (JWE `dir` +
  A256GCM under the key carried in the link) and bulk export files (JWE ECDH-ES +
  A256GCM to a client's registered P-384 public key).
* zxing-cpp (PyPI) reads the link's QR code. The PNG is unpacked by a small stdlib-only
  reader below and the SVG is rasterised from its path, so no imaging library is needed.
* The snooping scan (`phivault audit scan` / `audit alerts`) is run after fetching one
  link from several loopback source addresses (127.0.0.2 ...; Linux routes all of
  127/8 to lo).

Each test starts its own server (see `running_server` in test_backend_services.py).
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import ssl
import struct
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
import zlib
from urllib.parse import urlsplit

import pytest
import requests
import zxingcpp
from jwcrypto import jwe, jwk

from test_backend_services import (
    HTTP_TIMEOUT_S,
    Server,
    get_token,
    make_assertion,
    phivault_bin,
    running_server,
    smart_config,
    token_request,
)

EXPORT_TIMEOUT_S = 60


# ---------------------------------------------------------------- helpers


def b64url_decode(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def shl_payload(shlink: str) -> dict:
    assert shlink.startswith("shlink:/"), shlink[:20]
    return json.loads(b64url_decode(shlink[len("shlink:/") :]))


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def fhir_create(server: Server, token: str, resource: dict) -> dict:
    r = requests.post(
        f"{server.fhir_base}/{resource['resourceType']}",
        headers={
            **bearer(token),
            "Content-Type": "application/fhir+json",
            "Accept": "application/fhir+json",
        },
        data=json.dumps(resource),
        verify=server.ca_path,
        timeout=HTTP_TIMEOUT_S,
    )
    assert r.status_code == 201, f"{r.status_code} {r.text}"
    return r.json()


def new_patient(server: Server, token: str, family: str) -> str:
    return fhir_create(server, token, {"resourceType": "Patient", "name": [{"family": family}]})["id"]


def new_observation(server: Server, token: str, patient_id: str) -> str:
    return fhir_create(
        server,
        token,
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
            "subject": {"reference": f"Patient/{patient_id}"},
            "valueQuantity": {"value": 61, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"},
        },
    )["id"]


def create_link_raw(server: Server, token: str | None, body: dict) -> requests.Response:
    return requests.post(
        f"{server.origin}/shl/links",
        headers=bearer(token) if token else {},
        json=body,
        verify=server.ca_path,
        timeout=HTTP_TIMEOUT_S,
    )


def create_link(server: Server, token: str, patient_id: str, **opts) -> dict:
    r = create_link_raw(server, token, {"patient": f"Patient/{patient_id}", **opts})
    assert r.status_code == 201, f"{r.status_code} {r.text}"
    return r.json()


def post_manifest(server: Server, url: str, body) -> requests.Response:
    kw = {"json": body} if isinstance(body, dict) else {"data": body}
    return requests.post(url, verify=server.ca_path, timeout=HTTP_TIMEOUT_S, **kw)


def open_shl_jwe(token: str, key_b64: str) -> tuple[dict, bytes]:
    """Decrypts a share-link file with jwcrypto and the link's key; (header, plaintext)."""
    t = jwe.JWE()
    t.deserialize(token, key=jwk.JWK(kty="oct", k=key_b64))
    return t.jose_header, t.payload


def assert_operation_outcome(r: requests.Response, status: int) -> dict:
    assert r.status_code == status, f"expected {status}, got {r.status_code} {r.text}"
    assert r.headers.get("Content-Type", "").startswith("application/fhir+json"), r.headers
    oo = r.json()
    assert oo["resourceType"] == "OperationOutcome", oo
    assert oo["issue"] and oo["issue"][0]["severity"] in ("error", "fatal"), oo
    return oo


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(phivault_bin()), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def kick_off_export(server: Server, token: str | None, path: str = "$export", **params) -> requests.Response:
    return requests.get(
        f"{server.fhir_base}/{path}",
        params=params,
        headers={**(bearer(token) if token else {}), "Prefer": "respond-async", "Accept": "application/fhir+json"},
        verify=server.ca_path,
        timeout=HTTP_TIMEOUT_S,
    )


def wait_for_export(server: Server, token: str, status_url: str) -> dict:
    """Polls a kick-off's Content-Location until 200; returns the completion manifest."""
    deadline = time.monotonic() + EXPORT_TIMEOUT_S
    while True:
        r = requests.get(status_url, headers=bearer(token), verify=server.ca_path, timeout=HTTP_TIMEOUT_S)
        if r.status_code == 200:
            return r.json()
        assert r.status_code == 202, f"{r.status_code} {r.text}"
        assert "X-Progress" in r.headers and "Retry-After" in r.headers, r.headers
        assert time.monotonic() < deadline, "export did not finish"
        time.sleep(min(float(r.headers["Retry-After"]), 0.5))


# ---------------------------------------------------------------- QR images


def png_to_gray(data: bytes) -> tuple[int, int, bytes]:
    """A minimal PNG reader (stdlib only): non-interlaced, 8-bit-or-less samples; returns
    (width, height, one gray byte per pixel) taken from the first sample of each pixel."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, palette, hdr = 8, b"", None, None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"PLTE":
            palette = body
        elif kind == b"IDAT":
            idat += body
    w, h, depth, ctype, _, _, interlace = hdr
    assert interlace == 0 and depth <= 8, hdr
    chans = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[ctype]
    bpp = max(1, chans * depth // 8)
    stride = (w * chans * depth + 7) // 8
    raw = zlib.decompress(idat)
    prev, out = bytearray(stride), bytearray()
    for y in range(h):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
            if f == 4:
                p = a + b - c
                pred = a if abs(p - a) <= abs(p - b) and abs(p - a) <= abs(p - c) else b if abs(p - b) <= abs(p - c) else c
            else:
                pred = (0, a, b, (a + b) // 2)[f]
            line[i] = (line[i] + pred) & 255
        for x in range(w):
            if depth < 8:
                bit = x * depth
                v = (line[bit // 8] >> (8 - depth - bit % 8)) & ((1 << depth) - 1)
                v = palette[3 * v] if ctype == 3 else v * 255 // ((1 << depth) - 1)
            else:
                v = line[x * chans]
                v = palette[3 * v] if ctype == 3 else v
            out.append(v)
        prev = line
    return w, h, bytes(out)


def svg_to_gray(svg: str, scale: int = 4) -> tuple[int, int, bytes]:
    """Rasterises the server's QR SVG: a module-unit viewBox, a white background and one
    black path of `M{x},{y}h{n}v1h-{n}z` runs (fails on anything else)."""
    root = ET.fromstring(svg.encode())
    ns = "{http://www.w3.org/2000/svg}"
    _, _, vw, vh = (int(float(v)) for v in root.get("viewBox").split())
    paths = root.findall(f"{ns}path")
    assert len(paths) == 1 and paths[0].get("fill") in ("#000000", "#000", "black"), svg[:300]
    d = paths[0].get("d")
    runs = re.findall(r"M(\d+),(\d+)h(\d+)v1h-(\d+)z", d)
    assert "".join(f"M{x},{y}h{n}v1h-{m}z" for x, y, n, m in runs) == d, "unexpected path syntax"
    w, h = vw * scale, vh * scale
    px = bytearray(b"\xff" * (w * h))
    for x, y, n, _ in runs:
        x, y, n = int(x), int(y), int(n)
        for yy in range(y * scale, (y + 1) * scale):
            px[yy * w + x * scale : yy * w + (x + n) * scale] = b"\x00" * (n * scale)
    return w, h, bytes(px)


def read_qr(w: int, h: int, gray: bytes) -> list:
    image = memoryview(gray).cast("B", (h, w))
    return zxingcpp.read_barcodes(image, formats=zxingcpp.BarcodeFormat.QRCode)


def qr_png_text(link: dict) -> list[str]:
    prefix = "data:image/png;base64,"
    assert link["qr"]["png"].startswith(prefix), link["qr"]["png"][:40]
    return [b.text for b in read_qr(*png_to_gray(base64.b64decode(link["qr"]["png"][len(prefix) :])))]


# ---------------------------------------------------------------- share links


def test_jwcrypto_opens_a_share_link_file_with_the_key_from_the_link():
    with running_server("phivault-shl-", "shl-creator") as server:
        token = get_token(server)["access_token"]
        pid = new_patient(server, token, "Okafor")
        oid = new_observation(server, token, pid)
        before = int(time.time())
        link = create_link(
            server, token, pid, label="For Dr. Ng", passcode="4711", passcodeAttempts=3, expiresIn=3600
        )
        assert link["flag"] == "P" and link["status"] == "active", link
        payload = shl_payload(link["shlink"])
        assert payload["flag"] == "P"
        assert payload["label"] == "For Dr. Ng"
        assert payload.get("v", 1) == 1
        assert payload["url"].startswith(f"{server.origin}/shl/"), payload["url"]
        assert len(payload["key"]) == 43 and len(b64url_decode(payload["key"])) == 32
        assert before + 3600 - 5 <= payload["exp"] <= int(time.time()) + 3600 + 5, payload["exp"]

        # no and a wrong passcode: 401 with the attempts left, and nothing else
        r = post_manifest(server, payload["url"], {"recipient": "Dr. Ng"})
        assert r.status_code == 401 and "files" not in r.json(), f"{r.status_code} {r.text}"
        r = post_manifest(server, payload["url"], {"recipient": "Dr. Ng", "passcode": "0000"})
        assert r.status_code == 401, f"{r.status_code} {r.text}"
        assert r.json() == {"remainingAttempts": 2}

        # the manifest, then the file by its location
        r = post_manifest(server, payload["url"], {"recipient": "Dr. Ng", "passcode": "4711"})
        assert r.status_code == 200, f"{r.status_code} {r.text}"
        manifest = r.json()
        assert manifest["status"] in ("finalized", "can-change"), manifest
        assert len(manifest["files"]) == 1, manifest
        entry = manifest["files"][0]
        assert entry["contentType"] == "application/fhir+json"
        assert "location" in entry and "embedded" not in entry, entry
        f = requests.get(entry["location"], verify=server.ca_path, timeout=HTTP_TIMEOUT_S)
        assert f.status_code == 200, f"{f.status_code} {f.text}"
        assert f.headers["Content-Type"].startswith("application/jose"), f.headers
        assert len(f.text.split(".")) == 5, "not a compact JWE"

        def check(jwe_text: str, key_b64: str) -> None:
            header, plaintext = open_shl_jwe(jwe_text, key_b64)
            assert header["alg"] == "dir" and header["enc"] == "A256GCM", header
            assert header.get("cty", entry["contentType"]) == entry["contentType"], header
            bundle = json.loads(plaintext)
            assert bundle["resourceType"] == "Bundle", bundle
            got = {(e["resource"]["resourceType"], e["resource"]["id"]) for e in bundle["entry"]}
            assert {("Patient", pid), ("Observation", oid)} <= got, got
            obs = next(e["resource"] for e in bundle["entry"] if e["resource"]["id"] == oid)
            assert obs["subject"]["reference"] == f"Patient/{pid}"
            assert obs["valueQuantity"]["value"] == 61

        check(f.text, payload["key"])

        # the same file embedded in the manifest when the recipient allows it
        r = post_manifest(
            server, payload["url"], {"recipient": "Dr. Ng", "passcode": "4711", "embeddedLengthMax": 1_000_000}
        )
        assert r.status_code == 200, f"{r.status_code} {r.text}"
        emb = r.json()["files"][0]
        assert "embedded" in emb and "location" not in emb, emb
        assert emb["contentType"] == "application/fhir+json"
        check(emb["embedded"], payload["key"])
        # ... and by location when the embedded form would be too long
        r = post_manifest(
            server, payload["url"], {"recipient": "Dr. Ng", "passcode": "4711", "embeddedLengthMax": 10}
        )
        assert r.status_code == 200 and "location" in r.json()["files"][0], r.text

        # only the link's own key opens it
        other = base64.urlsafe_b64encode(bytes(32)).rstrip(b"=").decode()
        with pytest.raises(jwe.InvalidJWEData):
            open_shl_jwe(emb["embedded"], other)

        # a direct (U) link resolves to the JWE itself by GET
        direct = create_link(server, token, pid, direct=True)
        dpay = shl_payload(direct["shlink"])
        assert dpay["flag"] == "U", dpay
        g = requests.get(dpay["url"], params={"recipient": "Dr. Ng"}, verify=server.ca_path, timeout=HTTP_TIMEOUT_S)
        assert g.status_code == 200, f"{g.status_code} {g.text}"
        assert g.headers["Content-Type"].startswith("application/jose"), g.headers
        check(g.text, dpay["key"])


def test_the_qr_code_decodes_to_the_link():
    with running_server("phivault-shl-qr-", "shl-qr") as server:
        token = get_token(server)["access_token"]
        pid = new_patient(server, token, "Quispe")
        plain = create_link(server, token, pid, label="QR", passcode="1234")
        assert qr_png_text(plain) == [plain["shlink"]]
        assert plain["qr"]["svg"].lstrip().startswith(("<?xml", "<svg")), plain["qr"]["svg"][:80]
        assert [b.text for b in read_qr(*svg_to_gray(plain["qr"]["svg"]))] == [plain["shlink"]]
        # error-correction level M, as the Health Links specification asks
        barcode = read_qr(*png_to_gray(base64.b64decode(plain["qr"]["png"].split(",", 1)[1])))[0]
        assert barcode.ec_level in ("M", "Q", "H"), barcode.ec_level

        viewer = create_link(server, token, pid, viewer="https://viewer.example/")
        assert viewer["viewerUrl"] == "https://viewer.example/#" + viewer["shlink"], viewer["viewerUrl"]
        assert qr_png_text(viewer) == [viewer["viewerUrl"]]
        assert [b.text for b in read_qr(*svg_to_gray(viewer["qr"]["svg"]))] == [viewer["viewerUrl"]]


# ---------------------------------------------------------------- bulk export


def test_jwcrypto_opens_end_to_end_encrypted_export_files(tmp_path):
    with running_server("phivault-e2e-export-", "plain-client") as server:
        key = jwk.JWK.generate(kty="EC", crv="P-384", kid=f"recipient-{uuid.uuid4().hex[:8]}", use="enc")
        public = key.export_public(as_dict=True)
        assert "d" not in public and public["use"] == "enc"
        pub_file = tmp_path / "export-key.json"
        pub_file.write_text(json.dumps(public))

        # the private half is refused (and no client is written)
        priv_file = tmp_path / "private.json"
        priv_file.write_text(key.export_private())
        refused = cli(
            "client", "add", "--data-dir", str(server.data_dir), "--name", "bad", "--scope", "system/*.rs",
            "--token-url", server.token_url, "--out", str(tmp_path / "bad.json"), "--export-key", str(priv_file),
        )
        assert refused.returncode != 0, refused.stdout
        assert not (tmp_path / "bad.json").exists()

        creds_file = tmp_path / "e2e-client.json"
        add = cli(
            "client", "add", "--data-dir", str(server.data_dir), "--name", "e2e-export", "--scope", "system/*.rs",
            "--token-url", server.token_url, "--out", str(creds_file), "--export-key", str(pub_file),
        )
        assert add.returncode == 0, add.stderr
        creds = json.loads(creds_file.read_text())
        r = token_request(server, make_assertion(creds, smart_config(server)["token_endpoint"]), "system/*.rs")
        assert r.status_code == 200, r.text
        e2e_token = r.json()["access_token"]

        writer = get_token(server)["access_token"]
        pids = {new_patient(server, writer, f"Export{i}") for i in range(3)}
        new_observation(server, writer, next(iter(pids)))

        kick = kick_off_export(server, e2e_token, "$export", _type="Patient")
        assert kick.status_code == 202, f"{kick.status_code} {kick.text}"
        status_url = kick.headers["Content-Location"]
        assert status_url.startswith(f"{server.origin}/bulk/"), status_url
        manifest = wait_for_export(server, e2e_token, status_url)
        assert manifest["requiresAccessToken"] is True
        assert manifest["error"] == []
        assert "_type=Patient" in manifest["request"], manifest["request"]
        assert manifest["transactionTime"]
        enc = manifest["extension"]["encryption"]
        assert enc["alg"] == "ECDH-ES" and enc["enc"] == "A256GCM", enc
        assert enc["kid"] == public["kid"] and enc.get("crv", "P-384") == "P-384", enc
        assert [o["type"] for o in manifest["output"]] == ["Patient"], manifest["output"]
        out = manifest["output"][0]
        assert out["count"] == 3

        f = requests.get(out["url"], headers=bearer(e2e_token), verify=server.ca_path, timeout=HTTP_TIMEOUT_S)
        assert f.status_code == 200, f"{f.status_code} {f.text}"
        assert f.headers["Content-Type"].startswith("application/jose"), f.headers
        t = jwe.JWE()
        t.deserialize(f.text.strip(), key=key)
        header = t.jose_header
        assert header["alg"] == "ECDH-ES" and header["enc"] == "A256GCM", header
        assert header["kid"] == public["kid"] and header["cty"] == "application/fhir+ndjson", header
        assert header["epk"]["crv"] == "P-384" and "d" not in header["epk"], header
        lines = [json.loads(line) for line in t.payload.decode().splitlines() if line.strip()]
        assert all(p["resourceType"] == "Patient" for p in lines), lines
        assert {p["id"] for p in lines} == pids

        # another key of the same curve does not open it
        with pytest.raises(jwe.InvalidJWEData):
            jwe.JWE().deserialize(f.text.strip(), key=jwk.JWK.generate(kty="EC", crv="P-384"))

        # the file needs the exporting client's token
        anon = requests.get(out["url"], verify=server.ca_path, timeout=HTTP_TIMEOUT_S)
        assert_operation_outcome(anon, 401)
        other = requests.get(out["url"], headers=bearer(writer), verify=server.ca_path, timeout=HTTP_TIMEOUT_S)
        assert other.status_code in (403, 404), f"{other.status_code} {other.text}"


# ---------------------------------------------------------------- audit


def fetch_manifest_from(server: Server, url: str, source: str, recipient: str) -> tuple[int, str]:
    """POSTs a manifest request on a fresh connection bound to `source`; (status, request id)."""
    u = urlsplit(url)
    ctx = ssl.create_default_context(cafile=server.ca_path)
    conn = http.client.HTTPSConnection(
        u.hostname, u.port, source_address=(source, 0), context=ctx, timeout=HTTP_TIMEOUT_S
    )
    try:
        conn.request(
            "POST", u.path, body=json.dumps({"recipient": recipient}), headers={"Content-Type": "application/json"}
        )
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("X-Request-Id", "")
    finally:
        conn.close()


def test_a_link_fetched_from_many_addresses_raises_an_alert():
    with running_server("phivault-shl-audit-", "shl-audit") as server:
        token = get_token(server)["access_token"]
        spread_pid = new_patient(server, token, "Spread")
        kept_pid = new_patient(server, token, "Kept")
        spread = create_link(server, token, spread_pid, label="passed around")
        kept = create_link(server, token, kept_pid, label="kept")

        spread_ids = []
        for i in range(2, 7):
            status, rid = fetch_manifest_from(server, shl_payload(spread["shlink"])["url"], f"127.0.0.{i}", f"r{i}")
            assert status == 200, status
            spread_ids.append(rid)
        # one address, several connections (so several source ports): one address
        for n in range(3):
            status, _ = fetch_manifest_from(server, shl_payload(kept["shlink"])["url"], "127.0.0.7", f"k{n}")
            assert status == 200, status

        scan = cli(
            "audit", "scan", "--data-dir", str(server.data_dir), "--start-hour", "0", "--end-hour", "24", "--weekends"
        )
        assert scan.returncode == 0, scan.stderr
        alerts_run = cli("audit", "alerts", "--data-dir", str(server.data_dir), "--status", "open")
        assert alerts_run.returncode == 0, alerts_run.stderr
        alerts = [json.loads(line) for line in alerts_run.stdout.splitlines() if line.strip()]
        mine = [a for a in alerts if a["rule"] == "share-link-addresses"]
        assert len(mine) == 1, alerts
        alert = mine[0]
        assert alert["patient"].removeprefix("Patient/") == spread_pid, alert
        assert alert["user"] == f"link:{spread['id']}", alert
        assert alert["evidence"] and set(alert["evidence"]) <= set(spread_ids), (alert, spread_ids)
        assert not [a for a in alerts if kept["id"] in a.get("user", "") or
                    a.get("patient", "").removeprefix("Patient/") == kept_pid], alerts


# ---------------------------------------------------------------- refusals


def test_shl_and_export_refusals_are_operation_outcomes():
    with running_server("phivault-shl-refusals-", "shl-refusals") as server:
        token = get_token(server)["access_token"]
        pid = new_patient(server, token, "Refused")
        link = create_link(server, token, pid)
        url = shl_payload(link["shlink"])["url"]

        assert_operation_outcome(post_manifest(server, url, {}), 400)  # no recipient
        assert_operation_outcome(post_manifest(server, url, {"recipient": ""}), 400)
        assert_operation_outcome(post_manifest(server, url, "not json"), 400)
        assert_operation_outcome(post_manifest(server, url[:-4] + "AAAA", {"recipient": "x"}), 404)
        direct = shl_payload(create_link(server, token, pid, direct=True)["shlink"])["url"]
        assert_operation_outcome(requests.get(direct, verify=server.ca_path, timeout=HTTP_TIMEOUT_S), 400)

        body = {"patient": f"Patient/{pid}"}
        assert_operation_outcome(create_link_raw(server, None, body), 401)
        assert_operation_outcome(create_link_raw(server, token, {**body, "direct": True, "passcode": "1"}), 400)
        assert_operation_outcome(create_link_raw(server, token, {**body, "label": "x" * 81}), 400)
        assert_operation_outcome(create_link_raw(server, token, {"patient": f"Patient/{uuid.uuid4()}"}), 404)

        # a revoked link is gone
        d = requests.delete(
            f"{server.origin}/shl/links/{link['id']}", headers=bearer(token), verify=server.ca_path,
            timeout=HTTP_TIMEOUT_S,
        )
        assert d.status_code in (200, 204), f"{d.status_code} {d.text}"
        assert_operation_outcome(post_manifest(server, url, {"recipient": "x"}), 404)

        no_prefer = requests.get(
            f"{server.fhir_base}/$export", headers={**bearer(token), "Accept": "application/fhir+json"},
            verify=server.ca_path, timeout=HTTP_TIMEOUT_S,
        )
        assert_operation_outcome(no_prefer, 400)
        assert_operation_outcome(kick_off_export(server, None, "$export"), 401)

        kick = kick_off_export(server, token, "Patient/$export")
        assert kick.status_code == 202, f"{kick.status_code} {kick.text}"
        status_url = kick.headers["Content-Location"]
        manifest = wait_for_export(server, token, status_url)
        assert "extension" not in manifest  # no export key: plain NDJSON
        file_url = manifest["output"][0]["url"]
        plain = requests.get(file_url, headers=bearer(token), verify=server.ca_path, timeout=HTTP_TIMEOUT_S)
        assert plain.status_code == 200 and plain.headers["Content-Type"].startswith("application/fhir+ndjson")
        for unauth in (status_url, file_url):
            r = requests.get(unauth, verify=server.ca_path, timeout=HTTP_TIMEOUT_S)
            assert_operation_outcome(r, 401)
            assert r.headers.get("WWW-Authenticate", "").startswith("Bearer"), r.headers
