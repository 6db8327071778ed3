//! The `shamir` provider: the master key split at `init` into N Shamir shares over
//! GF(2^8) (`vsss-rs`), any K of which rebuild it; nothing of the key is stored anywhere
//! (`provider.json` records only N and K). The shares are printed once, one line each:
//!
//! ```text
//! pvs1-3-1a2b3c4d-<64 hex digits>-9f8e7d6c
//!      │ │        │               └ checksum: SHA-256("phivault-share-v1" ‖ index ‖ prefix ‖ share)[..4]
//!      │ │        └ the share (32 bytes)
//!      │ └ the data directory's id prefix (8 hex digits)
//!      └ the share index (1 – 16)
//! ```
//!
//! so a mistyped share is caught as mistyped, and a share of another data directory as
//! that, before any combination. Whether K shares rebuild *this* database's key is the
//! caller's check against the database's key check value.
//!
//! A server of a shamir data directory starts sealed and takes the shares through its
//! control socket ([`Pending`]); offline commands take them from `--share-file` (mode
//! 0600, one share a line) or the terminal.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use phivault_crypto::MasterKey;
use ring::digest;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::{KeyError, Provider};

/// Most shares a key is split into.
pub const MAX_SHARES: u8 = 16;
/// The share text's version tag.
const TAG: &str = "pvs1";
const DOMAIN: &[u8] = b"phivault-share-v1";
/// Hex digits of the data directory id carried in each share.
pub const PREFIX_LEN: usize = 8;
/// Longest share-file read.
const MAX_FILE: usize = 64 * 1024;

/// One share, checked (checksum) and held in memory that is wiped on drop.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct Share {
    index: u8,
    prefix: [u8; PREFIX_LEN],
    bytes: [u8; 32],
}

impl Share {
    /// The share's index (1 – 16).
    pub fn index(&self) -> u8 {
        self.index
    }
    /// The data directory id prefix it carries.
    pub fn prefix(&self) -> &str {
        std::str::from_utf8(&self.prefix).unwrap_or("")
    }
}

/// Why one share was refused. Messages carry no share material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShareError {
    #[error("that is not a phivault share (expected pvs1-INDEX-PREFIX-SHARE-CHECKSUM)")]
    Malformed,
    #[error("share {0} is mistyped: its checksum does not match; type it again")]
    Mistyped(u8),
    #[error(
        "that share belongs to another data directory (id prefix {theirs}, this one is {ours})"
    )]
    OtherDirectory { theirs: String, ours: String },
    #[error("share {0} is already held: each share counts once")]
    Duplicate(u8),
    #[error("share {index} does not exist here: this key was split into {shares} shares")]
    OutOfRange { index: u8, shares: u8 },
}

fn checksum(index: u8, prefix: &[u8], share: &[u8]) -> [u8; 4] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(DOMAIN);
    ctx.update(&[index]);
    ctx.update(prefix);
    ctx.update(share);
    let d = ctx.finish();
    let mut out = [0u8; 4];
    out.copy_from_slice(&d.as_ref()[..4]);
    out
}

fn hex_into(out: &mut Zeroizing<String>, bytes: &[u8]) {
    const H: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(H[usize::from(b >> 4)]));
        out.push(char::from(H[usize::from(b & 15)]));
    }
}

fn unhex(s: &[u8], out: &mut [u8]) -> Result<(), ShareError> {
    if s.len() != out.len() * 2 {
        return Err(ShareError::Malformed);
    }
    let v = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        _ => Err(ShareError::Malformed),
    };
    for (o, pair) in out.iter_mut().zip(s.chunks(2)) {
        *o = (v(pair[0])? << 4) | v(pair[1])?;
    }
    Ok(())
}

