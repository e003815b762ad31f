//! Human durations for configuration: `"250ms"`, `"10s"`, `"5m"`, `"2h"`, `"7d"`.
//!
//! A duration is one unsigned integer followed directly by one unit (`ms`, `s`, `m`, `h`, `d`);
//! surrounding whitespace is ignored. Combinations (`"1h30m"`), fractions (`"1.5h"`) and bare
//! integers (`"10"`, ambiguous: seconds or milliseconds?) are refused with an error that quotes
//! the input.
//!
//! [`format_duration`] is the inverse: it writes the largest unit that represents the value
//! exactly (`90s` → `"90s"`, `120s` → `"2m"`). Sub-millisecond parts cannot be written and are
//! truncated.
//!
//! For configuration structs, [`serde_duration`] and [`serde_duration_opt`] (de)serialize
//! `Duration` and `Option<Duration>` fields from and to that string form:
//!
//! ```
//! use std::time::Duration;
//!
//! #[derive(serde::Deserialize)]
//! struct Limits {
//!     #[serde(with = "herald_core::duration::serde_duration")]
//!     heartbeat: Duration,
//!     // `default` makes a missing key `None`.
//!     #[serde(default, with = "herald_core::duration::serde_duration_opt")]
//!     idle: Option<Duration>,
//! }
//!
//! let l: Limits = serde_json::from_str(r#"{ "heartbeat": "25s" }"#).unwrap();
//! assert_eq!(l.heartbeat, Duration::from_secs(25));
//! assert_eq!(l.idle, None);
//! ```

use std::time::Duration;

use crate::topic::excerpt;

const UNITS_HINT: &str = "use ms, s, m, h, d";

/// Why a duration string was refused. Every message quotes the (trimmed) input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("invalid duration \"\": empty (write e.g. \"10s\" or \"250ms\")")]
    Empty,
    #[error("invalid duration {input:?}: missing unit ({UNITS_HINT})")]
    MissingUnit { input: String },
    #[error("invalid duration {input:?}: missing number (write e.g. \"10s\")")]
    MissingNumber { input: String },
    #[error("invalid duration {input:?}: unknown unit {unit:?} ({UNITS_HINT})")]
    UnknownUnit { input: String, unit: String },
    #[error("invalid duration {input:?}: too large")]
    TooLarge { input: String },
}

/// Parses `"<integer><unit>"` with unit `ms`, `s`, `m`, `h` or `d`. See the module doc.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let input = s.trim();
    if input.is_empty() {
        return Err(DurationError::Empty);
    }
    let digits = input.bytes().take_while(u8::is_ascii_digit).count();
    // All bytes before `digits` are ASCII, so this is a char boundary.
    let (number, unit) = input.split_at(digits);
    if number.is_empty() {
        return Err(DurationError::MissingNumber {
            input: excerpt(input),
        });
    }
    if unit.is_empty() {
        return Err(DurationError::MissingUnit {
            input: excerpt(input),
        });
    }
    let too_large = || DurationError::TooLarge {
        input: excerpt(input),
    };
    let n: u64 = number.parse().map_err(|_| too_large())?;
    let secs_per_unit = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => {
            return Err(DurationError::UnknownUnit {
                input: excerpt(input),
                unit: excerpt(unit),
            });
        }
    };
    n.checked_mul(secs_per_unit)
        .map(Duration::from_secs)
        .ok_or_else(too_large)
}

/// Writes `d` with the largest unit that represents it exactly (`"2m"`, `"90s"`, `"250ms"`);
/// zero is `"0s"`. Sub-millisecond parts are truncated. `parse_duration(&format_duration(d))`
/// gives `d` back for every whole-millisecond `d` that fits in `u64` milliseconds.
pub fn format_duration(d: Duration) -> String {
    if d.subsec_millis() != 0 {
        return format!("{}ms", d.as_millis());
    }
    let secs = d.as_secs();
    if secs == 0 {
        return "0s".to_owned();
    }
    for (per_unit, unit) in [(86_400, "d"), (3_600, "h"), (60, "m")] {
        if secs.is_multiple_of(per_unit) {
            return format!("{}{unit}", secs / per_unit);
        }
    }
    format!("{secs}s")
}

/// `#[serde(with = "herald_core::duration::serde_duration")]` for `Duration` fields.
pub mod serde_duration {
    use std::fmt;
    use std::time::Duration;

    use serde::{Deserializer, Serializer, de};

    pub fn serialize<S: Serializer>(d: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&super::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        deserializer.deserialize_str(DurationVisitor)
    }

    struct DurationVisitor;

    impl de::Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration string such as \"10s\" or \"250ms\" (units ms, s, m, h, d)")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            super::parse_duration(v).map_err(E::custom)
        }
    }
}

