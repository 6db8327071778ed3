//! Sealing FHIR resource versions (DR1, invariant 4).
//!
//! ```text
//! sealed = [format][nonce 12][AES-256-GCM(DataKey, zstd(plaintext)) ‖ tag 16]
//! AAD    = format ‖ lp("phivault-record-v1") ‖ lp(resource_type) ‖ lp(id)
//!                 ‖ version (u64 BE) ‖ lp(key_id)
//!                 [‖ updated_ms (i64 BE)  — format 2 only]  lp(x) = len(x) as u64 BE ‖ x
//! ```
//!
//! * The AAD binds a ciphertext to its row: moving it to another resource, id, version or
//!   patient (key_id names the patient's data key) makes it fail to open. The encoding is
//!   length-prefixed, so no two different field tuples give the same AAD.
//! * The format byte is part of the AAD, so it cannot be changed either. Format 1 means
//!   "AES-256-GCM over a zstd frame compressed with the built-in dictionary
//!   `dict/fhir-json-v1.txt`"; the dictionary is therefore frozen (a test pins its SHA-256) —
//!   a new dictionary needs a new format byte. Format 2 (what [`DataKey::seal`] writes)
//!   is format 1 with the version's write time also bound, so that a plaintext may leave
//!   out what its row already holds (type, id, version, time: see the server's stored
//!   form) without any of it becoming editable. Format 1 records still open.
//! * Nonces are 96 random bits per seal. With one data key per patient, the number of
//!   seals under one key stays far below the 2³² at which NIST SP 800-38D §8.3 asks for
//!   another construction.
//! * Compression happens before encryption, so the sealed length reflects how compressible
//!   the record is. Lengths of records are visible anyway; an attacker who could both put
//!   chosen text into someone else's record *and* watch its sealed size (CRIME-style) is
//!   the residual risk. Record sizes are not padded.
//! * Opening authenticates first and only then decompresses, into a buffer capped at
//!   [`MAX_PLAINTEXT_LEN`], with the zstd window capped too, so even a payload crafted by
//!   someone holding the key cannot exhaust memory.

use std::cell::RefCell;
use std::io::Read as _;
use std::sync::OnceLock;

use zeroize::Zeroizing;

use crate::CryptoError;
use crate::keys::{DataKey, aead_open, aead_seal, push_lp};

/// Largest plaintext [`DataKey::seal`] accepts and [`DataKey::open`] will produce: 64 MiB.
pub const MAX_PLAINTEXT_LEN: usize = 64 << 20;
/// zstd back-reference window limit when decompressing (2²⁶ = 64 MiB).
const ZSTD_WINDOW_LOG_MAX: u32 = 26;
/// zstd compression level (3 is zstd's default: fast, and little is gained above it on JSON
/// this small).
pub const ZSTD_LEVEL: i32 = 3;
/// Format byte of records whose AAD binds type, id, version and key (earlier versions).
pub const RECORD_FORMAT_V1: u8 = 1;
/// Format byte of records sealed by this version: format 1 plus the write time in the AAD.
pub const RECORD_FORMAT_V2: u8 = 2;
/// Domain label in a record's associated data.
pub const RECORD_AAD_LABEL: &str = "phivault-record-v1";

/// The frozen zstd raw-content dictionary of format 1: common FHIR R4 JSON keys, systems
/// and fragments (hand-written from the R4 spec and Synthea-style resources; no patient
/// data). Most frequent fragments are near the end, where zstd offsets are cheapest.
pub(crate) const FHIR_DICT_V1: &[u8] = include_bytes!("dict/fhir-json-v1.txt");

fn encoder_dict() -> &'static zstd::dict::EncoderDictionary<'static> {
    static DICT: OnceLock<zstd::dict::EncoderDictionary<'static>> = OnceLock::new();
    DICT.get_or_init(|| zstd::dict::EncoderDictionary::copy(FHIR_DICT_V1, ZSTD_LEVEL))
}

fn decoder_dict() -> &'static zstd::dict::DecoderDictionary<'static> {
    static DICT: OnceLock<zstd::dict::DecoderDictionary<'static>> = OnceLock::new();
    DICT.get_or_init(|| zstd::dict::DecoderDictionary::copy(FHIR_DICT_V1))
}