/// The text of one share.
fn encode(index: u8, data_dir_id: &str, share: &[u8; 32]) -> Zeroizing<String> {
    let prefix = &data_dir_id.as_bytes()[..PREFIX_LEN.min(data_dir_id.len())];
    let mut s = Zeroizing::new(String::with_capacity(100));
    s.push_str(TAG);
    s.push('-');
    s.push_str(&index.to_string());
    s.push('-');
    s.push_str(std::str::from_utf8(prefix).unwrap_or(""));
    s.push('-');
    hex_into(&mut s, share);
    s.push('-');
    hex_into(&mut s, &checksum(index, prefix, share));
    s
}

/// Read one share's text (case and spaces ignored) and check its checksum.
pub fn parse(text: &str) -> Result<Share, ShareError> {
    let mut clean: Zeroizing<Vec<u8>> = Zeroizing::new(Vec::with_capacity(text.len()));
    clean.extend(
        text.bytes()
            .filter(|b| !b.is_ascii_whitespace())
            .map(|b| b.to_ascii_lowercase()),
    );
    let mut parts = clean.split(|b| *b == b'-');
    let (Some(tag), Some(idx), Some(prefix), Some(body), Some(sum), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(ShareError::Malformed);
    };
    if tag != TAG.as_bytes()
        || prefix.len() != PREFIX_LEN
        || !prefix.iter().all(u8::is_ascii_hexdigit)
    {
        return Err(ShareError::Malformed);
    }
    let index: u8 = std::str::from_utf8(idx)
        .ok()
        .filter(|s| !s.is_empty() && s.len() <= 2 && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse().ok())
        .filter(|i| (1..=MAX_SHARES).contains(i))
        .ok_or(ShareError::Malformed)?;
    let mut share = Share {
        index,
        prefix: [0; PREFIX_LEN],
        bytes: [0; 32],
    };
    share.prefix.copy_from_slice(prefix);
    unhex(body, &mut share.bytes)?;
    let mut want = [0u8; 4];
    unhex(sum, &mut want)?;
    if checksum(index, prefix, &share.bytes) != want {
        return Err(ShareError::Mistyped(index));
    }
    Ok(share)
}

/// A CSPRNG for vsss-rs (rand_core 0.10) over ring's system random source.
struct SysRng;

impl rand_core::TryRng for SysRng {
    type Error = core::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut b = [0u8; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut b = [0u8; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        use ring::rand::SecureRandom as _;
        // the system source failing is not something to continue past with weak shares
        #[allow(clippy::expect_used)]
        ring::rand::SystemRandom::new()
            .fill(dst)
            .expect("the system random source failed");
        Ok(())
    }
}

impl rand_core::TryCryptoRng for SysRng {}

/// Split `master` into `n` shares, any `k` of which rebuild it: their texts, in index order.
pub fn split(
    master: &MasterKey,
    data_dir_id: &str,
    n: u8,
    k: u8,
) -> Result<Zeroizing<Vec<Zeroizing<String>>>, KeyError> {
    check_params(n, k)?;
    let ids = (1..=n).map(|i| vsss_rs::IdentifierGf256(vsss_rs::Gf256(i)));
    let raw: Zeroizing<Vec<Vec<u8>>> = Zeroizing::new(
        vsss_rs::Gf256::split_bytes_with_participant_ids_iter(
            usize::from(k),
            usize::from(n),
            master.expose_to_provider(),
            SysRng,
            ids,
        )
        .map_err(|e| KeyError::refused(format!("splitting the master key failed: {e:?}")))?,
    );
    let mut out = Zeroizing::new(Vec::with_capacity(raw.len()));
    for s in raw.iter() {
        let body: &[u8; 32] = s
            .get(1..)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| KeyError::refused("splitting the master key gave a malformed share"))?;
        out.push(encode(s[0], data_dir_id, body));
    }
    Ok(out)
}

