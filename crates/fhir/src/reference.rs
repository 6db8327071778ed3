//! Walking `reference` strings.

use serde_json::Value;

/// Visit every `reference` string — any object key `"reference"` whose value is a string, at
/// any depth, including contained resources and Bundle entries — mutably.
///
/// Iterative (explicit stack), so arbitrarily deep values cannot overflow the call stack.
pub fn for_each_reference_mut(resource: &mut Value, f: &mut dyn FnMut(&mut String)) {
    let mut stack: Vec<&mut Value> = vec![resource];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(map) => {
                for (k, child) in map.iter_mut() {
                    match child {
                        Value::String(s) if k == "reference" => f(s),
                        Value::Object(_) | Value::Array(_) => stack.push(child),
                        _ => {}
                    }
                }
            }
            Value::Array(items) => {
                for child in items.iter_mut() {
                    if matches!(child, Value::Object(_) | Value::Array(_)) {
                        stack.push(child);
                    }
                }
            }
            _ => {}
        }
    }
}

/// A server's own FHIR base URL, to recognise references spelled as absolute URLs to it.
///
/// FHIR treats a reference to the server's own base as local. Every spelling that reaches
/// this server is recognised: either scheme, any case of the host, the default port left
/// out, userinfo, and — for a loopback base — any loopback name. A reference at this
/// server's authority localises to `Type/id` (or `Type/id/_history/v`) only when its path is
/// exactly that below the base path; any other path, a query, a fragment, dot segments,
/// empty segments or percent-escapes on this authority cannot be resolved safely and are
/// refused.
#[derive(Debug, Clone)]
pub struct LocalBase {
    /// Lower-case `host:port` spellings of this server.
    authorities: Vec<String>,
    /// The base path, e.g. `/fhir` (no trailing slash).
    path: String,
}

/// A reference that names this server but not as `Type/id[/_history/v]` below its base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnresolvableLocal;

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host == "[::1]"
        || host.strip_prefix("127.").is_some_and(|r| {
            r.split('.').count() == 3 && r.split('.').all(|o| o.parse::<u8>().is_ok())
        })
}

/// `scheme://[userinfo@]host[:port]/path…` → (lower-case `host:port`, rest from the path on).
fn split_url(url: &str) -> Option<(String, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "https" => "443",
        "http" => "80",
        _ => return None,
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let authority = authority.to_ascii_lowercase();
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !p.contains(']') => (h.to_owned(), p.to_owned()),
        _ => (authority.clone(), default_port.to_owned()),
    };
    let host = host.trim_end_matches('.').to_owned();
    let port = port.trim_start_matches('0');
    let port = if port.is_empty() { "0" } else { port };
    Some((format!("{host}:{port}"), tail))
}

impl LocalBase {
    /// The base of `base_url` (`https://host:port/path`); None when it is not such a URL.
    pub fn new(base_url: &str) -> Option<LocalBase> {
        let (authority, path) = split_url(base_url)?;
        let (host, port) = authority.rsplit_once(':')?;
        let mut authorities = vec![authority.clone()];
        if is_loopback(host) {
            for h in ["localhost", "127.0.0.1", "[::1]"] {
                authorities.push(format!("{h}:{port}"));
            }
        }
        Some(LocalBase {
            authorities,
            path: path.trim_end_matches('/').to_owned(),
        })
    }

