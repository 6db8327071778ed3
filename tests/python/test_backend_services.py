"""End-to-end test of phivault with a real third-party client stack.

The real `phivault` binary is started on a fresh data directory. A client is
registered with `phivault client add`; it authenticates by SMART Backend
Services (an ES384 client assertion signed with PyJWT) and then the fhirpy
library (from PyPI) performs create, read, update, history, vread, a
transaction and a delete over HTTPS, trusting only the server's dev CA.

Environment:
  PHIVAULT_BIN  path to the phivault binary (default: target/release/phivault
                under the repository root).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest
import requests
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import AuthorizationError, ForbiddenError, ResourceNotFound
from jwt.algorithms import ECAlgorithm

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 120
STOP_TIMEOUT_S = 30
HTTP_TIMEOUT_S = 30
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def phivault_bin() -> Path:
    raw = os.environ.get("PHIVAULT_BIN")
    path = Path(raw) if raw else REPO_ROOT / "target" / "release" / "phivault"
    if not path.is_absolute():
        path = (Path.cwd() / path).resolve()
    if not path.is_file():
        pytest.fail(f"phivault binary not found at {path} (set PHIVAULT_BIN)", pytrace=False)
    return path


@dataclass
class Server:
    origin: str  # https://127.0.0.1:PORT
    fhir_base: str  # https://127.0.0.1:PORT/fhir
    token_url: str  # from the listening line (what `client add` was told)
    ca_path: str
    data_dir: Path
    creds: dict
    stderr_path: Path

    def stderr_tail(self, n: int = 40) -> str:
        try:
            lines = self.stderr_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


def _read_listening_line(proc: subprocess.Popen, timeout: float) -> str:
    """Returns the single `listening on ...` stdout line, or fails after `timeout`."""
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        # Keeps draining stdout for the server's whole life so it can never block on a full pipe.
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no listening line within {timeout}s")
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            continue
        if line is None:
            raise RuntimeError(f"server exited early with status {proc.wait()}")
        line = line.strip()
        if line.startswith("listening on "):
            return line[len("listening on ") :]
        # Anything else on stdout breaks the contract ("exactly one stdout line").
        raise RuntimeError(f"unexpected stdout line before listening line: {line!r}")


@contextlib.contextmanager
def running_server(prefix: str, client_name: str):
    """A fresh data directory served by the real binary on 127.0.0.1:0, with one
    registered SMART Backend Services client (`system/*.cruds`); stopped with SIGTERM
    (which must succeed) on exit."""
    binary = phivault_bin()
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    data_dir = tmp / "data"
    stderr_path = tmp / "server.stderr"
    stderr_file = open(stderr_path, "wb")
    proc = subprocess.Popen(
        [str(binary), "serve", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr_file,
        text=True,
    )
    try:
        try:
            origin = _read_listening_line(proc, STARTUP_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001
            proc.kill()
            proc.wait()
            stderr_file.flush()
            pytest.fail(
                f"server did not start: {e}\n--- stderr ---\n"
                + stderr_path.read_text(errors="replace"),
                pytrace=False,
            )
        assert origin.startswith("https://127.0.0.1:"), origin
        token_url = f"{origin}/auth/token"
        creds_path = tmp / "client.json"
        add = subprocess.run(
            [
                str(binary),
                "client",
                "add",
                "--data-dir",
                str(data_dir),
                "--name",
                client_name,
                "--scope",
                "system/*.cruds",
                "--token-url",
                token_url,
                "--out",
                str(creds_path),
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert add.returncode == 0, f"client add failed: {add.stdout}\n{add.stderr}"
        creds = json.loads(creds_path.read_text())
        yield Server(
            origin=origin,
            fhir_base=f"{origin}/fhir",
            token_url=token_url,
            ca_path=str(data_dir / "tls" / "ca.pem"),
            data_dir=data_dir,
            creds=creds,
            stderr_path=stderr_path,
        )
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                stderr_file.close()
                shutil.rmtree(tmp, ignore_errors=True)
                pytest.fail(f"server ignored SIGTERM for {STOP_TIMEOUT_S}s", pytrace=False)
        stderr_file.close()
        rc = proc.returncode
        stderr_text = stderr_path.read_text(errors="replace") if rc != 0 else ""
        shutil.rmtree(tmp, ignore_errors=True)
        if rc != 0:
            pytest.fail(f"server exited with status {rc} on SIGTERM\n{stderr_text}", pytrace=False)


@pytest.fixture(scope="session")
def server():
    with running_server("phivault-pytest-", "pytest-fhirpy") as s:
        yield s


# ---------------------------------------------------------------- helpers


def smart_config(server: Server) -> dict:
    r = requests.get(
        f"{server.origin}/.well-known/smart-configuration",
        verify=server.ca_path,
        timeout=HTTP_TIMEOUT_S,
    )
    assert r.status_code == 200, r.text
    return r.json()


def make_assertion(creds: dict, aud: str, *, jti: str | None = None, lifetime: int = 240) -> str:
    """A SMART Backend Services client assertion, signed by PyJWT with the client's JWK."""
    jwk = creds["private_jwk"]
    key = ECAlgorithm.from_jwk(json.dumps(jwk))
    now = int(time.time())
    claims = {
        "iss": creds["client_id"],
        "sub": creds["client_id"],
        "aud": aud,
        "iat": now,
        "exp": now + lifetime,
        "jti": jti or str(uuid.uuid4()),
    }
    return jwt.encode(claims, key, algorithm="ES384", headers={"kid": jwk["kid"], "typ": "JWT"})