/// Rebuild a master key from shares (at least two, distinct indexes; the caller checks
/// the count against the threshold and the result against the key check value).
pub fn combine(shares: &[Share]) -> Result<MasterKey, KeyError> {
    let mut raw: Zeroizing<Vec<Vec<u8>>> = Zeroizing::new(Vec::with_capacity(shares.len()));
    for s in shares {
        let mut v = Vec::with_capacity(33);
        v.push(s.index);
        v.extend_from_slice(&s.bytes);
        raw.push(v);
    }
    let secret: Zeroizing<Vec<u8>> = Zeroizing::new(
        vsss_rs::Gf256::combine_bytes(&*raw)
            .map_err(|_| KeyError::refused("the shares do not combine"))?,
    );
    let bytes: &[u8; 32] = secret
        .as_slice()
        .try_into()
        .map_err(|_| KeyError::refused("the shares do not combine to a 32-byte key"))?;
    Ok(MasterKey::from_bytes(bytes))
}

fn check_params(n: u8, k: u8) -> Result<(), KeyError> {
    if !(2..=MAX_SHARES).contains(&n) || !(2..=n).contains(&k) {
        return Err(KeyError::refused(format!(
            "--shares N and --threshold K need 2 <= K <= N <= {MAX_SHARES} (got N={n}, K={k})"
        )));
    }
    Ok(())
}

/// Shares gathered towards a threshold (a sealed server's unseal in progress). Shares are
/// wiped when dropped, on [`Pending::clear`], and once combined.
pub struct Pending {
    prefix: String,
    shares_total: u8,
    threshold: u8,
    held: Vec<Share>,
}

/// What one accepted share led to.
pub enum Progress {
    /// Held; this many of the threshold are in.
    Held { have: u8, need: u8 },
    /// The threshold is reached: the combined key (not yet checked against the database;
    /// the held shares are already wiped).
    Complete(MasterKey),
}

impl Pending {
    /// For the data directory `data_dir_id` split into `shares` shares, threshold `threshold`.
    pub fn new(data_dir_id: &str, shares: u8, threshold: u8) -> Self {
        Pending {
            prefix: data_dir_id.chars().take(PREFIX_LEN).collect(),
            shares_total: shares,
            threshold,
            held: Vec::with_capacity(usize::from(threshold)),
        }
    }

    /// Shares held so far.
    pub fn held(&self) -> u8 {
        u8::try_from(self.held.len()).unwrap_or(u8::MAX)
    }

    /// The threshold.
    pub fn threshold(&self) -> u8 {
        self.threshold
    }

    /// Discard every held share.
    pub fn clear(&mut self) {
        self.held.clear();
    }

    /// Check one share's text (checksum, data directory, index, duplicate) and hold it;
    /// at the threshold, combine.
    pub fn submit(&mut self, text: &str) -> Result<Progress, KeyError> {
        let share = parse(text).map_err(|e| KeyError::Refused(e.to_string()))?;
        let refuse = |e: ShareError| Err(KeyError::Refused(e.to_string()));
        if share.prefix() != self.prefix {
            return refuse(ShareError::OtherDirectory {
                theirs: share.prefix().to_owned(),
                ours: self.prefix.clone(),
            });
        }
        if share.index > self.shares_total {
            return refuse(ShareError::OutOfRange {
                index: share.index,
                shares: self.shares_total,
            });
        }
        if self.held.iter().any(|h| h.index == share.index) {
            return refuse(ShareError::Duplicate(share.index));
        }
        self.held.push(share);
        if self.held() < self.threshold {
            return Ok(Progress::Held {
                have: self.held(),
                need: self.threshold,
            });
        }
        let combined = combine(&self.held);
        self.clear();
        combined.map(Progress::Complete)
    }
}

/// New shares made by [`create`], kept until the command prints them ([`take_new_shares`]).
static NEW_SHARES: Mutex<Option<Zeroizing<Vec<Zeroizing<String>>>>> = Mutex::new(None);

/// Split `master` for a new data directory; the shares wait in this process for
/// [`take_new_shares`] (printed once, after the directory is complete).
pub fn create(data_dir_id: &str, master: &MasterKey, n: u8, k: u8) -> Result<Provider, KeyError> {
    let shares = split(master, data_dir_id, n, k)?;
    if let Ok(mut slot) = NEW_SHARES.lock() {
        *slot = Some(shares);
    }
    Ok(Provider::Shamir {
        shares: n,
        threshold: k,
    })
}

