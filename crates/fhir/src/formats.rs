//! The R4 JSON schema's patterns for `date`, `dateTime`, `instant` and `time`, matched by
//! hand. Nearly every resource carries several of these values and a backtracking-free
//! regex engine spent more time on them than on the rest of validation together; the
//! schema loader uses a matcher here only when the schema's pattern text equals the one
//! it implements (otherwise it compiles the pattern), and a property test holds each
//! matcher to the regex it replaces.

/// The pattern texts, exactly as the R4 schema (`fhir.schema.json`) states them.
pub(crate) const DATE: &str = r"^([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1]))?)?$";
pub(crate) const DATE_TIME: &str = r"^([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1])(T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00)))?)?)?$";
pub(crate) const INSTANT: &str = r"^([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)-(0[1-9]|1[0-2])-(0[1-9]|[1-2][0-9]|3[0-1])T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))$";
pub(crate) const TIME: &str = r"^([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?$";

/// Which of the four patterns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Date,
    DateTime,
    Instant,
    Time,
}

/// Each pattern text with the format that implements it.
const ALL: [(&str, Format); 4] = [
    (DATE, Format::Date),
    (DATE_TIME, Format::DateTime),
    (INSTANT, Format::Instant),
    (TIME, Format::Time),
];

impl Format {
    /// The format whose pattern text is exactly `pattern`.
    pub(crate) fn of_pattern(pattern: &str) -> Option<Format> {
        ALL.into_iter()
            .find_map(|(p, f)| (p == pattern).then_some(f))
    }

    /// Whether `s` matches the pattern (the whole string).
    pub(crate) fn matches(self, s: &str) -> bool {
        let mut c = Cursor(s.as_bytes());
        let ok = match self {
            Format::Date => c.year() && c.opt(|c| c.month() && c.opt(Cursor::day)),
            Format::DateTime => {
                c.year()
                    && c.opt(|c| {
                        c.month() && c.opt(|c| c.day() && c.opt(|c| c.time_of_day() && c.zone()))
                    })
            }
            Format::Instant => c.year() && c.month() && c.day() && c.time_of_day() && c.zone(),
            Format::Time => c.clock(),
        };
        ok && c.0.is_empty()
    }
}