def token_request(server: Server, assertion: str, scope: str = "system/*.cruds") -> requests.Response:
    return requests.post(
        smart_config(server)["token_endpoint"],
        data={
            "grant_type": "client_credentials",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion,
            "scope": scope,
        },
        verify=server.ca_path,
        timeout=HTTP_TIMEOUT_S,
    )


def get_token(server: Server, scope: str = "system/*.cruds") -> dict:
    token_endpoint = smart_config(server)["token_endpoint"]
    r = token_request(server, make_assertion(server.creds, token_endpoint), scope)
    assert r.status_code == 200, f"{r.status_code} {r.text}"
    return r.json()


def fhir_client(server: Server, access_token: str | None) -> SyncFHIRClient:
    return SyncFHIRClient(
        server.fhir_base,
        authorization=f"Bearer {access_token}" if access_token else None,
        requests_config={"verify": server.ca_path, "timeout": HTTP_TIMEOUT_S},
    )


@pytest.fixture(scope="session")
def token(server: Server) -> dict:
    return get_token(server)


@pytest.fixture(scope="session")
def client(server: Server, token: dict) -> SyncFHIRClient:
    return fhir_client(server, token["access_token"])


def raw(server: Server, method: str, path: str, token: str | None = None, **kw) -> requests.Response:
    headers = kw.pop("headers", {})
    headers.setdefault("Accept", "application/fhir+json")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return requests.request(
        method,
        f"{server.fhir_base}/{path.lstrip('/')}",
        headers=headers,
        verify=server.ca_path,
        timeout=HTTP_TIMEOUT_S,
        **kw,
    )


# ---------------------------------------------------------------- discovery and token


def test_smart_configuration_advertises_token_endpoint(server: Server):
    cfg = smart_config(server)
    assert cfg["token_endpoint"] == server.token_url
    assert server.creds["token_url"] == server.token_url
    jwk = server.creds["private_jwk"]
    assert jwk["kty"] == "EC" and jwk["crv"] == "P-384" and jwk["alg"] == "ES384"
    assert {"kid", "d", "x", "y"} <= set(jwk)


def test_token_via_pyjwt_assertion(token: dict):
    assert token["token_type"].lower() == "bearer"
    assert token["access_token"]
    assert 0 < int(token["expires_in"]) <= 3600
    assert "system/" in token["scope"]


def test_capability_statement_via_fhirpy(client: SyncFHIRClient):
    cs = client.execute("metadata", method="get")
    assert cs["resourceType"] == "CapabilityStatement"
    assert cs["fhirVersion"].startswith("4.0")


# ---------------------------------------------------------------- CRUD with fhirpy