/// The shares made by the last [`create`] of this process, once.
pub fn take_new_shares() -> Option<Zeroizing<Vec<Zeroizing<String>>>> {
    NEW_SHARES.lock().ok().and_then(|mut s| s.take())
}

/// Read shares from a file private to its owner (mode 0600), one a line; blank lines and
/// lines starting with `#` are skipped.
pub fn read_share_file(path: &Path) -> Result<Zeroizing<Vec<Zeroizing<String>>>, KeyError> {
    let bytes = phivault_crypto::read_private_file(path, MAX_FILE).map_err(|e| {
        KeyError::refused(format!("cannot use the share file {}: {e}", path.display()))
    })?;
    let text = std::str::from_utf8(bytes.expose())
        .map_err(|_| KeyError::refused(format!("{} is not UTF-8", path.display())))?;
    Ok(Zeroizing::new(
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| Zeroizing::new(l.to_owned()))
            .collect(),
    ))
}

/// Ask for one share on the terminal, without echo.
pub fn prompt_share(prompt: &str) -> Result<Zeroizing<String>, KeyError> {
    rpassword::prompt_password(prompt).map(Zeroizing::new).map_err(|_| {
        KeyError::refused(
            "shares are asked on a terminal: run on one, or give --share-file FILE (mode 0600, one share a line)",
        )
    })
}

