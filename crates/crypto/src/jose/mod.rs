//! Compact JWE (RFC 7516, algorithms from RFC 7518) for what leaves the server encrypted
//! for someone else to open: SMART Health Links payloads and Bulk Data export files.
//!
//! Two key-management modes, both with content encryption `A256GCM` only:
//!
//! * `"alg":"dir"` ([`encrypt_dir`], [`decrypt_dir`]) — the 32-byte key is the content
//!   encryption key itself (a SMART Health Link carries it in the link).
//! * `"alg":"ECDH-ES"` ([`encrypt_ecdh_es`]) — direct key agreement with a recipient's P-256
//!   or P-384 public key ([`EncryptionKey`]): a fresh ephemeral key per message, the CEK
//!   derived with the Concat KDF of RFC 7518 §4.6.2 from the shared secret, the ephemeral
//!   public key sent in the `epk` header member.
//!
//! Why so narrow: every choice a JWE lets the *sender* make (algorithm, compression,
//! critical extensions) is something a receiver must defend against, and the history of
//! JOSE is one of libraries accepting what they should not ("alg":"none", invalid-curve
//! points, decompression bombs). So encryption always produces one exact header shape, and
//! [`decrypt_dir`] accepts `dir` + `A256GCM` and nothing else: `zip` and `crit` are
//! refused, and so is a non-empty encrypted-key part.
//!
//! Exactness matters because the other side is a third-party library (npm `jose`, Python
//! `jwcrypto`, a SMART Health Links viewer): every part is base64url *without* padding
//! (RFC 7515 §2), and the AES-GCM additional data is the ASCII of the protected header's
//! base64url form exactly as sent (RFC 7516 §5.1 step 14), not the JSON.
//!
//! The crate has no JSON library, so the header is written by hand from validated pieces
//! (`cty` must be printable ASCII without `"` or `\`, so it needs no escaping) and read by a
//! small strict parser (UTF-8, no duplicate member names, bounded depth and size).
//!
//! The ring AES-GCM key objects are built per message and dropped at once; derived CEKs
//! live in zeroizing buffers. Random 96-bit IVs: one `dir` key must not encrypt more than
//! about 2³² messages (NIST SP 800-38D §8.3) — keys here are per link or per export.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::aead::{Aad, Nonce};
use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey};
use ring::rand::SystemRandom;
use zeroize::Zeroizing;

use crate::keys::{NONCE_LEN, TAG_LEN, aead_key};
use crate::{CryptoError, random_bytes};

/// The longest `cty` (content type) accepted by the encrypting functions.
pub const MAX_CTY_LEN: usize = 256;
/// The longest key id accepted by [`EncryptionKey::from_jwk_parts`].
pub const MAX_KID_LEN: usize = 128;
/// The longest protected header [`decrypt_dir`] will parse, in base64url characters.
const MAX_HEADER_B64_LEN: usize = 4096;
/// Nesting depth allowed in a parsed header (the header object itself is depth 1).
const MAX_JSON_DEPTH: usize = 8;

/// `enc` of every JWE made here.
const ENC_A256GCM: &str = "A256GCM";

// ---------------------------------------------------------------------------------------
// dir