def test_patient_lifecycle(server: Server, client: SyncFHIRClient, token: dict):
    # create
    patient = client.resource(
        "Patient",
        active=True,
        name=[{"family": "Lovelace", "given": ["Ada"]}],
        gender="female",
        birthDate="1815-12-10",
        identifier=[{"system": "urn:example:mrn", "value": "MRN-1815"}],
    )
    patient.save()
    pid = patient.id
    assert pid, "server assigned no id"
    assert patient["meta"]["versionId"] == "1"
    # fhirpy's count() (`_count=0&_totalMethod=count`, reading `total`)
    by_mrn = client.resources("Patient").search(identifier="urn:example:mrn|MRN-1815")
    assert by_mrn.count() == 1

    # read back and compare fields
    got = client.get("Patient", pid)
    assert got["resourceType"] == "Patient"
    assert got["id"] == pid
    assert got["name"] == [{"family": "Lovelace", "given": ["Ada"]}]
    assert got["gender"] == "female"
    assert got["birthDate"] == "1815-12-10"
    assert got["active"] is True
    assert got["identifier"] == [{"system": "urn:example:mrn", "value": "MRN-1815"}]
    assert got["meta"]["versionId"] == "1"

    # the same read over plain HTTP carries a weak ETag for version 1
    r = raw(server, "GET", f"Patient/{pid}", token["access_token"])
    assert r.status_code == 200
    assert r.headers.get("ETag") == 'W/"1"'

    # update through the library: PUT Patient/{id}
    patient["name"] = [{"family": "King", "given": ["Ada", "Augusta"]}]
    patient["telecom"] = [{"system": "email", "value": "ada@example.org"}]
    patient.save()
    assert patient.id == pid
    assert patient["meta"]["versionId"] == "2"

    got2 = client.reference("Patient", pid).to_resource()
    assert got2["meta"]["versionId"] == "2"
    assert got2["name"] == [{"family": "King", "given": ["Ada", "Augusta"]}]
    assert got2["telecom"] == [{"system": "email", "value": "ada@example.org"}]
    r = raw(server, "GET", f"Patient/{pid}", token["access_token"])
    assert r.headers.get("ETag") == 'W/"2"'

    # history: two versions, newest first
    hist = client.execute(f"Patient/{pid}/_history", method="get")
    assert hist["resourceType"] == "Bundle"
    assert hist["type"] == "history"
    entries = hist.get("entry", [])
    assert len(entries) == 2, json.dumps(hist, indent=1)
    versions = sorted(e["resource"]["meta"]["versionId"] for e in entries)
    assert versions == ["1", "2"]
    if "total" in hist:
        assert hist["total"] == 2

    # vread version 1: the original content
    v1 = client.execute(f"Patient/{pid}/_history/1", method="get")
    assert v1["id"] == pid
    assert v1["meta"]["versionId"] == "1"
    assert v1["name"] == [{"family": "Lovelace", "given": ["Ada"]}]
    assert "telecom" not in v1

    # delete, then a read reports 410 Gone and the count is 0
    patient.delete()
    assert by_mrn.count() == 0
    with pytest.raises(ResourceNotFound):
        client.get("Patient", pid)
    r = raw(server, "GET", f"Patient/{pid}", token["access_token"])
    assert r.status_code == 410, f"{r.status_code} {r.text}"


def test_update_with_if_match(server: Server, client: SyncFHIRClient, token: dict):
    patient = client.resource("Patient", name=[{"family": "Hopper", "given": ["Grace"]}])
    patient.save()
    pid = patient.id
    body = client.get("Patient", pid)
    body = dict(body)
    body["gender"] = "female"
    # stale version -> 412
    r = raw(
        server,
        "PUT",
        f"Patient/{pid}",
        token["access_token"],
        headers={"Content-Type": "application/fhir+json", "If-Match": 'W/"7"'},
        data=json.dumps(body),
    )
    assert r.status_code == 412, f"{r.status_code} {r.text}"
    # current version -> 200 and version 2
    r = raw(
        server,
        "PUT",
        f"Patient/{pid}",
        token["access_token"],
        headers={"Content-Type": "application/fhir+json", "If-Match": 'W/"1"'},
        data=json.dumps(body),
    )
    assert r.status_code == 200, f"{r.status_code} {r.text}"
    assert r.headers.get("ETag") == 'W/"2"'
    assert client.get("Patient", pid)["gender"] == "female"


def test_transaction_rewrites_urn_uuid_references(client: SyncFHIRClient):
    patient_urn = f"urn:uuid:{uuid.uuid4()}"
    obs_urn = f"urn:uuid:{uuid.uuid4()}"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": patient_urn,
                "resource": {
                    "resourceType": "Patient",
                    "name": [{"family": "Turing", "given": ["Alan"]}],
                    "birthDate": "1912-06-23",
                },
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "fullUrl": obs_urn,
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {
                        "coding": [
                            {"system": "http://loinc.org", "code": "8302-2", "display": "Body height"}
                        ]
                    },
                    "subject": {"reference": patient_urn},
                    "valueQuantity": {
                        "value": 180,
                        "unit": "cm",
                        "system": "http://unitsofmeasure.org",
                        "code": "cm",
                    },
                },
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    resp = client.execute("/", method="post", data=bundle)
    assert resp["resourceType"] == "Bundle"
    assert resp["type"] == "transaction-response"
    entries = resp["entry"]
    assert len(entries) == 2
    for e in entries:
        assert e["response"]["status"].startswith("201"), e["response"]

    def id_from_location(loc: str, rtype: str) -> str:
        # Location: [base/]Type/id/_history/vid
        parts = loc.split("/")
        i = parts.index(rtype)
        return parts[i + 1]

    patient_id = id_from_location(entries[0]["response"]["location"], "Patient")
    obs_id = id_from_location(entries[1]["response"]["location"], "Observation")

    obs = client.get("Observation", obs_id)
    assert obs["subject"]["reference"] == f"Patient/{patient_id}"
    assert obs["valueQuantity"]["value"] == 180

    # fhirpy resolves the rewritten reference to the created Patient
    pat = client.reference(reference=obs["subject"]["reference"]).to_resource()
    assert pat["id"] == patient_id
    assert pat["name"][0]["family"] == "Turing"