/// Where a sealed record belongs. Every field is authenticated; change any and
/// [`DataKey::open`] fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordAad<'a> {
    /// FHIR resource type, e.g. `"Observation"`.
    pub resource_type: &'a str,
    /// Logical id of the resource.
    pub id: &'a str,
    /// Version (`meta.versionId`) of this resource version.
    pub version: u64,
    /// Identifier of the data key that seals it — the owning patient's key.
    pub key_id: &'a str,
    /// Write time of this version (`meta.lastUpdated`), ms since the Unix epoch; bound
    /// by format 2 only.
    pub updated_ms: i64,
}

impl RecordAad<'_> {
    /// The canonical byte encoding used as AES-GCM associated data (see module docs).
    pub fn encode(&self, format: u8) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            1 + 8 * 4
                + 8
                + RECORD_AAD_LABEL.len()
                + self.resource_type.len()
                + self.id.len()
                + self.key_id.len(),
        );
        out.push(format);
        push_lp(&mut out, RECORD_AAD_LABEL.as_bytes());
        push_lp(&mut out, self.resource_type.as_bytes());
        push_lp(&mut out, self.id.as_bytes());
        out.extend_from_slice(&self.version.to_be_bytes());
        push_lp(&mut out, self.key_id.as_bytes());
        if format >= RECORD_FORMAT_V2 {
            out.extend_from_slice(&self.updated_ms.to_be_bytes());
        }
        out
    }
}

thread_local! {
    /// One zstd compression context per thread: creating a context (and attaching the
    /// dictionary) costs more than compressing a typical 1–2 KB resource.
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
}

fn compress(plaintext: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell
            .try_borrow_mut()
            .map_err(|_| CryptoError::Compression)?;
        let c = match &mut *slot {
            Some(c) => c,
            None => slot.insert(
                zstd::bulk::Compressor::with_prepared_dictionary(encoder_dict())
                    .map_err(|_| CryptoError::Compression)?,
            ),
        };
        match c.compress(plaintext) {
            Ok(v) => Ok(Zeroizing::new(v)),
            Err(_) => {
                // Do not reuse a context in an unknown state.
                *slot = None;
                Err(CryptoError::Compression)
            }
        }
    })
}

thread_local! {
    /// One zstd decompression context per thread, for frames that state their size (ours
    /// always do): a fresh streaming decoder per record allocated and zeroed its buffers on
    /// every read.
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

fn decompress(compressed: &[u8]) -> Result<Vec<u8>, CryptoError> {
    match zstd::zstd_safe::get_frame_content_size(compressed) {
        Ok(Some(n)) if n <= MAX_PLAINTEXT_LEN as u64 => {
            let r = DECOMPRESSOR.with(|cell| {
                let mut slot = cell.try_borrow_mut().map_err(|_| CryptoError::Integrity)?;
                let d = match &mut *slot {
                    Some(d) => d,
                    None => {
                        let mut d =
                            zstd::bulk::Decompressor::with_prepared_dictionary(decoder_dict())
                                .map_err(|_| CryptoError::Integrity)?;
                        d.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(
                            ZSTD_WINDOW_LOG_MAX,
                        ))
                        .map_err(|_| CryptoError::Integrity)?;
                        slot.insert(d)
                    }
                };
                // Capacity is exactly the stated size: a frame that lies about it fails.
                d.decompress(compressed, n as usize).map_err(|_| {
                    *slot = None;
                    CryptoError::Integrity
                })
            })?;
            if r.len() as u64 != n {
                return Err(CryptoError::Integrity);
            }
            Ok(r)
        }
        Ok(Some(_)) => Err(CryptoError::Integrity),
        _ => decompress_stream(compressed),
    }
}

/// Frames without a stated size: stream with a hard output cap.
fn decompress_stream(compressed: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let mut d = zstd::stream::read::Decoder::with_prepared_dictionary(compressed, decoder_dict())
        .map_err(|_| CryptoError::Integrity)?;
    d.window_log_max(ZSTD_WINDOW_LOG_MAX)
        .map_err(|_| CryptoError::Integrity)?;
    let mut out = Vec::with_capacity(compressed.len().saturating_mul(4).min(MAX_PLAINTEXT_LEN));
    let limit = (MAX_PLAINTEXT_LEN as u64).saturating_add(1);
    if d.take(limit).read_to_end(&mut out).is_err() || out.len() > MAX_PLAINTEXT_LEN {
        zeroize::Zeroize::zeroize(&mut out);
        return Err(CryptoError::Integrity);
    }
    Ok(out)
}