/// Encrypts `plaintext` as a compact JWE with `{"alg":"dir","enc":"A256GCM","cty":<cty>}`:
/// `key` is the content encryption key, the IV is 96 random bits, the additional data is
/// the ASCII of the base64url protected header, and the encrypted-key part is empty.
///
/// `cty` must be 1..=[`MAX_CTY_LEN`] printable ASCII characters other than `"` and `\`
/// (e.g. `application/fhir+json`); anything else is [`CryptoError::InvalidArgument`].
pub fn encrypt_dir(key: &[u8; 32], cty: &str, plaintext: &[u8]) -> Result<String, CryptoError> {
    check_cty(cty)?;
    let header = format!(r#"{{"alg":"dir","enc":"{ENC_A256GCM}","cty":"{cty}"}}"#);
    seal_compact(key, &header, plaintext)
}

/// Decrypts a compact JWE made with `"alg":"dir"` and `"enc":"A256GCM"` under `key`.
///
/// Refused with [`CryptoError::InvalidArgument`] (the header is public, so saying why is
/// no oracle): any other `alg` or `enc`, a `zip` (compression) or `crit` member. Other
/// members (`cty`, `typ`, `kid`, ...) are ignored, as RFC 7516 §4 requires.
///
/// [`CryptoError::Integrity`]: not five parts, a non-empty encrypted-key part, anything not
/// strict unpadded base64url, a header that is not a JSON object (or has duplicate
/// members), an IV other than 96 bits or a tag other than 128 bits, and of course a wrong
/// key or any changed byte.
pub fn decrypt_dir(key: &[u8; 32], compact: &str) -> Result<Vec<u8>, CryptoError> {
    let jwe = Compact::parse(compact)?;
    if !jwe.encrypted_key.is_empty() {
        return Err(CryptoError::Integrity);
    }
    check_dir_header(&jwe.header)?;
    jwe.open(key)
}

fn check_dir_header(header: &[(String, Json)]) -> Result<(), CryptoError> {
    let mut alg = None;
    let mut enc = None;
    for (name, value) in header {
        match name.as_str() {
            "zip" => {
                return Err(CryptoError::InvalidArgument(
                    "compressed JWE (\"zip\") is not accepted",
                ));
            }
            "crit" => {
                return Err(CryptoError::InvalidArgument(
                    "JWE with critical extensions (\"crit\") is not accepted",
                ));
            }
            "alg" => alg = Some(value),
            "enc" => enc = Some(value),
            _ => {}
        }
    }
    let is = |v: Option<&Json>, want: &str| matches!(v, Some(Json::Str(s)) if s == want);
    if is(alg, "dir") && is(enc, ENC_A256GCM) {
        Ok(())
    } else {
        Err(CryptoError::InvalidArgument(
            "only JWE with alg \"dir\" and enc \"A256GCM\" is accepted",
        ))
    }
}

fn check_cty(cty: &str) -> Result<(), CryptoError> {
    let ok = !cty.is_empty()
        && cty.len() <= MAX_CTY_LEN
        && cty
            .bytes()
            .all(|b| (0x20..=0x7e).contains(&b) && b != b'"' && b != b'\\');
    if ok {
        Ok(())
    } else {
        Err(CryptoError::InvalidArgument(
            "JWE cty must be 1 to 256 printable ASCII characters without '\"' or '\\'",
        ))
    }
}

// ---------------------------------------------------------------------------------------
// ECDH-ES

/// The curves of [`EncryptionKey`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Curve {
    P256,
    P384,
}

impl Curve {
    fn from_name(crv: &str) -> Option<Self> {
        match crv {
            "P-256" => Some(Curve::P256),
            "P-384" => Some(Curve::P384),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Curve::P256 => "P-256",
            Curve::P384 => "P-384",
        }
    }

    fn agreement(self) -> &'static agreement::Algorithm {
        match self {
            Curve::P256 => &agreement::ECDH_P256,
            Curve::P384 => &agreement::ECDH_P384,
        }
    }

    /// Bytes of one coordinate.
    fn coord_len(self) -> usize {
        match self {
            Curve::P256 => 32,
            Curve::P384 => 48,
        }
    }
}

