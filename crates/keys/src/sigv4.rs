//! AWS Signature Version 4 (header form), with ring's SHA-256 and HMAC-SHA256: the few
//! signed requests of the `aws-kms` provider, without the AWS SDK (which would bring a
//! second crypto and TLS stack). Checked against AWS's published SigV4 test-suite vectors
//! ("get-vanilla", "post-vanilla", "get-vanilla-query-order-key-case",
//! "post-x-www-form-urlencoded") and the IAM `ListUsers` worked example of AWS's
//! documentation.
//!
//! Scope: the caller gives the canonical URI already encoded (our KMS requests go to `/`;
//! S3's is [`uri_encode`]d once per segment) and a query of `name=value` pairs already
//! encoded (values with [`uri_encode`], `/` included); every header given is signed. S3
//! also wants the payload's hash in the signed `x-amz-content-sha256` header:
//! [`sign_with_payload_hash`] takes it precomputed. Also checked against the S3 examples
//! of AWS's documentation (GET object, PUT object, GET bucket lifecycle, ListObjects).

use ring::{digest, hmac};
use zeroize::Zeroizing;

/// AWS credentials. The secret and the session token are wiped on drop; `Debug` shows
/// neither.
#[derive(Clone)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: Zeroizing<String>,
    pub session_token: Option<Zeroizing<String>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// One request to sign.
pub struct Request<'a> {
    pub method: &'a str,
    /// The canonical URI (already URI-encoded), e.g. `/`.
    pub path: &'a str,
    /// The query string (already encoded), without `?`; sorted here.
    pub query: &'a str,
    /// Every header sent that is to be signed (at least `host` and `x-amz-date`).
    pub headers: &'a [(&'a str, &'a str)],
    pub payload: &'a [u8],
}

/// The signature's parts (the intermediate strings for tests and diagnostics).
#[derive(Debug)]
pub struct Signed {
    pub canonical_request: String,
    pub string_to_sign: String,
    pub signed_headers: String,
    pub signature: String,
    /// The `Authorization` header's value.
    pub authorization: String,
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, data).as_ref())
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Zeroizing<Vec<u8>> {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    Zeroizing::new(hmac::sign(&k, data).as_ref().to_vec())
}