/// The master key of a shamir data directory for an offline command: shares from
/// `share_file`, else asked on the terminal (without echo) until the threshold.
pub fn load(
    data_dir_id: &str,
    shares: u8,
    threshold: u8,
    share_file: Option<&PathBuf>,
) -> Result<MasterKey, KeyError> {
    let mut pending = Pending::new(data_dir_id, shares, threshold);
    if let Some(path) = share_file {
        for line in read_share_file(path)?.iter() {
            if let Progress::Complete(key) = pending.submit(line)? {
                return Ok(key);
            }
        }
        return Err(KeyError::refused(format!(
            "{} holds {} valid shares; this data directory needs {threshold}",
            path.display(),
            pending.held()
        )));
    }
    loop {
        let prompt = format!("Share {} of {threshold}: ", pending.held() + 1);
        let typed = Zeroizing::new(rpassword::prompt_password(prompt).map_err(|_| {
            KeyError::refused(format!(
                "this data directory's master key is split into Shamir shares: give {threshold} of them with --share-file FILE (mode 0600, one a line), or run on a terminal"
            ))
        })?);
        match pending.submit(&typed) {
            Ok(Progress::Complete(key)) => return Ok(key),
            Ok(Progress::Held { .. }) => {}
            Err(KeyError::Refused(why)) if !why.starts_with("the shares") => {
                eprintln!("{why}");
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "1a2b3c4d5e6f708192a3b4c5d6e7f809";

    fn texts(m: &MasterKey) -> Vec<String> {
        split(m, ID, 5, 3)
            .expect("split")
            .iter()
            .map(|s| s.as_str().to_owned())
            .collect()
    }

    #[test]
    fn any_three_of_five_rebuild_the_key_and_two_do_not() {
        let m = MasterKey::generate().expect("key");
        let t = texts(&m);
        assert_eq!(t.len(), 5);
        for (i, s) in t.iter().enumerate() {
            assert!(s.starts_with(&format!("pvs1-{}-1a2b3c4d-", i + 1)), "{s}");
            assert_eq!(s.len(), 4 + 1 + 1 + 1 + 8 + 1 + 64 + 1 + 8, "{s}");
        }
        for pick in [[0, 1, 2], [0, 2, 4], [4, 3, 1], [1, 2, 3]] {
            let shares: Vec<Share> = pick.iter().map(|&i| parse(&t[i]).expect("parse")).collect();
            let back = combine(&shares).expect("combine");
            assert_eq!(
                back.expose_to_provider(),
                m.expose_to_provider(),
                "{pick:?}"
            );
        }
        let two: Vec<Share> = [0, 1]
            .iter()
            .map(|&i| parse(&t[i]).expect("parse"))
            .collect();
        let wrong = combine(&two).expect("two combine to something");
        assert_ne!(wrong.expose_to_provider(), m.expose_to_provider());
    }

    #[test]
    fn a_mistyped_share_is_caught_by_its_checksum() {
        let m = MasterKey::generate().expect("key");
        let t = texts(&m);
        // case and spaces do not matter
        assert!(parse(&format!("  {} ", t[0].to_uppercase())).is_ok());
        // every single-character change in the share body is caught as mistyped
        let body_start = "pvs1-1-1a2b3c4d-".len();
        for pos in body_start..body_start + 64 {
            let mut b = t[0].clone().into_bytes();
            b[pos] = if b[pos] == b'0' { b'1' } else { b'0' };
            let s = String::from_utf8(b).expect("ascii");
            assert_eq!(parse(&s).err(), Some(ShareError::Mistyped(1)), "{pos}");
        }
        // a changed index or prefix too
        let other_index = t[0].replacen("pvs1-1-", "pvs1-2-", 1);
        assert_eq!(parse(&other_index).err(), Some(ShareError::Mistyped(2)));
        let other_prefix = t[0].replacen("-1a2b3c4d-", "-1a2b3c4e-", 1);
        assert_eq!(parse(&other_prefix).err(), Some(ShareError::Mistyped(1)));
        for junk in [
            "",
            "pvs1",
            "pvs2-1-1a2b3c4d-00-00000000",
            "pvs1-0-1a2b3c4d-00-00",
            "pvs1-17-x",
        ] {
            assert_eq!(parse(junk).err(), Some(ShareError::Malformed), "{junk}");
        }
    }

    #[test]
    fn pending_refuses_strangers_duplicates_and_combines_at_the_threshold() {
        let m = MasterKey::generate().expect("key");
        let t = texts(&m);
        let mut p = Pending::new(ID, 5, 3);
        assert!(matches!(
            p.submit(&t[3]),
            Ok(Progress::Held { have: 1, need: 3 })
        ));
        let dup = p
            .submit(&t[3])
            .err()
            .expect("duplicate refused")
            .to_string();
        assert!(dup.contains("already held"), "{dup}");
        let other = MasterKey::generate().expect("key");
        let foreign = split(&other, "ffeeddccbbaa99887766554433221100", 5, 3).expect("split");
        let why = p
            .submit(&foreign[0])
            .err()
            .expect("foreign refused")
            .to_string();
        assert!(why.contains("another data directory"), "{why}");
        assert_eq!(p.held(), 1, "refusals hold nothing");
        assert!(matches!(
            p.submit(&t[0]),
            Ok(Progress::Held { have: 2, .. })
        ));
        match p.submit(&t[4]) {
            Ok(Progress::Complete(k)) => assert_eq!(k.expose_to_provider(), m.expose_to_provider()),
            _ => panic!("three shares combine"),
        }
        assert_eq!(p.held(), 0, "combined shares are not kept");
        assert!(split(&m, ID, 17, 3).is_err());
        assert!(split(&m, ID, 5, 1).is_err());
        assert!(split(&m, ID, 3, 4).is_err());
    }

    #[test]
    fn a_share_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let m = MasterKey::generate().expect("key");
        let t = texts(&m);
        let tmp = tempfile::tempdir().expect("tmp");
        let f = tmp.path().join("shares");
        let body = format!("# ours\n{}\n\n{}\n{}\n", t[0], t[2], t[4]);
        phivault_crypto::write_private_file(&f, body.as_bytes()).expect("write");
        let k = load(ID, 5, 3, Some(&f)).expect("load");
        assert_eq!(k.expose_to_provider(), m.expose_to_provider());
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(load(ID, 5, 3, Some(&f)).is_err());
    }
}