/// A recipient's public EC key for `"alg":"ECDH-ES"` (P-256 or P-384), built from the parts
/// of its JWK (`crv`, `x`, `y`, `kid`). It is validated when built: a point that is not on
/// the curve (the invalid-curve attack) never gets as far as an encryption.
///
/// Public key material, so nothing to hide; `Debug` shows the curve and key id only.
#[derive(Clone, PartialEq, Eq)]
pub struct EncryptionKey {
    curve: Curve,
    /// Uncompressed SEC 1 point: `0x04 ‖ x ‖ y`.
    point: Vec<u8>,
    kid: Option<String>,
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptionKey")
            .field("crv", &self.curve.name())
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl EncryptionKey {
    /// A key from a JWK's members: `crv` is `"P-256"` or `"P-384"`, `x` and `y` are the
    /// coordinates in unpadded base64url, each exactly the curve's size (32 or 48 bytes,
    /// RFC 7518 §6.2.1.2), and `kid`, if any, is 1..=[`MAX_KID_LEN`] characters of
    /// `[A-Za-z0-9._~-]` (it is copied into the JWE header).
    ///
    /// The point is checked by a throwaway key agreement with a fresh ephemeral key, which
    /// ring refuses for a point not on the curve. Errors: [`CryptoError::InvalidKey`] (the
    /// string says which check failed), [`CryptoError::Rng`].
    pub fn from_jwk_parts(
        crv: &str,
        x_b64url: &str,
        y_b64url: &str,
        kid: Option<&str>,
    ) -> Result<Self, CryptoError> {
        let curve = Curve::from_name(crv).ok_or(CryptoError::InvalidKey(
            "JWK crv must be \"P-256\" or \"P-384\"",
        ))?;
        if let Some(kid) = kid {
            check_kid(kid)?;
        }
        let x = decode_coordinate(curve, x_b64url)?;
        let y = decode_coordinate(curve, y_b64url)?;
        let mut point = Vec::with_capacity(1 + 2 * curve.coord_len());
        point.push(0x04);
        point.extend_from_slice(&x);
        point.extend_from_slice(&y);

        let probe = EphemeralPrivateKey::generate(curve.agreement(), &SystemRandom::new())
            .map_err(|_| CryptoError::Rng)?;
        agreement::agree_ephemeral(
            probe,
            &UnparsedPublicKey::new(curve.agreement(), &point),
            |_| (),
        )
        .map_err(|_| CryptoError::InvalidKey("JWK x and y are not a point on the curve"))?;

        Ok(Self {
            curve,
            point,
            kid: kid.map(str::to_owned),
        })
    }

    /// The key id given when the key was built.
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// The JWK curve name: `"P-256"` or `"P-384"`.
    pub fn curve(&self) -> &'static str {
        self.curve.name()
    }
}

fn decode_coordinate(curve: Curve, b64: &str) -> Result<Vec<u8>, CryptoError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(b64)
        .map_err(|_| CryptoError::InvalidKey("JWK x and y must be unpadded base64url"))?;
    if bytes.len() != curve.coord_len() {
        return Err(CryptoError::InvalidKey(
            "JWK x and y must each be the curve's full coordinate size (32 or 48 bytes)",
        ));
    }
    Ok(bytes)
}

fn check_kid(kid: &str) -> Result<(), CryptoError> {
    let ok = !kid.is_empty()
        && kid.len() <= MAX_KID_LEN
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(CryptoError::InvalidKey(
            "JWK kid must be 1 to 128 characters of [A-Za-z0-9._~-]",
        ))
    }
}

