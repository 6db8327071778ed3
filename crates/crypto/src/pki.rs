//! Development PKI for `phivault init`: a throw-away CA and a `localhost` server certificate.
//!
//! * CA: ECDSA P-256, `CA:TRUE, pathlen:0`, key usage keyCertSign + cRLSign, 10 years.
//!   **Its private key is discarded** once the server certificate is signed, so a dev CA
//!   that someone adds to a trust store can never vouch for anything else. Renewing means
//!   generating a new pair and trusting the new CA.
//! * Server: ECDSA P-256, SAN DNS `localhost`, IP `127.0.0.1` and `::1`, EKU serverAuth,
//!   key usage digitalSignature, `CA:FALSE`, valid from one hour ago (clock skew) for 396
//!   days, under the 397/398-day limit browsers enforce.
//! * Serial numbers are 16 random bytes (top bit cleared so the DER integer stays positive).
//!
//! rcgen's `KeyPair` does not zeroize; the private key PEM is handed out in a [`Secret`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::{CryptoError, Secret, random_bytes};

/// Validity of the development CA.
pub const DEV_CA_VALIDITY_DAYS: i64 = 3650;
/// Validity of the development server certificate (≤ 397 days including the back-dating).
pub const DEV_SERVER_VALIDITY_DAYS: i64 = 396;

/// Output of [`generate_dev_pki`]. `Debug` shows the certificates, not the key.
#[derive(Debug)]
pub struct DevPki {
    /// The CA certificate (PEM) — what clients trust.
    pub ca_cert_pem: String,
    /// The server certificate (PEM), signed by the CA. Serve it followed by `ca_cert_pem`.
    pub server_cert_pem: String,
    /// The server's private key, PKCS#8 PEM. Write it with [`crate::write_private_file`].
    pub server_key_pem: Secret<String>,
}

fn pki_err(e: rcgen::Error) -> CryptoError {
    CryptoError::Pki(e.to_string())
}

fn random_serial() -> Result<SerialNumber, CryptoError> {
    let mut s: [u8; 16] = random_bytes()?;
    s[0] &= 0x7f;
    s[0] |= 0x01; // no leading zero byte, so the encoding length is stable
    Ok(SerialNumber::from_slice(&s))
}

/// Generates a development CA and a server certificate for `localhost`, `127.0.0.1`, `::1`.
pub fn generate_dev_pki() -> Result<DevPki, CryptoError> {
    let now = OffsetDateTime::now_utc();
    let not_before = now - Duration::hours(1);

    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(pki_err)?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "phivault (development only)");
        dn.push(DnType::CommonName, "phivault development CA");
        dn
    };
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = not_before;
    ca.not_after = now + Duration::days(DEV_CA_VALIDITY_DAYS);
    ca.serial_number = Some(random_serial()?);
    let ca_cert = ca.self_signed(&ca_key).map_err(pki_err)?;
    let issuer = rcgen::Issuer::new(ca, ca_key);

    let server_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(pki_err)?;
    let mut server = CertificateParams::default();
    server.distinguished_name = {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "phivault (development only)");
        dn.push(DnType::CommonName, "localhost");
        dn
    };
    server.subject_alt_names = vec![
        SanType::DnsName("localhost".try_into().map_err(pki_err)?),
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    ];
    server.is_ca = IsCa::ExplicitNoCa;
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.use_authority_key_identifier_extension = true;
    server.not_before = not_before;
    server.not_after = now + Duration::days(DEV_SERVER_VALIDITY_DAYS);
    server.serial_number = Some(random_serial()?);
    let server_cert = server.signed_by(&server_key, &issuer).map_err(pki_err)?;

    Ok(DevPki {
        ca_cert_pem: ca_cert.pem(),
        server_cert_pem: server_cert.pem(),
        server_key_pem: Secret::new(server_key.serialize_pem()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem_body(pem: &str, label: &str) -> Vec<u8> {
        use base64::Engine as _;
        let begin = format!("-----BEGIN {label}-----");
        let end = format!("-----END {label}-----");
        let inner = pem
            .trim()
            .strip_prefix(&begin)
            .and_then(|s| s.strip_suffix(&end))
            .unwrap_or_else(|| panic!("not a single {label} PEM block"));
        let b64: String = inner.chars().filter(|c| !c.is_whitespace()).collect();
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("PEM body is base64")
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn dev_pki_looks_right() {
        let pki = generate_dev_pki().expect("pki");
        let ca = pem_body(&pki.ca_cert_pem, "CERTIFICATE");
        let srv = pem_body(&pki.server_cert_pem, "CERTIFICATE");
        let key = pem_body(pki.server_key_pem.expose(), "PRIVATE KEY");
        assert_eq!(ca[0], 0x30, "DER SEQUENCE");
        assert_eq!(srv[0], 0x30, "DER SEQUENCE");
        assert_eq!(key[0], 0x30, "DER SEQUENCE");

        // OID 1.2.840.10045.4.3.2 ecdsa-with-SHA256 (signature algorithm of both).
        let ecdsa_sha256 = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
        assert!(contains(&ca, &ecdsa_sha256) && contains(&srv, &ecdsa_sha256));
        // basicConstraints cA TRUE in the CA.
        assert!(contains(
            &ca,
            &[0x30, 0x06, 0x01, 0x01, 0xff, 0x02, 0x01, 0x00]
        ));
        // serverAuth EKU OID 1.3.6.1.5.5.7.3.1 in the server certificate.
        assert!(contains(
            &srv,
            &[0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01]
        ));
        // SANs: dNSName "localhost", iPAddress 127.0.0.1 and ::1.
        assert!(contains(&srv, b"\x82\x09localhost"));
        assert!(contains(&srv, &[0x87, 0x04, 127, 0, 0, 1]));
        let mut v6 = vec![0x87, 0x10];
        v6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        assert!(contains(&srv, &v6));
        // Issued by the CA: the issuer name of the server cert is the CA's subject.
        assert!(contains(&srv, b"phivault development CA"));

        // The key is PKCS#8 for P-256 and is not in the certificates.
        assert!(contains(
            &key,
            &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]
        ));
        assert!(!pki.ca_cert_pem.contains("PRIVATE"));
        assert!(!pki.server_cert_pem.contains("PRIVATE"));
        assert!(!format!("{pki:?}").contains("PRIVATE KEY"));

        // rcgen can read the key back.
        KeyPair::from_pem(pki.server_key_pem.expose()).expect("rcgen parses the key");
    }

    #[test]
    fn two_runs_differ() {
        let a = generate_dev_pki().expect("pki");
        let b = generate_dev_pki().expect("pki");
        assert_ne!(a.ca_cert_pem, b.ca_cert_pem);
        assert_ne!(a.server_key_pem.expose(), b.server_key_pem.expose());
    }
}