impl DataKey {
    /// Compresses `plaintext` (zstd level [`ZSTD_LEVEL`], FHIR dictionary) and seals it
    /// with AES-256-GCM under a fresh random nonce, bound to `aad`.
    /// Output: `[RECORD_FORMAT_V2][nonce 12][ciphertext ‖ tag 16]`.
    ///
    /// Plaintexts over [`MAX_PLAINTEXT_LEN`] are refused ([`CryptoError::TooLarge`]).
    pub fn seal(&self, aad: &RecordAad<'_>, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if plaintext.len() > MAX_PLAINTEXT_LEN {
            return Err(CryptoError::TooLarge {
                len: plaintext.len(),
                max: MAX_PLAINTEXT_LEN,
            });
        }
        let compressed = compress(plaintext)?;
        aead_seal(
            &self.key,
            RECORD_FORMAT_V2,
            &aad.encode(RECORD_FORMAT_V2),
            &compressed,
        )
    }

    /// Authenticates, decrypts and decompresses (output capped at [`MAX_PLAINTEXT_LEN`]).
    /// Every failure — wrong key, wrong `aad`, changed or truncated bytes, unknown format,
    /// bad zstd frame, over-long output — is [`CryptoError::Integrity`].
    pub fn open(&self, aad: &RecordAad<'_>, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.open_record(aad, sealed)
            .map(|(_, plaintext)| plaintext)
    }

    /// [`DataKey::open`], also returning the record's format byte (which says what the
    /// AAD bound, and so what the plaintext may leave out).
    pub fn open_record(
        &self,
        aad: &RecordAad<'_>,
        sealed: &[u8],
    ) -> Result<(u8, Vec<u8>), CryptoError> {
        let format = *sealed.first().ok_or(CryptoError::Integrity)?;
        if format != RECORD_FORMAT_V1 && format != RECORD_FORMAT_V2 {
            return Err(CryptoError::Integrity);
        }
        let compressed = aead_open(&self.key, format, &aad.encode(format), sealed)?;
        Ok((format, decompress(&compressed)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{KeyHierarchy, MasterKey};

    /// A Synthea-style Patient (~1.5 KB), values invented.
    pub(crate) const PATIENT: &str = r#"{"resourceType":"Patient","id":"8f2c6a3e-5b1d-4c7e-9a0f-2d4b6e8c1a3f","meta":{"versionId":"3","lastUpdated":"2025-03-14T09:26:53.589Z"},"extension":[{"url":"http://hl7.org/fhir/us/core/StructureDefinition/us-core-race","extension":[{"url":"ombCategory","valueCoding":{"system":"urn:oid:2.16.840.1.113883.6.238","code":"2054-5","display":"Black or African American"}},{"url":"text","valueString":"Black or African American"}]},{"url":"http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex","valueCode":"M"}],"identifier":[{"system":"https://github.com/synthetichealth/synthea","value":"c71e0a44-1f5e-47b2-b3d9-6a1b0c7e92d4"},{"type":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/v2-0203","code":"MR","display":"Medical Record Number"}],"text":"Medical Record Number"},"system":"http://hospital.smarthealthit.org","value":"c71e0a44-1f5e-47b2-b3d9-6a1b0c7e92d4"},{"type":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/v2-0203","code":"SS","display":"Social Security Number"}],"text":"Social Security Number"},"system":"http://hl7.org/fhir/sid/us-ssn","value":"999-27-4816"}],"name":[{"use":"official","family":"Okafor","given":["Emeka","Chidi"],"prefix":["Mr."]}],"telecom":[{"system":"phone","value":"555-318-2740","use":"home"}],"gender":"male","birthDate":"1968-11-02","address":[{"line":["412 Tremont Street Apt 7"],"city":"Worcester","state":"MA","postalCode":"01608","country":"US"}],"maritalStatus":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/v3-MaritalStatus","code":"S","display":"Never Married"}],"text":"Never Married"},"communication":[{"language":{"coding":[{"system":"urn:ietf:bcp:47","code":"en-US","display":"English (United States)"}],"text":"English"}}],"generalPractitioner":[{"reference":"Practitioner/1c9e2f70-3a41-4b8d-a6e5-0f7d3c2b9e18"}]}"#;

    /// A blood-pressure Observation (~1.3 KB).
    const OBSERVATION: &str = r#"{"resourceType":"Observation","id":"0b7d1e94-6c2a-4f3b-8e5d-9a1c7f40b2e6","meta":{"versionId":"1","lastUpdated":"2025-03-14T09:31:07.120Z"},"status":"final","category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"vital-signs","display":"Vital signs"}]}],"code":{"coding":[{"system":"http://loinc.org","code":"85354-9","display":"Blood pressure panel with all children optional"}],"text":"Blood pressure panel with all children optional"},"subject":{"reference":"Patient/8f2c6a3e-5b1d-4c7e-9a0f-2d4b6e8c1a3f"},"encounter":{"reference":"Encounter/5e3a9c17-2b8f-4d60-a1e4-7c9b3f05d2a8"},"effectiveDateTime":"2025-03-14T09:15:00-05:00","issued":"2025-03-14T09:15:00.000-05:00","component":[{"code":{"coding":[{"system":"http://loinc.org","code":"8462-4","display":"Diastolic blood pressure"}],"text":"Diastolic blood pressure"},"valueQuantity":{"value":84,"unit":"mm[Hg]","system":"http://unitsofmeasure.org","code":"mm[Hg]"}},{"code":{"coding":[{"system":"http://loinc.org","code":"8480-6","display":"Systolic blood pressure"}],"text":"Systolic blood pressure"},"valueQuantity":{"value":131,"unit":"mm[Hg]","system":"http://unitsofmeasure.org","code":"mm[Hg]"}}],"interpretation":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation","code":"H","display":"High"}]}]}"#;

    fn key() -> DataKey {
        let h = KeyHierarchy::new(&MasterKey::from_bytes(&[9; 32]));
        h.new_data_key("patient-1").expect("key").0
    }

    const AAD: RecordAad<'static> = RecordAad {
        resource_type: "Patient",
        id: "8f2c6a3e",
        version: 3,
        key_id: "patient-1",
        updated_ms: 1_700_000_000_123,
    };

    #[test]
    fn dictionary_is_frozen() {
        // Format 1 depends on these exact bytes. Never edit the file; add a format 2.
        let hex: String = crate::sha256(FHIR_DICT_V1)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hex, DICT_V1_SHA256);
    }
    const DICT_V1_SHA256: &str = "6b9b26c58d376ab8bfea2e72f19ad24887cf4b20fa438e71cda48bbdac14364a";

    #[test]
    fn round_trip() {
        let k = key();
        for pt in [
            &b""[..],
            b"x",
            PATIENT.as_bytes(),
            OBSERVATION.as_bytes(),
            &[0u8; 100_000],
        ] {
            let sealed = k.seal(&AAD, pt).expect("seal");
            assert_eq!(sealed[0], RECORD_FORMAT_V2);
            assert_eq!(k.open(&AAD, &sealed).expect("open"), pt);
        }
    }

    #[test]
    fn same_plaintext_seals_differently() {
        let k = key();
        assert_ne!(
            k.seal(&AAD, PATIENT.as_bytes()).expect("seal"),
            k.seal(&AAD, PATIENT.as_bytes()).expect("seal")
        );
    }

    #[test]
    fn format_1_records_still_open_and_formats_cannot_be_swapped() {
        let k = key();
        let compressed = compress(PATIENT.as_bytes()).expect("zstd");
        let v1 = aead_seal(
            &k.key,
            RECORD_FORMAT_V1,
            &AAD.encode(RECORD_FORMAT_V1),
            &compressed,
        )
        .expect("seal");
        // format 1 does not bind the write time
        let other_time = RecordAad {
            updated_ms: 5,
            ..AAD
        };
        assert_eq!(
            k.open_record(&other_time, &v1).expect("open"),
            (RECORD_FORMAT_V1, PATIENT.as_bytes().to_vec())
        );
        let mut relabelled = v1.clone();
        relabelled[0] = RECORD_FORMAT_V2;
        assert!(matches!(
            k.open(&AAD, &relabelled),
            Err(CryptoError::Integrity)
        ));
        let mut v2 = k.seal(&AAD, PATIENT.as_bytes()).expect("seal");
        assert_eq!(k.open_record(&AAD, &v2).expect("open").0, RECORD_FORMAT_V2);
        v2[0] = RECORD_FORMAT_V1;
        assert!(matches!(k.open(&AAD, &v2), Err(CryptoError::Integrity)));
    }

    #[test]
    fn any_aad_field_change_fails() {
        let k = key();
        let sealed = k.seal(&AAD, PATIENT.as_bytes()).expect("seal");
        let variants = [
            RecordAad {
                resource_type: "Observation",
                ..AAD
            },
            RecordAad {
                id: "8f2c6a3f",
                ..AAD
            },
            RecordAad { version: 2, ..AAD },
            RecordAad { version: 4, ..AAD },
            RecordAad {
                key_id: "patient-2",
                ..AAD
            },
            RecordAad {
                resource_type: "",
                ..AAD
            },
            RecordAad {
                updated_ms: AAD.updated_ms + 1,
                ..AAD
            },
        ];
        for v in variants {
            assert!(
                matches!(k.open(&v, &sealed), Err(CryptoError::Integrity)),
                "{v:?}"
            );
        }
    }

    #[test]
    fn aad_encoding_is_unambiguous() {
        let a = RecordAad {
            resource_type: "ab",
            id: "c",
            version: 1,
            key_id: "k",
            updated_ms: 0,
        };
        let b = RecordAad {
            resource_type: "a",
            id: "bc",
            version: 1,
            key_id: "k",
            updated_ms: 0,
        };
        assert_ne!(a.encode(1), b.encode(1));
        assert_ne!(a.encode(1), a.encode(2));
    }

    #[test]
    fn flipped_byte_anywhere_fails() {
        let k = key();
        let sealed = k.seal(&AAD, OBSERVATION.as_bytes()).expect("seal");
        for i in 0..sealed.len() {
            for mask in [0x01u8, 0x80] {
                let mut s = sealed.clone();
                s[i] ^= mask;
                assert!(
                    matches!(k.open(&AAD, &s), Err(CryptoError::Integrity)),
                    "flip {mask:#x} at {i}"
                );
            }
        }
    }

    #[test]
    fn truncated_or_extended_fails() {
        let k = key();
        let sealed = k.seal(&AAD, PATIENT.as_bytes()).expect("seal");
        for len in 0..sealed.len() {
            assert!(
                matches!(k.open(&AAD, &sealed[..len]), Err(CryptoError::Integrity)),
                "len {len}"
            );
        }
        let mut longer = sealed.clone();
        longer.push(0);
        assert!(matches!(k.open(&AAD, &longer), Err(CryptoError::Integrity)));
    }

    #[test]
    fn wrong_data_key_fails() {
        let sealed = key().seal(&AAD, PATIENT.as_bytes()).expect("seal");
        let h = KeyHierarchy::new(&MasterKey::from_bytes(&[9; 32]));
        let (other, _) = h.new_data_key("patient-1").expect("key");
        assert!(matches!(
            other.open(&AAD, &sealed),
            Err(CryptoError::Integrity)
        ));
    }

    #[test]
    fn too_large_is_refused() {
        let big = vec![0u8; MAX_PLAINTEXT_LEN + 1];
        assert!(matches!(
            key().seal(&AAD, &big),
            Err(CryptoError::TooLarge { .. })
        ));
    }

    #[test]
    fn decompression_bomb_is_capped() {
        // A frame that inflates past the cap must not be returned even though it is
        // authentic (only a key holder could make one).
        let bomb = zstd::bulk::compress(&vec![0u8; MAX_PLAINTEXT_LEN + 1024], 1).expect("zstd");
        assert!(bomb.len() < 1 << 16);
        assert!(matches!(decompress(&bomb), Err(CryptoError::Integrity)));
        assert!(matches!(
            decompress(b"not zstd"),
            Err(CryptoError::Integrity)
        ));
    }

    #[test]
    fn typical_resource_shrinks() {
        let k = key();
        for (name, json) in [("Patient", PATIENT), ("Observation", OBSERVATION)] {
            let sealed = k.seal(&AAD, json.as_bytes()).expect("seal");
            let plain_zstd = zstd::bulk::compress(json.as_bytes(), ZSTD_LEVEL).expect("zstd");
            let ratio = sealed.len() as f64 / json.len() as f64;
            println!(
                "{name}: json {} B, zstd-3 without dictionary {} B, sealed (dict) {} B, sealed/json = {ratio:.3}",
                json.len(),
                plain_zstd.len(),
                sealed.len()
            );
            assert!(sealed.len() < json.len(), "{name}: sealed larger than JSON");
            assert!(
                sealed.len() < plain_zstd.len(),
                "{name}: the dictionary should beat plain zstd even with 29 bytes of overhead"
            );
        }
    }
}