/// Encrypts `plaintext` to `to` as a compact JWE with `"alg":"ECDH-ES"` (direct key
/// agreement, so the encrypted-key part is empty) and `"enc":"A256GCM"`.
///
/// A fresh ephemeral key on the recipient's curve; `Z = ECDH(ephemeral, recipient)`; the
/// CEK is the Concat KDF (RFC 7518 §4.6.2, SHA-256) of `Z` with AlgorithmID `"A256GCM"`,
/// empty PartyUInfo and PartyVInfo (no `apu`/`apv` members) and SuppPubInfo 256. Header:
/// `{"alg":"ECDH-ES","enc":"A256GCM","cty":..,"kid":..,"epk":{"kty":"EC","crv":..,"x":..,"y":..}}`
/// (`kid` only when the key has one). `cty` as for [`encrypt_dir`].
pub fn encrypt_ecdh_es(
    to: &EncryptionKey,
    cty: &str,
    plaintext: &[u8],
) -> Result<String, CryptoError> {
    check_cty(cty)?;
    let alg = to.curve.agreement();
    let ephemeral =
        EphemeralPrivateKey::generate(alg, &SystemRandom::new()).map_err(|_| CryptoError::Rng)?;
    let epk = ephemeral
        .compute_public_key()
        .map_err(|_| CryptoError::InvalidKey("ephemeral EC key"))?;
    let epk = epk.as_ref();
    let n = to.curve.coord_len();
    if epk.len() != 1 + 2 * n || epk[0] != 0x04 {
        return Err(CryptoError::InvalidKey("ephemeral EC key"));
    }
    let x = URL_SAFE_NO_PAD.encode(&epk[1..1 + n]);
    let y = URL_SAFE_NO_PAD.encode(&epk[1 + n..]);

    let cek = agreement::agree_ephemeral(ephemeral, &UnparsedPublicKey::new(alg, &to.point), |z| {
        concat_kdf::<32>(z, ENC_A256GCM.as_bytes(), b"", b"")
    })
    .map_err(|_| CryptoError::InvalidKey("ECDH key agreement failed"))?;

    let mut header = String::with_capacity(160 + cty.len() + x.len() + y.len());
    header.push_str(r#"{"alg":"ECDH-ES","enc":"A256GCM","cty":""#);
    header.push_str(cty);
    header.push('"');
    if let Some(kid) = &to.kid {
        header.push_str(r#","kid":""#);
        header.push_str(kid);
        header.push('"');
    }
    header.push_str(r#","epk":{"kty":"EC","crv":""#);
    header.push_str(to.curve.name());
    header.push_str(r#"","x":""#);
    header.push_str(&x);
    header.push_str(r#"","y":""#);
    header.push_str(&y);
    header.push_str(r#""}}"#);

    seal_compact(&cek, &header, plaintext)
}

/// The Concat KDF of NIST SP 800-56A §5.8.1 as JWA uses it (RFC 7518 §4.6.2), with
/// SHA-256 and an `N`-byte output:
/// `K(i) = SHA-256(i as u32 BE ‖ Z ‖ OtherInfo)`, `OtherInfo = len ‖ AlgorithmID ‖ len ‖
/// PartyUInfo ‖ len ‖ PartyVInfo ‖ keydatalen (bits, u32 BE)` with 32-bit big-endian
/// lengths and an empty SuppPrivInfo; the output is the first `N` bytes of `K(1) ‖ K(2) ‖ ..`.
fn concat_kdf<const N: usize>(
    z: &[u8],
    algorithm_id: &[u8],
    apu: &[u8],
    apv: &[u8],
) -> Zeroizing<[u8; N]> {
    fn lp(ctx: &mut ring::digest::Context, field: &[u8]) {
        ctx.update(&(field.len() as u32).to_be_bytes());
        ctx.update(field);
    }
    let mut out = Zeroizing::new([0u8; N]);
    for (i, block) in out.chunks_mut(32).enumerate() {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(&(i as u32 + 1).to_be_bytes());
        ctx.update(z);
        lp(&mut ctx, algorithm_id);
        lp(&mut ctx, apu);
        lp(&mut ctx, apv);
        ctx.update(&((N as u32) * 8).to_be_bytes());
        let digest = ctx.finish();
        block.copy_from_slice(&digest.as_ref()[..block.len()]);
    }
    out
}

// ---------------------------------------------------------------------------------------
// Compact serialization

/// AES-256-GCM under `cek`, serialized as `BASE64URL(header) ‖ '..' ‖ iv ‖ '.' ‖ ciphertext
/// ‖ '.' ‖ tag` (the encrypted-key part is empty for both `dir` and `ECDH-ES`).
fn seal_compact(
    cek: &[u8; 32],
    header_json: &str,
    plaintext: &[u8],
) -> Result<String, CryptoError> {
    let header_b64 = URL_SAFE_NO_PAD.encode(header_json);
    let iv: [u8; NONCE_LEN] = random_bytes()?;
    let key = aead_key(cek)?;
    let mut buf = plaintext.to_vec();
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(iv),
            Aad::from(header_b64.as_bytes()),
            &mut buf,
        )
        .map_err(|_| CryptoError::InvalidArgument("plaintext too large for AES-GCM"))?;
    let mut out = String::with_capacity(header_b64.len() + (buf.len() + 40) * 4 / 3 + 8);
    out.push_str(&header_b64);
    out.push_str("..");
    URL_SAFE_NO_PAD.encode_string(iv, &mut out);
    out.push('.');
    URL_SAFE_NO_PAD.encode_string(&buf, &mut out);
    out.push('.');
    URL_SAFE_NO_PAD.encode_string(tag.as_ref(), &mut out);
    Ok(out)
}

/// The five parts of a compact JWE, decoded.
struct Compact<'a> {
    /// The protected header as sent: the additional data.
    header_b64: &'a str,
    header: Vec<(String, Json)>,
    encrypted_key: Vec<u8>,
    iv: [u8; NONCE_LEN],
    /// Ciphertext followed by the tag.
    sealed: Vec<u8>,
}

impl<'a> Compact<'a> {
    fn parse(compact: &'a str) -> Result<Self, CryptoError> {
        let mut parts = compact.split('.');
        let (Some(header_b64), Some(ek), Some(iv), Some(ct), Some(tag), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(CryptoError::Integrity);
        };
        if header_b64.len() > MAX_HEADER_B64_LEN {
            return Err(CryptoError::Integrity);
        }
        let decode = |s: &str| {
            URL_SAFE_NO_PAD
                .decode(s)
                .map_err(|_| CryptoError::Integrity)
        };
        let header_json = decode(header_b64)?;
        let header = parse_json_object(&header_json).ok_or(CryptoError::Integrity)?;
        let encrypted_key = decode(ek)?;
        let iv: [u8; NONCE_LEN] = decode(iv)?.try_into().map_err(|_| CryptoError::Integrity)?;
        let tag = decode(tag)?;
        if tag.len() != TAG_LEN {
            return Err(CryptoError::Integrity);
        }
        let mut sealed = Vec::with_capacity(ct.len() * 3 / 4 + TAG_LEN);
        URL_SAFE_NO_PAD
            .decode_vec(ct, &mut sealed)
            .map_err(|_| CryptoError::Integrity)?;
        sealed.extend_from_slice(&tag);
        Ok(Self {
            header_b64,
            header,
            encrypted_key,
            iv,
            sealed,
        })
    }

    /// AES-256-GCM open under `cek`, the protected header's base64url as additional data.
    fn open(self, cek: &[u8; 32]) -> Result<Vec<u8>, CryptoError> {
        let key = aead_key(cek).map_err(|_| CryptoError::Integrity)?;
        let mut buf = self.sealed;
        let len = key
            .open_in_place(
                Nonce::assume_unique_for_key(self.iv),
                Aad::from(self.header_b64.as_bytes()),
                &mut buf,
            )
            .map_err(|_| CryptoError::Integrity)?
            .len();
        buf.truncate(len);
        Ok(buf)
    }
}

// ---------------------------------------------------------------------------------------
// A small strict JSON reader for protected headers

/// A parsed JSON value, as much of it as headers need.
#[derive(Debug, PartialEq)]
enum Json {
    Str(String),
    Obj(Vec<(String, Json)>),
    /// A number, `true`, `false`, `null` or an array: checked for syntax, not kept.
    Other,
}

/// Parses `bytes` as exactly one JSON object (RFC 8259; surrounding whitespace allowed).
/// `None` for anything else: invalid UTF-8 or syntax, duplicate member names in any
/// object (RFC 7516 §4 lets us reject them), nesting deeper than [`MAX_JSON_DEPTH`].
fn parse_json_object(bytes: &[u8]) -> Option<Vec<(String, Json)>> {
    std::str::from_utf8(bytes).ok()?;
    let mut p = JsonParser { s: bytes, i: 0 };
    p.ws();
    if p.peek()? != b'{' {
        return None;
    }
    let Json::Obj(members) = p.value(1)? else {
        return None;
    };
    p.ws();
    (p.i == p.s.len()).then_some(members)
}

struct JsonParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl JsonParser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn bump(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.i += 1;
        Some(b)
    }

    fn eat(&mut self, b: u8) -> Option<()> {
        (self.bump()? == b).then_some(())
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn value(&mut self, depth: usize) -> Option<Json> {
        if depth > MAX_JSON_DEPTH {
            return None;
        }
        match self.peek()? {
            b'{' => self.object(depth),
            b'[' => {
                self.i += 1;
                self.ws();
                if self.peek()? == b']' {
                    self.i += 1;
                    return Some(Json::Other);
                }
                loop {
                    self.ws();
                    self.value(depth + 1)?;
                    self.ws();
                    match self.bump()? {
                        b',' => {}
                        b']' => return Some(Json::Other),
                        _ => return None,
                    }
                }
            }
            b'"' => self.string().map(Json::Str),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    fn object(&mut self, depth: usize) -> Option<Json> {
        self.eat(b'{')?;
        let mut members: Vec<(String, Json)> = Vec::new();
        self.ws();
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(Json::Obj(members));
        }
        loop {
            self.ws();
            let name = self.string()?;
            if members.iter().any(|(n, _)| *n == name) {
                return None;
            }
            self.ws();
            self.eat(b':')?;
            self.ws();
            let value = self.value(depth + 1)?;
            members.push((name, value));
            self.ws();
            match self.bump()? {
                b',' => {}
                b'}' => return Some(Json::Obj(members)),
                _ => return None,
            }
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<Json> {
        let end = self.i.checked_add(word.len())?;
        (self.s.get(self.i..end)? == word).then(|| {
            self.i = end;
            Json::Other
        })
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.i += 1;
        }
        self.i - start
    }

    fn number(&mut self) -> Option<Json> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        if self.peek()? == b'0' {
            self.i += 1;
        } else if self.digits() == 0 {
            return None;
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return None;
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if self.digits() == 0 {
                return None;
            }
        }
        Some(Json::Other)
    }

    fn hex4(&mut self) -> Option<u32> {
        let mut v = 0;
        for _ in 0..4 {
            v = v * 16 + char::from(self.bump()?).to_digit(16)?;
        }
        Some(v)
    }

    /// A string; the input is known to be UTF-8, and multi-byte sequences never contain
    /// `"`, `\` or control bytes, so bytes other than escapes are copied as they are.
    fn string(&mut self) -> Option<String> {
        self.eat(b'"')?;
        let mut out = Vec::new();
        loop {
            match self.bump()? {
                b'"' => return String::from_utf8(out).ok(),
                b'\\' => {
                    let c = match self.bump()? {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hi = self.hex4()?;
                            let code = if (0xd800..0xdc00).contains(&hi) {
                                self.eat(b'\\')?;
                                self.eat(b'u')?;
                                let lo = self.hex4()?;
                                if !(0xdc00..0xe000).contains(&lo) {
                                    return None;
                                }
                                0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00)
                            } else {
                                hi
                            };
                            char::from_u32(code)?
                        }
                        _ => return None,
                    };
                    let mut tmp = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut tmp).as_bytes());
                }
                b if b < 0x20 => return None,
                b => out.push(b),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------

#[cfg(test)]
mod tests;