/// What is left of the string to match.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn byte(&mut self, want: u8) -> bool {
        match self.0.split_first() {
            Some((&b, rest)) if b == want => {
                self.0 = rest;
                true
            }
            _ => false,
        }
    }

    /// Two ASCII digits forming a number in `lo..=hi`.
    fn two(&mut self, lo: u8, hi: u8) -> bool {
        match self.0 {
            [a @ b'0'..=b'9', b @ b'0'..=b'9', rest @ ..] => {
                let n = (a - b'0') * 10 + (b - b'0');
                self.0 = rest;
                (lo..=hi).contains(&n)
            }
            _ => false,
        }
    }

    /// An optional part: taken whole when present, and a part that starts but does not
    /// match fails the whole (the patterns end in `$`, so nothing else could match it).
    fn opt(&mut self, part: impl FnOnce(&mut Self) -> bool) -> bool {
        self.0.is_empty() || part(self)
    }

    /// Four digits, not `0000`.
    fn year(&mut self) -> bool {
        match self.0 {
            [a, b, c, d, rest @ ..] if [a, b, c, d].iter().all(|x| x.is_ascii_digit()) => {
                self.0 = rest;
                [a, b, c, d] != [&b'0'; 4]
            }
            _ => false,
        }
    }

    /// `-MM`, 01–12.
    fn month(&mut self) -> bool {
        self.byte(b'-') && self.two(1, 12)
    }

    /// `-DD`, 01–31 (the calendar check is the schema's, not the pattern's).
    fn day(&mut self) -> bool {
        self.byte(b'-') && self.two(1, 31)
    }

    /// `Thh:mm:ss(.f+)?`.
    fn time_of_day(&mut self) -> bool {
        self.byte(b'T') && self.clock()
    }

    /// `hh:mm:ss(.f+)?`: hours 00–23, minutes 00–59, seconds 00–60.
    fn clock(&mut self) -> bool {
        self.two(0, 23)
            && self.byte(b':')
            && self.two(0, 59)
            && self.byte(b':')
            && self.two(0, 60)
            && self.fraction()
    }

    /// `(\.[0-9]+)?`
    fn fraction(&mut self) -> bool {
        if !self.byte(b'.') {
            return true;
        }
        let n = self.0.iter().take_while(|b| b.is_ascii_digit()).count();
        self.0 = &self.0[n..];
        n > 0
    }

    /// `Z` or `±hh:mm` with hours 00–13 (any minutes) or exactly `14:00`.
    fn zone(&mut self) -> bool {
        if self.byte(b'Z') {
            return true;
        }
        if !(self.byte(b'+') || self.byte(b'-')) {
            return false;
        }
        match self.0 {
            [b'1', b'4', b':', b'0', b'0', rest @ ..] => {
                self.0 = rest;
                true
            }
            _ => self.two(0, 13) && self.byte(b':') && self.two(0, 59),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_recognised_and_match_like_the_regex() {
        for (p, f) in ALL {
            assert_eq!(Format::of_pattern(p), Some(f));
        }
        assert_eq!(Format::of_pattern(r"^\S*$"), None);
        let cases = [
            "2024",
            "0000",
            "0001",
            "2024-02",
            "2024-13",
            "2024-00",
            "2024-02-30",
            "2024-02-31",
            "2024-02-32",
            "2024-1-01",
            "2024-01-01T",
            "2024-01-01T10:00:00",
            "2024-01-01T10:00:00Z",
            "2024-01-01T24:00:00Z",
            "2024-01-01T23:59:60Z",
            "2024-01-01T23:59:61Z",
            "2024-01-01T10:00:00.5+14:00",
            "2024-01-01T10:00:00.+01:00",
            "2024-01-01T10:00:00.123-13:59",
            "2024-01-01T10:00:00+14:01",
            "2024-01-01T10:00:00+1400",
            "2024-01-01T10:00Z",
            "2024-01-01 ",
            "10:00:00",
            "10:00:00.25",
            "10:00",
            "",
            "2024-01-01Z",
            "２０２４",
        ];
        for (p, f) in ALL {
            let re = regex_lite::Regex::new(p).unwrap();
            for s in cases {
                assert_eq!(f.matches(s), re.is_match(s), "{f:?} {s:?}");
            }
        }
    }

    fn template() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        // a full instant of random digits, cut short and with one byte replaced at random,
        // so that most strings are near misses of some pattern
        (
            proptest::collection::vec(0u8..10, 20),
            0usize..30,
            0usize..30,
            prop::sample::select(vec!["Z", "+14:00", "-13:59", "+14:30", "+09:00", "", "z"]),
            prop::sample::select(vec!['0', '9', '-', ':', 'T', '.', 'Z', '+', ' ', 'x']),
            prop::bool::ANY,
        )
            .prop_map(|(d, cut, at, zone, with, time_only)| {
                // each `D` of the template takes the next random digit
                let template = if time_only {
                    "DD:DD:DD.DD".to_owned()
                } else {
                    format!("DDDD-DD-DDTDD:DD:DD.DD{zone}")
                };
                let mut digits = d.iter().map(|&x| char::from(b'0' + x));
                let full: String = template
                    .chars()
                    .map(|ch| match ch {
                        'D' => digits.next().unwrap_or('0'),
                        other => other,
                    })
                    .collect();
                let mut s: Vec<char> = full.chars().take(cut.max(2)).collect();
                if at < s.len() && at % 3 == 0 {
                    s[at] = with;
                }
                s.into_iter().collect()
            })
    }

    /// Every matcher says what its regex says about `s`.
    fn agree(s: &str) -> Result<(), proptest::test_runner::TestCaseError> {
        for (p, f) in ALL {
            let re = regex_lite::Regex::new(p).unwrap();
            proptest::prop_assert_eq!(f.matches(s), re.is_match(s), "{:?} {:?}", f, s);
        }
        Ok(())
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(20_000))]
        #[test]
        fn every_format_agrees_with_its_regex(s in template()) {
            agree(&s)?;
        }

        #[test]
        fn arbitrary_text_agrees_too(s in "[0-9TZ:.+ -]{0,30}|\\PC{0,12}") {
            agree(&s)?;
        }
    }
}