/// `#[serde(default, with = "herald_core::duration::serde_duration_opt")]` for
/// `Option<Duration>` fields (`default` makes a missing key `None`).
pub mod serde_duration_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    struct Wrap(Duration);

    impl Serialize for Wrap {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            super::serde_duration::serialize(&self.0, serializer)
        }
    }

    impl<'de> Deserialize<'de> for Wrap {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            super::serde_duration::deserialize(deserializer).map(Wrap)
        }
    }

    pub fn serialize<S: Serializer>(
        d: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => serializer.serialize_some(&Wrap(*d)),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<Wrap>::deserialize(deserializer)?.map(|w| w.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> String {
        match parse_duration(s) {
            Ok(d) => panic!("{s:?} parsed as {d:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parses_every_unit() {
        let cases = [
            ("250ms", Duration::from_millis(250)),
            ("10s", Duration::from_secs(10)),
            ("5m", Duration::from_secs(300)),
            ("2h", Duration::from_secs(7_200)),
            ("7d", Duration::from_secs(7 * 86_400)),
            ("0s", Duration::ZERO),
            ("0ms", Duration::ZERO),
            ("  10s\t\n", Duration::from_secs(10)),
            ("007s", Duration::from_secs(7)),
        ];
        for (s, want) in cases {
            assert_eq!(parse_duration(s), Ok(want), "{s:?}");
        }
    }

    #[test]
    fn error_messages_name_input_and_units() {
        assert_eq!(
            err("10x"),
            r#"invalid duration "10x": unknown unit "x" (use ms, s, m, h, d)"#
        );
        assert_eq!(
            err("10"),
            r#"invalid duration "10": missing unit (use ms, s, m, h, d)"#
        );
        assert_eq!(
            err("s"),
            r#"invalid duration "s": missing number (write e.g. "10s")"#
        );
        assert!(err("").contains("empty"));
        assert!(err("   ").contains("empty"));
        assert!(err("99999999999999999999999s").contains("too large"));
        assert!(err("300000000000000d").contains("too large"));
    }

    #[test]
    fn refuses_other_forms() {
        for s in [
            "-1s", "+1s", "1.5h", "1h30m", "10 s", "10S", "10sec", "1e3ms", "s10", "10µs", "10us",
            "٣s",
        ] {
            assert!(parse_duration(s).is_err(), "{s:?} accepted");
        }
        // Non-ASCII units are quoted, not split mid-character.
        assert!(err("5µs").contains(r#"unknown unit "µs""#));
    }

    #[test]
    fn long_input_is_truncated_in_messages() {
        let long = format!("1{}", "x".repeat(500));
        let msg = err(&long);
        assert!(msg.len() < 200, "{msg}");
        assert!(msg.contains('…'));
    }

    #[test]
    fn formats_shortest_exact_unit() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_millis(250), "250ms"),
            (Duration::from_millis(1_500), "1500ms"),
            (Duration::from_secs(1), "1s"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(120), "2m"),
            (Duration::from_secs(3_600), "1h"),
            (Duration::from_secs(5_400), "90m"),
            (Duration::from_secs(86_400), "1d"),
            (Duration::from_secs(90_000), "25h"),
            (Duration::from_nanos(1_500_000), "1ms"),
            (Duration::from_nanos(999), "0s"),
        ];
        for (d, want) in cases {
            assert_eq!(format_duration(d), want, "{d:?}");
        }
    }

    #[test]
    fn format_then_parse_round_trips() {
        for ms in [
            0,
            1,
            999,
            1_000,
            59_000,
            60_000,
            3_600_000,
            86_400_000,
            123_456_789,
        ] {
            let d = Duration::from_millis(ms);
            assert_eq!(parse_duration(&format_duration(d)), Ok(d), "{ms}ms");
        }
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Conf {
        #[serde(with = "serde_duration")]
        ttl: Duration,
        #[serde(default, with = "serde_duration_opt")]
        idle: Option<Duration>,
    }

    #[test]
    fn serde_helpers() {
        let c: Conf = serde_json::from_str(r#"{"ttl":"10m","idle":"250ms"}"#).unwrap();
        assert_eq!(
            c,
            Conf {
                ttl: Duration::from_secs(600),
                idle: Some(Duration::from_millis(250))
            }
        );
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"ttl":"10m","idle":"250ms"}"#
        );

        let c: Conf = serde_json::from_str(r#"{"ttl":"1s"}"#).unwrap();
        assert_eq!(c.idle, None);
        let c: Conf = serde_json::from_str(r#"{"ttl":"1s","idle":null}"#).unwrap();
        assert_eq!(c.idle, None);
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"ttl":"1s","idle":null}"#
        );

        let e = serde_json::from_str::<Conf>(r#"{"ttl":"10x"}"#).unwrap_err();
        assert!(e.to_string().contains(r#"unknown unit "x""#), "{e}");
        let e = serde_json::from_str::<Conf>(r#"{"ttl":10}"#).unwrap_err();
        assert!(e.to_string().contains("a duration string"), "{e}");
        let e = serde_json::from_str::<Conf>(r#"{"ttl":"1s","idle":"5"}"#).unwrap_err();
        assert!(e.to_string().contains("missing unit"), "{e}");
    }
}
