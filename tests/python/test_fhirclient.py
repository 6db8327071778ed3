"""The SMART on FHIR Python client (`fhirclient`, PyPI) against the real phivault binary.

fhirclient is used as published: its strict R4 models parse every response (the
CapabilityStatement, Bundles, resources), its search builder writes the queries and it
follows `next` links itself. Only its HTTP session is configured: the bearer token
(obtained with a PyJWT client assertion, as in test_backend_services.py) and trust in the
data directory's CA. Covered: read, search (`where(...).perform_resources`), paging,
counts (`_count=0`, `_summary=count`), `_include`, create, update, delete, a transaction
Bundle posted through the client's server object, and the `self` link of every page.
"""

from __future__ import annotations

import uuid
import warnings

import pytest
import requests
from fhirclient import client as smart_client
from fhirclient.models.bundle import Bundle, BundleEntry, BundleEntryRequest
from fhirclient.models.observation import Observation
from fhirclient.models.patient import Patient
from fhirclient.server import FHIRNotFoundException, FHIRServer

from test_backend_services import get_token, running_server

# fhirclient 4.4 marks `perform()`/`perform_resources()` deprecated in favour of the
# iterators; both are exercised here
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CODE = "fhirclient-7"  # Observations of this code: 7 about `first`, none about others
OTHER = "fhirclient-3"  # 3 about `second`


@pytest.fixture(scope="module")
def server():
    with running_server("phivault-fhirclient-", "pytest-fhirclient") as s:
        yield s


@pytest.fixture(scope="module")
def smart(server):
    """A FHIRClient whose FHIRServer session carries a Backend Services token and trusts
    only the data directory's CA."""
    token = get_token(server)["access_token"]
    c = smart_client.FHIRClient(settings={"app_id": "phivault-pytest", "api_base": server.fhir_base})
    session = c.server.session
    session.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would override verify
    session.verify = server.ca_path
    session.headers["Authorization"] = f"Bearer {token}"
    return c


@pytest.fixture(scope="module")
def fhir(smart) -> FHIRServer:
    return smart.server


def _create(resource, fhir: FHIRServer) -> dict:
    """Create through the client; the server's answer (the stored resource)."""
    created = resource.create(fhir)
    assert created and created.get("id"), created
    return created


