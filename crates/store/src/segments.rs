//! Merged blind-index postings, packed into segments.
//!
//! An index (one search parameter of one resource type) is the sorted sequence of its
//! `(token, resource number)` pairs. It is cut into segments of about [`SEG_TARGET`]
//! bytes, stored as rows `search_seg(ix, tok, lo, data)` keyed by their first pair, so a
//! posting costs one or two bytes instead of a B-tree row of ~33 (the resource number is
//! a small integer, delta-encoded within its token's run). A segment's data is a run of
//! groups:
//!
//! ```text
//! group = token_len u8 ‖ token ‖ count varint ‖ first number varint ‖ (count-1) × delta varint
//! ```
//!
//! A token's postings can continue from one segment into the next, so a lookup reads the
//! segment holding the token's start and every later segment that begins with it.

use crate::pending::Tok;

/// Encoded size a merge aims for when it cuts segments.
pub(crate) const SEG_TARGET: usize = 512;

/// A posting: `(token, resource number)`.
pub(crate) type Pair = (Tok, i64);

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(data: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let b = *data.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Encode sorted, distinct pairs as one segment.
pub(crate) fn encode(pairs: &[Pair]) -> Vec<u8> {
    let mut out = Vec::with_capacity(pairs.len() * 2 + 8);
    let mut i = 0;
    while i < pairs.len() {
        let tok = &pairs[i].0;
        let run = pairs[i..].iter().take_while(|(t, _)| t == tok).count();
        let t = tok.bytes();
        out.push(t.len() as u8);
        out.extend_from_slice(t);
        put_varint(&mut out, run as u64);
        let mut prev = 0i64;
        for (k, (_, n)) in pairs[i..i + run].iter().enumerate() {
            let v = if k == 0 { *n } else { n - prev };
            put_varint(&mut out, v as u64);
            prev = *n;
        }
        i += run;
    }
    out
}

/// Decode a segment; None if it is not well formed.
pub(crate) fn decode(data: &[u8]) -> Option<Vec<Pair>> {
    let mut out = Vec::with_capacity(data.len());
    let mut pos = 0;
    while pos < data.len() {
        let len = usize::from(data[pos]);
        pos += 1;
        let tok = Tok::new(data.get(pos..pos + len)?);
        pos += len;
        let count = get_varint(data, &mut pos)?;
        if count == 0 || count > data.len() as u64 {
            return None;
        }
        let mut n: i64 = 0;
        for k in 0..count {
            let v = i64::try_from(get_varint(data, &mut pos)?).ok()?;
            n = if k == 0 { v } else { n.checked_add(v)? };
            out.push((tok.clone(), n));
        }
    }
    Some(out)
}

/// The resource numbers of `tok` in a segment.
pub(crate) fn postings_of(data: &[u8], tok: &Tok) -> Option<Vec<i64>> {
    Some(
        decode(data)?
            .into_iter()
            .filter(|(t, _)| t == tok)
            .map(|(_, n)| n)
            .collect(),
    )
}

/// Cut sorted pairs into segments of about [`SEG_TARGET`] bytes: `(first pair, data)`.
pub(crate) fn cut(pairs: &[Pair]) -> Vec<(Pair, Vec<u8>)> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut size = 0;
    let mut prev_tok: Option<&Tok> = None;
    for (i, (t, _)) in pairs.iter().enumerate() {
        // bytes this pair adds: a new group header, or one delta
        let add = if prev_tok == Some(t) {
            3
        } else {
            t.bytes().len() + 5
        };
        if size + add > SEG_TARGET && i > start {
            out.push((pairs[start].clone(), encode(&pairs[start..i])));
            start = i;
            size = t.bytes().len() + 5;
        } else {
            size += add;
        }
        prev_tok = Some(t);
    }
    if start < pairs.len() {
        out.push((pairs[start].clone(), encode(&pairs[start..])));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pairs(raw: &[(&[u8], i64)]) -> Vec<Pair> {
        raw.iter().map(|(t, n)| (Tok::new(t), *n)).collect()
    }

    #[test]
    fn a_segment_round_trips_and_is_small() {
        let p = pairs(&[
            (b"aa", 1),
            (b"aa", 2),
            (b"aa", 300),
            (b"ab", 7),
            (b"b", 1 << 40),
        ]);
        let d = encode(&p);
        assert_eq!(decode(&d).unwrap(), p);
        assert_eq!(postings_of(&d, &Tok::new(b"aa")).unwrap(), [1, 2, 300]);
        assert!(postings_of(&d, &Tok::new(b"zz")).unwrap().is_empty());
        // 1,000 consecutive numbers under one 2-byte token: about a byte each
        let dense: Vec<Pair> = (1..=1000).map(|n| (Tok::new(b"xy"), n)).collect();
        assert!(encode(&dense).len() < 1010);
    }

    #[test]
    fn malformed_segments_are_refused() {
        assert!(decode(&[5, b'a']).is_none());
        assert!(decode(&[1, b'a', 0]).is_none());
        assert!(decode(&[1, b'a', 2, 1]).is_none());
        assert!(decode(&[1, b'a', 1, 0xff]).is_none());
    }

    proptest! {
        #[test]
        fn cut_segments_hold_every_pair_once(
            raw in prop::collection::btree_set((prop::collection::vec(any::<u8>(), 0..4), 1i64..5000), 0..2000)
        ) {
            let p: Vec<Pair> = raw.iter().map(|(t, n)| (Tok::new(t), *n)).collect();
            let mut sorted = p.clone();
            sorted.sort();
            let segs = cut(&sorted);
            let mut back = Vec::new();
            for (first, data) in &segs {
                prop_assert!(data.len() <= SEG_TARGET + 16);
                let d = decode(data).unwrap();
                prop_assert_eq!(&d[0], first);
                back.extend(d);
            }
            prop_assert_eq!(back, sorted);
        }
    }
}