    /// `Ok(Some(relative))` for a reference to a resource of this server, `Ok(None)` for
    /// any reference that does not name this server (relative, `urn:`, `#`, another host),
    /// `Err` for one that names this server but not a resource as `Type/id[/_history/v]`.
    pub fn localize(&self, reference: &str) -> Result<Option<String>, UnresolvableLocal> {
        let Some((authority, tail)) = split_url(reference) else {
            return Ok(None);
        };
        let (host, port) = authority.rsplit_once(':').unwrap_or((&authority, ""));
        let ours = self.authorities.contains(&authority)
            || (is_loopback(host)
                && self.authorities.iter().any(|a| {
                    a.rsplit_once(':')
                        .is_some_and(|(h, p)| is_loopback(h) && p == port)
                }));
        if !ours {
            return Ok(None);
        }
        let rel = tail
            .strip_prefix(self.path.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or(UnresolvableLocal)?;
        let segs: Vec<&str> = rel.split('/').collect();
        let ok = match segs.as_slice() {
            [t, id] => crate::is_known_resource_type(t) && crate::is_valid_id(id),
            [t, id, h, v] => {
                crate::is_known_resource_type(t)
                    && crate::is_valid_id(id)
                    && *h == "_history"
                    && crate::is_valid_id(v)
            }
            _ => false,
        };
        if ok {
            Ok(Some(rel.to_owned()))
        } else {
            Err(UnresolvableLocal)
        }
    }
}

/// Rewrite every reference to this server's own base (see [`LocalBase`]) to its relative
/// form, in place; refuse (leaving the value partly rewritten) when one cannot be resolved.
pub fn localize_references(
    resource: &mut Value,
    base: &LocalBase,
) -> Result<(), UnresolvableLocal> {
    let mut bad = false;
    for_each_reference_mut(resource, &mut |r: &mut String| match base.localize(r) {
        Ok(Some(rel)) => *r = rel,
        Ok(None) => {}
        Err(_) => bad = true,
    });
    if bad { Err(UnresolvableLocal) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn own_base_spellings_localise_and_others_do_not() {
        let b = LocalBase::new("https://localhost:8443/fhir").unwrap();
        let ok = |r: &str| b.localize(r);
        assert_eq!(
            ok("https://localhost:8443/fhir/Patient/b"),
            Ok(Some("Patient/b".into()))
        );
        assert_eq!(
            ok("HTTPS://LocalHost:8443/fhir/Patient/b"),
            Ok(Some("Patient/b".into()))
        );
        assert_eq!(
            ok("http://127.0.0.1:8443/fhir/Patient/b"),
            Ok(Some("Patient/b".into()))
        );
        assert_eq!(
            ok("https://[::1]:8443/fhir/Patient/b"),
            Ok(Some("Patient/b".into()))
        );
        assert_eq!(
            ok("https://u@127.0.0.2:08443/fhir/Patient/b"),
            Ok(Some("Patient/b".into()))
        );
        assert_eq!(
            ok("https://localhost.:8443/fhir/Patient/b/_history/2"),
            Ok(Some("Patient/b/_history/2".into()))
        );
        assert_eq!(ok("Patient/b"), Ok(None));
        assert_eq!(ok("urn:uuid:1"), Ok(None));
        assert_eq!(ok("https://other.example/fhir/Patient/b"), Ok(None));
        assert_eq!(ok("https://localhost:9443/fhir/Patient/b"), Ok(None));
        for bad in [
            "https://localhost:8443/fhir/Patient/b?x=1",
            "https://localhost:8443/fhir/Patient/b#x",
            "https://localhost:8443/fhir//Patient/b",
            "https://localhost:8443/fhir/./Patient/b",
            "https://localhost:8443/x/../fhir/Patient/b",
            "https://localhost:8443/fhir/Patient/%62",
            "https://localhost:8443/fhir/Nope/b",
            "https://localhost:8443/fhir/Patient/b/_history",
            "https://localhost:8443/other/Patient/b",
            "https://localhost:8443/fhirx/Patient/b",
        ] {
            assert_eq!(ok(bad), Err(UnresolvableLocal), "{bad}");
        }
        let public = LocalBase::new("https://fhir.example.org/fhir").unwrap();
        assert_eq!(
            public.localize("https://FHIR.example.org:443/fhir/Observation/1"),
            Ok(Some("Observation/1".into()))
        );
        assert_eq!(
            public.localize("https://localhost/fhir/Observation/1"),
            Ok(None)
        );
    }

    #[test]
    fn localise_rewrites_in_place_and_refuses_the_unresolvable() {
        let b = LocalBase::new("https://h:1/fhir").unwrap();
        let mut v = json!({"subject": {"reference": "https://h:1/fhir/Patient/b"},
                           "performer": [{"reference": "Patient/a"}]});
        assert_eq!(localize_references(&mut v, &b), Ok(()));
        assert_eq!(v["subject"]["reference"], "Patient/b");
        let mut v = json!({"subject": {"reference": "https://h:1/fhir/Patient/b?x"}});
        assert_eq!(localize_references(&mut v, &b), Err(UnresolvableLocal));
    }

    #[test]
    fn rewrites_all_references() {
        let mut v = json!({
            "resourceType": "Observation",
            "subject": {"reference": "urn:uuid:1"},
            "performer": [{"reference": "urn:uuid:2"}, {"display": "x"}],
            "contained": [{"resourceType": "Provenance", "target": [{"reference": "urn:uuid:1"}]}],
            "note": [{"text": "reference"}],
            "extension": [{"url": "u", "valueReference": {"reference": "Patient/9"}}],
            "reference": 5
        });
        let mut seen = 0;
        for_each_reference_mut(&mut v, &mut |s| {
            seen += 1;
            if s == "urn:uuid:1" {
                *s = "Patient/abc".into();
            }
        });
        assert_eq!(seen, 4);
        assert_eq!(v["subject"]["reference"], "Patient/abc");
        assert_eq!(v["contained"][0]["target"][0]["reference"], "Patient/abc");
        assert_eq!(v["performer"][0]["reference"], "urn:uuid:2");
        assert_eq!(v["reference"], 5);
    }

    #[test]
    fn deep_value_no_overflow() {
        let mut v = json!({"reference": "a"});
        for _ in 0..2_000 {
            v = Value::Array(vec![v]);
        }
        let mut n = 0;
        for_each_reference_mut(&mut v, &mut |_| n += 1);
        assert_eq!(n, 1);
        // Drop a deep value iteratively-ish: serde_json's drop is recursive, so unwind manually.
        while let Value::Array(mut a) = v {
            v = a.pop().unwrap_or(Value::Null);
        }
    }
}