@pytest.fixture(scope="module")
def world(fhir):
    """Two patients; 7 Observations of CODE about the first, 3 of OTHER about the second."""
    first = _create(Patient({"name": [{"family": "Client-Smart", "given": ["Ada"]}], "gender": "female"}), fhir)
    second = _create(Patient({"name": [{"family": "Client-Other"}], "gender": "male"}), fhir)
    obs = {CODE: [], OTHER: []}
    for code, who, n in [(CODE, first, 7), (OTHER, second, 3)]:
        for i in range(n):
            o = Observation({
                "status": "final",
                "code": {"coding": [{"system": "urn:example:codes", "code": code}]},
                "subject": {"reference": f"Patient/{who['id']}"},
                "valueQuantity": {"value": 60 + i, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"},
            })
            obs[code].append(_create(o, fhir)["id"])
    return {"first": first["id"], "second": second["id"], "obs": obs}


def ids(resources) -> list[str]:
    return [f"{r.resource_type}/{r.id}" for r in resources]


def link(bundle: Bundle, rel: str) -> str | None:
    return next((l.url for l in bundle.link or [] if l.relation == rel), None)


# ------------------------------------------------------------------ the client's view


def test_capability_statement_parses_in_the_client_models(fhir):
    cs = fhir.capabilityStatement
    assert cs.fhirVersion.startswith("4.0")
    rest = cs.rest[0]
    # the SMART oauth-uris extension is read by the client
    assert fhir.auth is not None
    assert {p.name for p in rest.searchParam or []} >= {"_count", "_total", "_totalMethod", "_summary"}
    patient = next(r for r in rest.resource if r.type == "Patient")
    assert "search-type" in {i.code for i in patient.interaction}


def test_create_read_update_delete(fhir):
    mrn = f"MRN-{uuid.uuid4()}"
    created = _create(Patient({
        "name": [{"family": "Hamilton", "given": ["Margaret"]}],
        "identifier": [{"system": "urn:example:mrn", "value": mrn}],
        "birthDate": "1936-08-17",
    }), fhir)
    pid = created["id"]
    assert created["meta"]["versionId"] == "1"

    p = Patient.read(pid, fhir)
    assert p.id == pid
    assert p.name[0].family == "Hamilton"
    assert p.birthDate.isostring == "1936-08-17"
    assert p.meta.versionId == "1"

    p.gender = "female"
    p.name[0].given = ["Margaret", "Heafield"]
    updated = p.update()
    assert updated["meta"]["versionId"] == "2"
    again = Patient.read(pid, fhir)
    assert again.gender == "female" and again.name[0].given == ["Margaret", "Heafield"]

    found = Patient.where({"identifier": f"urn:example:mrn|{mrn}"}).perform_resources(fhir)
    assert ids(found) == [f"Patient/{pid}"]

    again.delete()
    with pytest.raises(requests.HTTPError) as gone:
        Patient.read(pid, fhir)
    assert gone.value.response.status_code == 410
    assert Patient.where({"identifier": f"urn:example:mrn|{mrn}"}).perform_resources(fhir) == []
    with pytest.raises(FHIRNotFoundException):
        Patient.read(str(uuid.uuid4()), fhir)


def test_search_with_where(fhir, world):
    got = Observation.where({"code": CODE}).perform_resources(fhir)
    assert sorted(ids(got)) == sorted(f"Observation/{i}" for i in world["obs"][CODE])
    got = Observation.where({"subject": f"Patient/{world['second']}"}).perform_resources(fhir)
    assert sorted(ids(got)) == sorted(f"Observation/{i}" for i in world["obs"][OTHER])
    # an OR list and an AND of two parameters, as the client's query language writes them
    got = Observation.where({"code": {"$or": [CODE, OTHER]}}).perform_resources(fhir)
    assert len(got) == 10
    got = Patient.where({"family": "Client-", "gender": "male"}).perform_resources(fhir)
    assert ids(got) == [f"Patient/{world['second']}"]
    # the client's :exact modifier
    got = Patient.where({"family": {"$exact": "Client-Smart"}}).perform_resources(fhir)
    assert ids(got) == [f"Patient/{world['first']}"]


def test_paging_follows_next_links(fhir, world):
    search = Observation.where({"code": CODE, "_count": "2"})
    bundles = list(search.perform_iter(fhir))
    assert len(bundles) == 4, [len(b.entry or []) for b in bundles]
    seen = [f"Observation/{e.resource.id}" for b in bundles for e in b.entry or []]
    assert len(seen) == len(set(seen)) == 7
    assert sorted(seen) == sorted(f"Observation/{i}" for i in world["obs"][CODE])
    # the iterator of resources walks the same pages
    assert sorted(ids(search.perform_resources_iter(fhir))) == sorted(seen)
    # perform() is the first page, with a next link the client can follow
    first = search.perform(fhir)
    assert len(first.entry) == 2 and link(first, "next")
    # every page's self link names that page: reading it gives the same entries
    for b in bundles:
        own = link(b, "self")
        assert own and own.startswith(f"{fhir.base_uri}Observation?"), own
        same = Bundle.read_from(own, fhir)
        assert [e.resource.id for e in same.entry or []] == [e.resource.id for e in b.entry or []]
    assert link(bundles[0], "self") == f"{fhir.base_uri}Observation?_count=2&code={CODE}"


def test_counts(fhir, world):
    for query, want in [
        ({"code": CODE, "_count": "0"}, 7),
        ({"code": OTHER, "_count": "0"}, 3),
        ({"code": CODE, "_summary": "count"}, 7),
        ({"subject": f"Patient/{world['first']}", "_count": "0", "_totalMethod": "count"}, 7),
    ]:
        b = next(Observation.where(query).perform_iter(fhir))
        assert b.type == "searchset"
        assert b.total == want, query
        assert not b.entry, query
        assert link(b, "next") is None
    # a total beside a page
    b = next(Observation.where({"code": CODE, "_count": "3", "_total": "accurate"}).perform_iter(fhir))
    assert b.total == 7 and len(b.entry) == 3


def test_include(fhir, world):
    search = Observation.where({"code": OTHER}).include("subject")
    b = search.perform(fhir)
    modes = {}
    for e in b.entry:
        modes.setdefault(e.search.mode, set()).add(f"{e.resource.resource_type}/{e.resource.id}")
    assert modes["match"] == {f"Observation/{i}" for i in world["obs"][OTHER]}
    assert modes["include"] == {f"Patient/{world['second']}"}
    assert len(search.perform_resources(fhir)) == 4
    # a reverse include from the patient's side
    rev = Patient.where({"_id": world["first"]}).include("subject", Observation, reverse=True)
    got = ids(rev.perform_resources(fhir))
    assert got.count(f"Patient/{world['first']}") == 1 and len(got) == 8


def test_transaction_through_the_server_object(fhir):
    patient_urn = f"urn:uuid:{uuid.uuid4()}"
    tx = Bundle({"type": "transaction"})
    p = BundleEntry({"fullUrl": patient_urn})
    p.resource = Patient({"name": [{"family": "Shannon", "given": ["Claude"]}]})
    p.request = BundleEntryRequest({"method": "POST", "url": "Patient"})
    o = BundleEntry({"fullUrl": f"urn:uuid:{uuid.uuid4()}"})
    o.resource = Observation({
        "status": "final",
        "code": {"text": "bits"},
        "subject": {"reference": patient_urn},
    })
    o.request = BundleEntryRequest({"method": "POST", "url": "Observation"})
    tx.entry = [p, o]
    assert tx.createPath() is None  # the client posts it to the base itself
    answer = Bundle(tx.create(fhir))
    assert answer.type == "transaction-response"
    assert [e.response.status[:3] for e in answer.entry] == ["201", "201"]
    pid = answer.entry[0].response.location.split("Patient/")[1].split("/")[0]
    oid = answer.entry[1].response.location.split("Observation/")[1].split("/")[0]
    obs = Observation.read(oid, fhir)
    assert obs.subject.reference == f"Patient/{pid}"
    assert Patient.read(pid, fhir).name[0].family == "Shannon"
    # the server object's raw JSON calls work too
    assert fhir.request_json(f"Patient/{pid}")["id"] == pid
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = Observation.where({"subject": f"Patient/{pid}"}).perform(fhir)
    assert [e.resource.id for e in b.entry] == [oid]
