//! FHIR date/dateTime/instant and decimal text, as intervals.

use super::types::{DateRange, Decimal};

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub(crate) fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day number.
pub(crate) fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

const DAY_MS: i64 = 86_400_000;

fn digits(s: &[u8], n: usize) -> Option<i64> {
    if s.len() < n || !s[..n].iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        s[..n]
            .iter()
            .fold(0i64, |a, b| a * 10 + i64::from(b - b'0')),
    )
}

/// Parse FHIR date, dateTime or instant text (also `YYYY-MM-DDThh:mm`, allowed in search
/// values) into the interval its precision covers. No zone means UTC.
pub fn parse_date(s: &str) -> Option<DateRange> {
    let b = s.as_bytes();
    let y = digits(b, 4)?;
    if !(1..=9999).contains(&y) {
        return None;
    }
    if b.len() == 4 {
        let lo = days_from_civil(y, 1, 1) * DAY_MS;
        return Some(DateRange {
            lo,
            hi: days_from_civil(y + 1, 1, 1) * DAY_MS,
        });
    }
    if b.get(4) != Some(&b'-') {
        return None;
    }
    let m = digits(&b[5..], 2)?;
    if !(1..=12).contains(&m) {
        return None;
    }
    if b.len() == 7 {
        let lo = days_from_civil(y, m, 1) * DAY_MS;
        let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
        return Some(DateRange {
            lo,
            hi: days_from_civil(ny, nm, 1) * DAY_MS,
        });
    }
    if b.get(7) != Some(&b'-') {
        return None;
    }
    let d = digits(b.get(8..)?, 2)?;
    if d < 1 || d > days_in_month(y, m) {
        return None;
    }
    let day = days_from_civil(y, m, d) * DAY_MS;
    if b.len() == 10 {
        return Some(DateRange {
            lo: day,
            hi: day + DAY_MS,
        });
    }
    if b.get(10) != Some(&b'T') {
        return None;
    }
    let rest = &b[11..];
    let hh = digits(rest, 2)?;
    if rest.get(2) != Some(&b':') {
        return None;
    }
    let mm = digits(&rest[3..], 2)?;
    if hh > 23 || mm > 59 {
        return None;
    }
    let mut i = 5;
    let mut width = 60_000i64;
    let mut ms = hh * 3_600_000 + mm * 60_000;
    if rest.get(i) == Some(&b':') {
        let ss = digits(&rest[i + 1..], 2)?;
        if ss > 60 {
            return None;
        }
        ms += ss.min(59) * 1000;
        width = 1000;
        i += 3;
        if rest.get(i) == Some(&b'.') {
            let frac: Vec<u8> = rest[i + 1..]
                .iter()
                .copied()
                .take_while(u8::is_ascii_digit)
                .collect();
            if frac.is_empty() || frac.len() > 9 {
                return None;
            }
            let mut f = 0i64;
            for k in 0..3 {
                f = f * 10 + frac.get(k).map_or(0, |c| i64::from(c - b'0'));
            }
            ms += f;
            width = 1;
            i += 1 + frac.len();
        }
    }
    let zone = &rest[i..];
    let offset = match zone {
        [] => 0,
        [b'Z'] => 0,
        [sign @ (b'+' | b'-'), ..] if zone.len() == 6 && zone[3] == b':' => {
            let oh = digits(&zone[1..], 2)?;
            let om = digits(&zone[4..], 2)?;
            if oh > 14 || om > 59 {
                return None;
            }
            let o = oh * 3_600_000 + om * 60_000;
            if *sign == b'+' { o } else { -o }
        }
        _ => return None,
    };
    let lo = day + ms - offset;
    Some(DateRange { lo, hi: lo + width })
}