def test_batch_bundle(client: SyncFHIRClient):
    created = client.resource("Patient", name=[{"family": "Noether"}])
    created.save()
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": f"Patient/{created.id}"}},
            {"request": {"method": "GET", "url": f"Patient/{uuid.uuid4()}"}},
        ],
    }
    resp = client.execute("/", method="post", data=bundle)
    assert resp["type"] == "batch-response"
    assert resp["entry"][0]["response"]["status"].startswith("200")
    assert resp["entry"][0]["resource"]["id"] == created.id
    assert resp["entry"][1]["response"]["status"].startswith("404")


# ---------------------------------------------------------------- negative cases


def test_no_token_is_401_with_operation_outcome(server: Server):
    r = raw(server, "GET", f"Patient/{uuid.uuid4()}")
    assert r.status_code == 401, f"{r.status_code} {r.text}"
    assert "Bearer" in r.headers.get("WWW-Authenticate", "")
    assert r.json()["resourceType"] == "OperationOutcome"
    # and the library surfaces it as an authorization error
    anon = fhir_client(server, None)
    with pytest.raises(AuthorizationError):
        anon.resource("Patient", name=[{"family": "Nobody"}]).save()


def test_garbage_token_is_401(server: Server):
    r = raw(server, "GET", f"Patient/{uuid.uuid4()}", "not-a-real-token")
    assert r.status_code == 401, f"{r.status_code} {r.text}"
    assert r.json()["resourceType"] == "OperationOutcome"


def test_replayed_assertion_is_invalid_client(server: Server):
    aud = smart_config(server)["token_endpoint"]
    assertion = make_assertion(server.creds, aud)
    first = token_request(server, assertion)
    assert first.status_code == 200, first.text
    again = token_request(server, assertion)
    assert again.status_code in (400, 401), f"{again.status_code} {again.text}"
    assert again.json()["error"] == "invalid_client"
    assert "access_token" not in again.json()


def test_wrong_audience_is_invalid_client(server: Server):
    assertion = make_assertion(server.creds, f"{server.origin}/not/the/token/endpoint")
    r = token_request(server, assertion)
    assert r.status_code in (400, 401), f"{r.status_code} {r.text}"
    assert r.json()["error"] == "invalid_client"


def test_assertion_signed_by_other_key_is_invalid_client(server: Server):
    from cryptography.hazmat.primitives.asymmetric import ec

    aud = smart_config(server)["token_endpoint"]
    now = int(time.time())
    other = ec.generate_private_key(ec.SECP384R1())
    claims = {
        "iss": server.creds["client_id"],
        "sub": server.creds["client_id"],
        "aud": aud,
        "iat": now,
        "exp": now + 240,
        "jti": str(uuid.uuid4()),
    }
    forged = jwt.encode(
        claims, other, algorithm="ES384", headers={"kid": server.creds["private_jwk"]["kid"]}
    )
    r = token_request(server, forged)
    assert r.status_code in (400, 401), f"{r.status_code} {r.text}"
    assert r.json()["error"] == "invalid_client"


def test_narrow_scope_cannot_create_observation(server: Server):
    narrow = get_token(server, scope="system/Patient.rs")
    assert "Observation" not in narrow["scope"]
    assert "system/*" not in narrow["scope"]
    limited = fhir_client(server, narrow["access_token"])

    # reading a Patient is within scope
    full = fhir_client(server, get_token(server)["access_token"])
    p = full.resource("Patient", name=[{"family": "Scoped"}])
    p.save()
    assert limited.get("Patient", p.id)["id"] == p.id

    obs = limited.resource(
        "Observation",
        status="final",
        code={"text": "heart rate"},
        subject={"reference": f"Patient/{p.id}"},
    )
    with pytest.raises(ForbiddenError):
        obs.save()
    # and neither may it create a Patient (no `c` in Patient.rs)
    with pytest.raises(ForbiddenError):
        limited.resource("Patient", name=[{"family": "Denied"}]).save()

    r = raw(
        server,
        "POST",
        "Observation",
        narrow["access_token"],
        headers={"Content-Type": "application/fhir+json"},
        data=json.dumps(obs.serialize()),
    )
    assert r.status_code == 403, f"{r.status_code} {r.text}"
    assert r.json()["resourceType"] == "OperationOutcome"
