//! Minimal proleptic-Gregorian calendar helpers (UTC only).

/// Days since 1970-01-01 for a civil date (H. Hinnant's `days_from_civil`).
pub(crate) const fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Civil date `(year, month, day)` for days since 1970-01-01.
pub(crate) const fn civil_from_days(z: i64) -> (i64, i64, i64) {
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

/// FHIR `date`: `YYYY-MM-DD`.
pub(crate) fn fmt_date(days: i64) -> String {
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}")
}

/// FHIR `dateTime` / `instant` in UTC: `YYYY-MM-DDThh:mm:ssZ`.
pub(crate) fn fmt_datetime(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    format!(
        "{}T{:02}:{:02}:{:02}Z",
        fmt_date(days),
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Whole years between two day numbers (age on `on` for someone born `born`).
pub(crate) fn age_years(born: i64, on: i64) -> i64 {
    let (by, bm, bd) = civil_from_days(born);
    let (y, m, d) = civil_from_days(on);
    let mut age = y - by;
    if (m, d) < (bm, bd) {
        age -= 1;
    }
    age.max(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(fmt_date(days_from_civil(1930, 1, 1)), "1930-01-01");
        assert_eq!(fmt_date(days_from_civil(2024, 2, 29)), "2024-02-29");
        for z in -30_000..30_000 {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
        assert_eq!(fmt_datetime(1_614_852_900), "2021-03-04T10:15:00Z");
    }

    #[test]
    fn ages() {
        let b = days_from_civil(1980, 6, 15);
        assert_eq!(age_years(b, days_from_civil(2020, 6, 14)), 39);
        assert_eq!(age_years(b, days_from_civil(2020, 6, 15)), 40);
    }
}