/// Parse FHIR decimal text (`-1`, `5.40`, `1e3`, `1.5E-2`) with its precision.
pub fn parse_decimal(s: &str) -> Option<Decimal> {
    let b = s.as_bytes();
    if b.is_empty() || b.len() > 64 {
        return None;
    }
    let (mant, exp) = match s.find(['e', 'E']) {
        Some(p) => {
            let e: i32 = s[p + 1..]
                .strip_prefix('+')
                .unwrap_or(&s[p + 1..])
                .parse()
                .ok()?;
            if !(-300..=300).contains(&e) {
                return None;
            }
            (&s[..p], e)
        }
        None => (s, 0),
    };
    let body = mant.strip_prefix(['-', '+']).unwrap_or(mant);
    let (int, frac) = match body.split_once('.') {
        Some((i, f)) => (i, f),
        None => (body, ""),
    };
    if int.is_empty()
        || !int.bytes().all(|c| c.is_ascii_digit())
        || !frac.bytes().all(|c| c.is_ascii_digit())
        || (body.contains('.') && frac.is_empty())
    {
        return None;
    }
    let value: f64 = s.parse().ok()?;
    if !value.is_finite() {
        return None;
    }
    let scale = frac.len() as i32 - exp;
    let half_ulp = 0.5 * 10f64.powi(-scale);
    Some(Decimal { value, half_ulp })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(y: i64, m: i64, d: i64) -> i64 {
        days_from_civil(y, m, d) * DAY_MS
    }

    #[test]
    fn precisions() {
        assert_eq!(
            parse_date("2020"),
            Some(DateRange {
                lo: ms(2020, 1, 1),
                hi: ms(2021, 1, 1)
            })
        );
        assert_eq!(
            parse_date("2020-02"),
            Some(DateRange {
                lo: ms(2020, 2, 1),
                hi: ms(2020, 3, 1)
            })
        );
        assert_eq!(
            parse_date("2020-12-31"),
            Some(DateRange {
                lo: ms(2020, 12, 31),
                hi: ms(2021, 1, 1)
            })
        );
        let t = parse_date("2020-03-15T10:30:00Z").unwrap();
        assert_eq!(t.lo, ms(2020, 3, 15) + 10 * 3_600_000 + 30 * 60_000);
        assert_eq!(t.hi - t.lo, 1000);
        let t2 = parse_date("2020-03-15T12:30:00+02:00").unwrap();
        assert_eq!(t, t2);
        let m = parse_date("2020-03-15T10:30").unwrap();
        assert_eq!(m.hi - m.lo, 60_000);
        let f = parse_date("2020-03-15T10:30:00.25Z").unwrap();
        assert_eq!(f.lo - t.lo, 250);
        assert_eq!(f.hi - f.lo, 1);
        assert_eq!(
            civil_from_days(days_from_civil(1999, 12, 31)),
            (1999, 12, 31)
        );
        assert_eq!(civil_from_days(days_from_civil(1, 1, 1)), (1, 1, 1));
    }

    #[test]
    fn invalid_dates() {
        for s in [
            "",
            "20",
            "2020-13",
            "2020-02-30",
            "2019-02-29",
            "0000",
            "2020-1-1",
            "2020-01-01T",
            "2020-01-01T24:00",
            "2020-01-01T10:00Q",
            "2020-01-01T10:00:00+1:00",
            "abcd",
            "2020-01-01T10:00:00.",
            "2020-01-01 10:00",
        ] {
            assert_eq!(parse_date(s), None, "{s}");
        }
        assert!(parse_date("2020-02-29").is_some());
    }

    #[test]
    fn decimals() {
        let d = parse_decimal("5.40").unwrap();
        assert!((d.value - 5.4).abs() < 1e-12 && (d.half_ulp - 0.005).abs() < 1e-12);
        assert!((parse_decimal("100").unwrap().half_ulp - 0.5).abs() < 1e-12);
        assert!((parse_decimal("1e3").unwrap().half_ulp - 500.0).abs() < 1e-9);
        assert!((parse_decimal("1.5E-2").unwrap().half_ulp - 0.0005).abs() < 1e-12);
        assert_eq!(parse_decimal("-2").unwrap().value, -2.0);
        for s in [
            "", "abc", "1.", ".5", "NaN", "inf", "1e", "1e999", "--1", "1.2.3",
        ] {
            assert!(parse_decimal(s).is_none(), "{s}");
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panic(s in ".{0,40}") {
            let _ = parse_date(&s);
            let _ = parse_decimal(&s);
        }

        #[test]
        fn every_valid_day_parses(y in 1i64..=9999, m in 1i64..=12, d in 1i64..=31) {
            let s = format!("{y:04}-{m:02}-{d:02}");
            let r = parse_date(&s);
            proptest::prop_assert_eq!(r.is_some(), d <= days_in_month(y, m));
            if let Some(r) = r {
                proptest::prop_assert_eq!(civil_from_days(r.lo.div_euclid(DAY_MS)), (y, m, d));
            }
        }
    }
}
