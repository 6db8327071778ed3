//! The CapabilityStatement and SMART configuration: they declare exactly what the router serves (API9).

use serde_json::{Value, json};

/// Interactions served for every resource type.
pub const TYPE_INTERACTIONS: &[&str] = &[
    "read",
    "vread",
    "update",
    "delete",
    "create",
    "history-instance",
    "history-type",
    "search-type",
];

fn type_code(t: phivault_fhir::search::ParamType) -> &'static str {
    use phivault_fhir::search::ParamType::*;
    match t {
        Number => "number",
        Date => "date",
        String => "string",
        Token => "token",
        Reference => "reference",
        Composite => "composite",
        Quantity => "quantity",
        Uri => "uri",
        Special => "special",
    }
}

/// `_include` values of a type (`Type:param`), or `_revinclude` values naming it.
fn search_refs(t: &str, rev: bool) -> Vec<String> {
    use phivault_fhir::search::{ParamType, search_params};
    if !rev {
        return search_params(t)
            .iter()
            .filter(|p| p.ptype == ParamType::Reference)
            .map(|p| format!("{t}:{}", p.code))
            .collect();
    }
    let mut out = Vec::new();
    for s in phivault_fhir::resource_types() {
        for p in search_params(s) {
            if p.ptype == ParamType::Reference && p.targets.iter().any(|x| x == t) {
                out.push(format!("{s}:{}", p.code));
            }
        }
    }
    out
}

/// The result parameters every search takes (declared once, for all types), with what
/// the server does with them (includes are declared per type: `searchInclude`).
fn result_params() -> Value {
    let count = format!(
        "Page size: default {}, at most {} (larger values are capped). _count=0 answers with Bundle.total alone (the exact number of matches the client may see) and no entries, as _summary=count does.",
        phivault_fhir::search::DEFAULT_COUNT,
        phivault_fhir::search::MAX_COUNT
    );
    json!([
        {"name": "_count", "type": "number", "documentation": count},
        {"name": "_total", "type": "token", "documentation": "none | estimate | accurate: estimate is answered exactly; a total counts only what the client may see."},
        {"name": "_totalMethod", "type": "token", "documentation": "count | accurate | estimate | none, as some clients send it (fhirpy's count()): the same as _total."},
        {"name": "_summary", "type": "token", "documentation": "count (Bundle.total alone) or false; other summaries are refused."},
        {"name": "_sort", "type": "string", "documentation": "Comma-separated parameters, - for descending; _lastUpdated and _id too."},
        {"name": "_elements", "type": "string", "documentation": "Top-level elements to return (entries are marked SUBSETTED)."},
    ])
}

/// `GET /fhir/metadata`.
pub fn capability_statement(base_url: &str, token_url: &str) -> Value {
    let resources: Vec<Value> = phivault_fhir::resource_types()
        .map(|t| {
            if t == phivault_auth::policy::AUDIT_EVENT {
                // the audit log, read-only, for auditors (`audit_http`)
                return json!({
                    "type": t,
                    "interaction": [{"code": "read"}, {"code": "search-type"}],
                    "searchParam": [
                        {"name": "patient", "type": "reference"},
                        {"name": "user", "type": "token"},
                        {"name": "client", "type": "token"},
                        {"name": "action", "type": "token"},
                    ],
                });
            }
            json!({
                "type": t,
                "interaction": TYPE_INTERACTIONS.iter().map(|i| json!({"code": i})).collect::<Vec<_>>(),
                "versioning": "versioned-update",
                "readHistory": true,
                "updateCreate": true,
                "conditionalRead": "not-supported",
                "conditionalUpdate": false,
                "conditionalDelete": "not-supported",
                "conditionalCreate": true,
                "searchInclude": search_refs(t, false),
                "searchRevInclude": search_refs(t, true),
                "searchParam": phivault_fhir::search::search_params(t)
                    .iter()
                    .map(|p| json!({"name": p.code, "type": type_code(p.ptype)}))
                    .collect::<Vec<_>>(),
                "operation": if t == "Patient" {
                    json!([{"name": "everything", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything"}])
                } else {
                    json!([])
                }
            })
        })
        .collect();
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-23",
        "publisher": "phivault",
        "kind": "instance",
        "software": {"name": "phivault", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "phivault FHIR R4 server", "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["json", "application/fhir+json"],
        "rest": [{
            "mode": "server",
            "security": {
                "cors": false,
                "service": [{
                    "coding": [{
                        "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                        "code": "SMART-on-FHIR"
                    }]
                }],
                "extension": [{
                    "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                    "extension": [{"url": "token", "valueUri": token_url}]
                }],
                "description": "OAuth 2 bearer tokens (SMART Backend Services, private_key_jwt with ES384/RS384) are required on every route but /metadata and /.well-known/*. A record belongs, for access, to the one patient it is about (the patient whose key seals it: its subject/patient); being named as performer, author, recipient or other participant does not open it for that patient or for those who treat them. This deliberately narrows the Patient compartment: Patient/{id}/{type}, $everything and patient-confined searches list the records that belong to that patient. References to this server's own absolute base are stored relative; other servers' references are in no compartment."
            },
            "resource": resources,
            "interaction": [{"code": "transaction"}, {"code": "batch"}],
            "searchParam": result_params()
        }]
    })
}

/// `GET /.well-known/smart-configuration`: only what is supported.
pub fn smart_configuration(origin: &str, token_url: &str) -> Value {
    json!({
        "issuer": origin,
        "jwks_uri": format!("{origin}/.well-known/jwks.json"),
        "token_endpoint": token_url,
        "authorization_endpoint": format!("{origin}/auth/authorize"),
        "revocation_endpoint": format!("{origin}/auth/revoke"),
        "introspection_endpoint": format!("{origin}/auth/introspect"),
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "none"],
        "token_endpoint_auth_signing_alg_values_supported": ["ES384", "RS384"],
        "grant_types_supported": ["client_credentials", "authorization_code", "refresh_token"],
        "code_challenge_methods_supported": ["S256"],
        "dpop_signing_alg_values_supported": ["ES256", "ES384", "EdDSA"],
        "scopes_supported": [
            "system/*.cruds", "system/*.rs", "system/*.read", "system/*.write",
            "patient/*.rs", "user/*.rs", "launch/patient", "openid", "fhirUser",
            "offline_access", "online_access"
        ],
        "response_types_supported": ["code"],
        "id_token_signing_alg_values_supported": ["EdDSA"],
        "capabilities": [
            "client-confidential-asymmetric", "client-public", "launch-standalone",
            "context-standalone-patient", "permission-v2", "permission-patient",
            "permission-user", "permission-offline", "permission-online",
            "sso-openid-connect"
        ]
    })
}