/// `YYYYMMDDTHHMMSSZ` for seconds since the epoch (UTC).
pub fn amz_date(unix_secs: u64) -> String {
    let days = i64::try_from(unix_secs / 86_400).unwrap_or(0);
    let rem = unix_secs % 86_400;
    // civil date from days since 1970-01-01 (H. Hinnant's algorithm)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// AWS's URI encoding: every byte but `A-Za-z0-9-._~` as `%XX` (upper case); `/` kept
/// unless `encode_slash`.
pub fn uri_encode(s: &str, encode_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (b == b'/' && !encode_slash) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(&str, &str)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect();
    pairs.sort_unstable();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// Sign `req` for `region`/`service` at `amz_date` (which must be the request's
/// `x-amz-date` header).
pub fn sign(
    creds: &Credentials,
    region: &str,
    service: &str,
    amz_date: &str,
    req: &Request<'_>,
) -> Signed {
    sign_with_payload_hash(
        creds,
        region,
        service,
        amz_date,
        req,
        &sha256_hex(req.payload),
    )
}

/// [`sign`] with the payload's hex SHA-256 given (`req.payload` is then not read): a large
/// body hashed once for both the signature and S3's `x-amz-content-sha256` header.
pub fn sign_with_payload_hash(
    creds: &Credentials,
    region: &str,
    service: &str,
    amz_date: &str,
    req: &Request<'_>,
    payload_hash: &str,
) -> Signed {
    // canonical headers: lowercase names, trimmed values with inner runs of spaces
    // collapsed, sorted by name, repeated names joined by commas
    let mut headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|(n, v)| {
            (
                n.to_ascii_lowercase(),
                v.split_whitespace().collect::<Vec<_>>().join(" "),
            )
        })
        .collect();
    headers.sort_by(|a, b| a.0.cmp(&b.0));
    let mut merged: Vec<(String, String)> = Vec::new();
    for (n, v) in headers {
        match merged.last_mut() {
            Some((last, value)) if *last == n => {
                value.push(',');
                value.push_str(&v);
            }
            _ => merged.push((n, v)),
        }
    }
    let canonical_headers: String = merged.iter().map(|(n, v)| format!("{n}:{v}\n")).collect();
    let signed_headers = merged
        .iter()
        .map(|(n, _)| n.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let canonical_request = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        req.method.to_ascii_uppercase(),
        req.path,
        canonical_query(req.query),
        canonical_headers,
        signed_headers,
        payload_hash
    );
    let date = amz_date.get(..8).unwrap_or(amz_date);
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        sha256_hex(canonical_request.as_bytes())
    );
    let secret = Zeroizing::new(format!("AWS4{}", creds.secret_access_key.as_str()));
    let k_date = hmac_sha256(secret.as_bytes(), date.as_bytes());
    let k_region = hmac_sha256(&k_date, region.as_bytes());
    let k_service = hmac_sha256(&k_region, service.as_bytes());
    let k_signing = hmac_sha256(&k_service, b"aws4_request");
    let signature = hex(&hmac_sha256(&k_signing, string_to_sign.as_bytes()));
    let authorization = format!(
        "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
        creds.access_key_id
    );
    Signed {
        canonical_request,
        string_to_sign,
        signed_headers,
        signature,
        authorization,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test suite's credentials (public example values, not a real key).
    fn suite() -> Credentials {
        Credentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: Zeroizing::new("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into()),
            session_token: None,
        }
    }
    const DATE: &str = "20150830T123600Z";
    const HOST: (&str, &str) = ("Host", "example.amazonaws.com");
    const STAMP: (&str, &str) = ("X-Amz-Date", DATE);

    fn check(name: &str, req: &Request<'_>, service: &str, creq: Option<&str>, sig: &str) {
        let s = sign(&suite(), "us-east-1", service, DATE, req);
        if let Some(c) = creq {
            assert_eq!(s.canonical_request, c, "{name}: canonical request");
        }
        assert_eq!(s.signature, sig, "{name}: signature");
        assert!(
            s.authorization.starts_with(&format!(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/{service}/aws4_request, SignedHeaders="
            )),
            "{name}: {}",
            s.authorization
        );
    }

    #[test]
    fn aws_test_suite_get_vanilla() {
        let req = Request {
            method: "GET",
            path: "/",
            query: "",
            headers: &[HOST, STAMP],
            payload: b"",
        };
        check(
            "get-vanilla",
            &req,
            "service",
            Some(
                "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            ),
            "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
        );
    }

    #[test]
    fn aws_test_suite_post_vanilla_and_query_order() {
        let post = Request {
            method: "POST",
            path: "/",
            query: "",
            headers: &[HOST, STAMP],
            payload: b"",
        };
        check(
            "post-vanilla",
            &post,
            "service",
            None,
            "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b",
        );
        let q = Request {
            method: "GET",
            path: "/",
            query: "Param2=value2&Param1=value1",
            headers: &[HOST, STAMP],
            payload: b"",
        };
        check(
            "get-vanilla-query-order-key-case",
            &q,
            "service",
            Some(
                "GET\n/\nParam1=value1&Param2=value2\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            ),
            "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
        );
    }

    #[test]
    fn aws_test_suite_post_x_www_form_urlencoded() {
        let req = Request {
            method: "POST",
            path: "/",
            query: "",
            headers: &[
                ("Content-Type", "application/x-www-form-urlencoded"),
                HOST,
                STAMP,
            ],
            payload: b"Param1=value1",
        };
        let s = sign(&suite(), "us-east-1", "service", DATE, &req);
        assert_eq!(
            s.canonical_request,
            "POST\n/\n\ncontent-type:application/x-www-form-urlencoded\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\ncontent-type;host;x-amz-date\n9095672bbd1f56dfc5b65f3e153adc8731a4a654192329106275f4c7b24d0b6e"
        );
        assert_eq!(
            s.string_to_sign,
            "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n42a5e5bb34198acb3e84da4f085bb7927f2bc277ca766e6d19c73c2154021281"
        );
        assert_eq!(
            s.authorization,
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature=ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a"
        );
    }

    #[test]
    fn aws_documentation_iam_list_users_example() {
        // GET https://iam.amazonaws.com/?Action=ListUsers&Version=2010-05-08
        let req = Request {
            method: "GET",
            path: "/",
            query: "Action=ListUsers&Version=2010-05-08",
            headers: &[
                (
                    "Content-Type",
                    "application/x-www-form-urlencoded; charset=utf-8",
                ),
                ("Host", "iam.amazonaws.com"),
                STAMP,
            ],
            payload: b"",
        };
        let s = sign(&suite(), "us-east-1", "iam", DATE, &req);
        assert_eq!(
            sha256_hex(s.canonical_request.as_bytes()),
            "f536975d06c0309214f805bb90ccff089219ecd68b2577efef23edd43b7e1a59"
        );
        assert_eq!(
            s.signature,
            "5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
        );
    }

    /// The S3 examples of AWS's documentation ("Signature calculations for the
    /// Authorization header: transferring payload in a single chunk").
    fn s3_example(
        method: &str,
        path: &str,
        query: &str,
        extra: &[(&str, &str)],
        payload: &[u8],
    ) -> Signed {
        let creds = Credentials {
            access_key_id: "AKIAIOSFODNN7EXAMPLE".into(),
            secret_access_key: Zeroizing::new("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into()),
            session_token: None,
        };
        let date = "20130524T000000Z";
        let hash = sha256_hex(payload);
        let mut headers: Vec<(&str, &str)> = vec![
            ("Host", "examplebucket.s3.amazonaws.com"),
            ("x-amz-content-sha256", &hash),
            ("x-amz-date", date),
        ];
        headers.extend_from_slice(extra);
        let req = Request {
            method,
            path,
            query,
            headers: &headers,
            payload: b"",
        };
        sign_with_payload_hash(&creds, "us-east-1", "s3", date, &req, &hash)
    }

    #[test]
    fn aws_documentation_s3_examples() {
        let get = s3_example("GET", "/test.txt", "", &[("Range", "bytes=0-9")], b"");
        assert_eq!(
            get.signature,
            "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
        assert_eq!(uri_encode("/test$file.text", false), "/test%24file.text");
        let put = s3_example(
            "PUT",
            &uri_encode("/test$file.text", false),
            "",
            &[
                ("Date", "Fri, 24 May 2013 00:00:00 GMT"),
                ("x-amz-storage-class", "REDUCED_REDUNDANCY"),
            ],
            b"Welcome to Amazon S3.",
        );
        assert_eq!(
            put.signature,
            "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd"
        );
        let lifecycle = s3_example("GET", "/", "lifecycle", &[], b"");
        assert_eq!(
            lifecycle.signature,
            "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543"
        );
        let list = s3_example("GET", "/", "max-keys=2&prefix=J", &[], b"");
        assert_eq!(
            list.signature,
            "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"
        );
        assert_eq!(uri_encode("a b/+=~", true), "a%20b%2F%2B%3D~");
    }

    #[test]
    fn header_values_are_trimmed_and_dates_formatted() {
        let a = Request {
            method: "GET",
            path: "/",
            query: "",
            headers: &[("Host", "  example.amazonaws.com "), ("X-Amz-Date", DATE)],
            payload: b"",
        };
        assert_eq!(
            sign(&suite(), "us-east-1", "service", DATE, &a).signature,
            "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
        assert_eq!(amz_date(1_440_938_160), DATE);
        assert_eq!(amz_date(0), "19700101T000000Z");
        assert_eq!(amz_date(951_782_400), "20000229T000000Z");
        assert!(!format!("{:?}", suite()).contains("EXAMPLEKEY"));
    }
}
