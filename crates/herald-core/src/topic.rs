//! The topic grammar (SPEC §1).
//!
//! A topic is 1–16 segments joined by `/`; each segment is 1–64 bytes of `[A-Za-z0-9_.:@-]`;
//! the whole topic is at most 256 bytes. Examples: `user/42/notifications`,
//! `org/7/terminals/status`, `device/d-9/telemetry`, `room/chat:room001`, `task/t-1/summary`,
//! `broadcast`.
//!
//! Anything else is refused with a [`TopicError`] that quotes the input (truncated to 64
//! characters) and says what is wrong; input is never rewritten (no trimming, no collapsing of
//! `//`). A [`Topic`] is always valid once built, so code downstream never re-checks it.
//!
//! Validation runs on every subscribe and publish: it is one pass over the bytes with a lookup
//! table, and the only allocation is the final `Arc<str>` (cloning a `Topic` is a reference
//! count increment).

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

/// Most segments a topic may have.
pub const MAX_SEGMENTS: usize = 16;
/// Most bytes one segment may have.
pub const MAX_SEGMENT_LEN: usize = 64;
/// Most bytes a whole topic may have.
pub const MAX_TOPIC_LEN: usize = 256;

/// Why a string is not a topic. Segment numbers in messages count from 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("invalid topic: empty topic")]
    Empty,
    #[error("invalid topic {topic:?}: longer than {MAX_TOPIC_LEN} bytes ({len})")]
    TooLong { topic: String, len: usize },
    #[error("invalid topic {topic:?}: too many segments ({count} > {MAX_SEGMENTS})")]
    TooManySegments { topic: String, count: usize },
    #[error("invalid topic {topic:?}: starts with '/' (segment 1 is empty)")]
    LeadingSlash { topic: String },
    #[error("invalid topic {topic:?}: ends with '/' (segment {index} is empty)")]
    TrailingSlash { topic: String, index: usize },
    #[error("invalid topic {topic:?}: segment {index} is empty")]
    EmptySegment { topic: String, index: usize },
    #[error("invalid topic {topic:?}: segment {index} is longer than {MAX_SEGMENT_LEN} bytes")]
    SegmentTooLong { topic: String, index: usize },
    #[error(
        "invalid topic {topic:?}: segment {index} has a character not allowed: {ch:?} \
         (allowed: A-Z a-z 0-9 _ . : @ -)"
    )]
    BadChar {
        topic: String,
        index: usize,
        ch: char,
    },
}

/// A valid topic. Cheap to clone; compares, hashes and orders as its string, and implements
/// `Borrow<str>`, so a `HashMap<Topic, _>` can be queried with a `&str`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(Arc<str>);

impl Topic {
    /// Validates `s` and builds a topic from it (one allocation on success).
    pub fn parse(s: &str) -> Result<Topic, TopicError> {
        validate(s)?;
        Ok(Topic(Arc::from(s)))
    }

    /// `user/{user_id}`: a user's inbox. `user_id` must be exactly one segment.
    pub fn user(user_id: &str) -> Result<Topic, TopicError> {
        Self::prefixed("user", user_id)
    }

    /// `room/{name}`: a room. `name` must be exactly one segment (no `/`).
    pub fn room(name: &str) -> Result<Topic, TopicError> {
        Self::prefixed("room", name)
    }

    /// `broadcast`: the topic every connection is implicitly subscribed to.
    pub fn broadcast() -> Topic {
        static BROADCAST: OnceLock<Topic> = OnceLock::new();
        BROADCAST
            .get_or_init(|| Topic(Arc::from("broadcast")))
            .clone()
    }

    /// The topic as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The segments, in order (never empty, each valid per [`is_valid_segment`]).
    pub fn segments(&self) -> std::str::Split<'_, char> {
        self.0.split('/')
    }

    /// Number of segments (1..=16).
    /// The user whose inbox this topic is: `{id}` for `user/{id}` and any topic below it.
    pub fn inbox_owner(&self) -> Option<&str> {
        let mut s = self.segments();
        match (s.next(), s.next()) {
            (Some("user"), Some(user)) => Some(user),
            _ => None,
        }
    }

    pub fn len_segments(&self) -> usize {
        self.0.bytes().filter(|&b| b == b'/').count() + 1
    }

    /// `{prefix}/{segment}` where `segment` must be one valid segment; errors describe the
    /// whole topic, so `room("a/b")` reports `'/'` as a character not allowed in segment 2.
    fn prefixed(prefix: &'static str, segment: &str) -> Result<Topic, TopicError> {
        let topic = || excerpt(&format!("{prefix}/{segment}"));
        if segment.is_empty() {
            return Err(TopicError::EmptySegment {
                topic: topic(),
                index: 2,
            });
        }
        if let Some(at) = segment.bytes().position(|b| !is_segment_byte(b)) {
            return Err(TopicError::BadChar {
                topic: topic(),
                index: 2,
                ch: char_at(segment, at),
            });
        }
        if segment.len() > MAX_SEGMENT_LEN {
            return Err(TopicError::SegmentTooLong {
                topic: topic(),
                index: 2,
            });
        }
        let mut s = String::with_capacity(prefix.len() + 1 + segment.len());
        s.push_str(prefix);
        s.push('/');
        s.push_str(segment);
        Ok(Topic(Arc::from(s)))
    }
}

/// Whether `s` is one valid topic segment: 1–64 bytes of `[A-Za-z0-9_.:@-]`.
pub fn is_valid_segment(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_SEGMENT_LEN && s.bytes().all(is_segment_byte)
}

/// Whether `b` may appear in a segment. Every such byte is ASCII.
#[inline]
pub(crate) fn is_segment_byte(b: u8) -> bool {
    SEGMENT_BYTE[usize::from(b)]
}

static SEGMENT_BYTE: [bool; 256] = segment_byte_table();

const fn segment_byte_table() -> [bool; 256] {
    let mut table = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        table[i] = b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'-');
        i += 1;
    }
    table
}

/// `s` cut to at most 64 characters (with `…` when cut), for quoting input in error messages.
pub(crate) fn excerpt(s: &str) -> String {
    const MAX_CHARS: usize = 64;
    match s.char_indices().nth(MAX_CHARS) {
        None => s.to_owned(),
        Some((end, _)) => format!("{}…", &s[..end]),
    }
}

/// The character starting at byte `at`. Callers pass the first byte that failed
/// [`is_segment_byte`] after only ASCII bytes, which is always a char boundary.
fn char_at(s: &str, at: usize) -> char {
    s.get(at..)
        .and_then(|rest| rest.chars().next())
        .unwrap_or(char::REPLACEMENT_CHARACTER)
}

/// The single pass: checks charset, empty and over-long segments, then the segment count.
fn validate(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong {
            topic: excerpt(s),
            len: s.len(),
        });
    }
    let bytes = s.as_bytes();
    let mut index = 1; // current segment, counted from 1
    let mut start = 0; // byte offset where it starts
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'/' {
            if i == start {
                return Err(if i == 0 {
                    TopicError::LeadingSlash { topic: excerpt(s) }
                } else {
                    TopicError::EmptySegment {
                        topic: excerpt(s),
                        index,
                    }
                });
            }
            index += 1;
            start = i + 1;
        } else if !is_segment_byte(b) {
            return Err(TopicError::BadChar {
                topic: excerpt(s),
                index,
                ch: char_at(s, i),
            });
        } else if i - start >= MAX_SEGMENT_LEN {
            return Err(TopicError::SegmentTooLong {
                topic: excerpt(s),
                index,
            });
        }
    }
    if start == bytes.len() {
        return Err(TopicError::TrailingSlash {
            topic: excerpt(s),
            index,
        });
    }
    if index > MAX_SEGMENTS {
        return Err(TopicError::TooManySegments {
            topic: excerpt(s),
            count: index,
        });
    }
    Ok(())
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Topic {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Topic {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for Topic {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for Topic {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl FromStr for Topic {
    type Err = TopicError;

    fn from_str(s: &str) -> Result<Topic, TopicError> {
        Topic::parse(s)
    }
}

impl TryFrom<&str> for Topic {
    type Error = TopicError;

    fn try_from(s: &str) -> Result<Topic, TopicError> {
        Topic::parse(s)
    }
}

impl From<Topic> for Arc<str> {
    fn from(t: Topic) -> Arc<str> {
        t.0
    }
}

impl serde::Serialize for Topic {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Topic {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Topic, D::Error> {
        struct TopicVisitor;

        impl serde::de::Visitor<'_> for TopicVisitor {
            type Value = Topic;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a topic string such as \"user/42/notifications\"")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Topic, E> {
                Topic::parse(v).map_err(E::custom)
            }
        }

        deserializer.deserialize_str(TopicVisitor)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn err(s: &str) -> TopicError {
        match Topic::parse(s) {
            Ok(t) => panic!("{s:?} accepted as {t}"),
            Err(e) => e,
        }
    }

    fn msg(s: &str) -> String {
        err(s).to_string()
    }

    fn join(segments: &[String]) -> String {
        segments.join("/")
    }

    #[test]
    fn spec_examples_are_valid() {
        let cases: [(&str, &[&str]); 6] = [
            ("user/42/notifications", &["user", "42", "notifications"]),
            (
                "org/7/terminals/status",
                &["org", "7", "terminals", "status"],
            ),
            ("device/d-9/telemetry", &["device", "d-9", "telemetry"]),
            ("room/chat:room001", &["room", "chat:room001"]),
            ("task/t-1/summary", &["task", "t-1", "summary"]),
            ("broadcast", &["broadcast"]),
        ];
        for (s, segments) in cases {
            let t = Topic::parse(s).unwrap();
            assert_eq!(t.as_str(), s);
            assert_eq!(t.to_string(), s);
            assert_eq!(t.segments().collect::<Vec<_>>(), segments);
            assert_eq!(t.len_segments(), segments.len());
        }
    }

    #[test]
    fn every_allowed_character() {
        let all = "ABCDEFGHIJKLMNOPQRSTUVWXYZ/abcdefghijklmnopqrstuvwxyz/0123456789/_.:@-";
        assert!(Topic::parse(all).is_ok());
        for s in [".", "..", "@", "-", "_", ":", "a/./b", "x:y@z.w-v_u"] {
            assert!(Topic::parse(s).is_ok(), "{s:?}");
        }
        for b in 0..=255u8 {
            let allowed = b.is_ascii_alphanumeric() || b"_.:@-".contains(&b);
            assert_eq!(is_segment_byte(b), allowed, "byte {b}");
        }
    }

    #[test]
    fn segment_count_boundary() {
        let sixteen: Vec<String> = (0..16).map(|i| format!("s{i}")).collect();
        let t = Topic::parse(&join(&sixteen)).unwrap();
        assert_eq!(t.len_segments(), 16);

        let seventeen: Vec<String> = (0..17).map(|i| format!("s{i}")).collect();
        let e = err(&join(&seventeen));
        assert!(
            matches!(e, TopicError::TooManySegments { count: 17, .. }),
            "{e:?}"
        );
        assert!(
            e.to_string().ends_with("too many segments (17 > 16)"),
            "{e}"
        );

        let many = vec!["a".to_owned(); 100];
        assert!(matches!(
            err(&join(&many)),
            TopicError::TooManySegments { count: 100, .. }
        ));
    }

    #[test]
    fn segment_length_boundary() {
        let s64 = "a".repeat(64);
        assert!(Topic::parse(&s64).is_ok());
        assert!(Topic::parse(&format!("x/{s64}/y")).is_ok());
        assert!(is_valid_segment(&s64));

        let s65 = "a".repeat(65);
        assert!(!is_valid_segment(&s65));
        let e = err(&format!("x/{s65}/y"));
        assert!(
            matches!(e, TopicError::SegmentTooLong { index: 2, .. }),
            "{e:?}"
        );
        assert!(
            e.to_string().ends_with("segment 2 is longer than 64 bytes"),
            "{e}"
        );
    }

    #[test]
    fn total_length_boundary() {
        // 64 + 63 + 63 + 63 + 3 slashes = 256 bytes.
        let s256 = join(&[
            "a".repeat(64),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(63),
        ]);
        assert_eq!(s256.len(), 256);
        assert!(Topic::parse(&s256).is_ok());

        let s257 = format!("{s256}e");
        assert_eq!(s257.len(), 257);
        let e = err(&s257);
        assert!(matches!(e, TopicError::TooLong { len: 257, .. }), "{e:?}");
        assert!(e.to_string().contains("longer than 256 bytes"), "{e}");
    }

    #[test]
    fn empty_segments_and_slashes() {
        assert_eq!(err(""), TopicError::Empty);
        assert_eq!(msg(""), "invalid topic: empty topic");
        assert_eq!(msg("a//b"), r#"invalid topic "a//b": segment 2 is empty"#);
        assert_eq!(
            msg("/a"),
            r#"invalid topic "/a": starts with '/' (segment 1 is empty)"#
        );
        assert_eq!(
            msg("a/b/"),
            r#"invalid topic "a/b/": ends with '/' (segment 3 is empty)"#
        );
        assert!(matches!(err("/"), TopicError::LeadingSlash { .. }));
        assert!(matches!(err("//"), TopicError::LeadingSlash { .. }));
        assert!(matches!(
            err("a/b//c"),
            TopicError::EmptySegment { index: 3, .. }
        ));
    }

    #[test]
    fn bad_characters_are_named() {
        assert_eq!(
            msg("user/42/a b"),
            "invalid topic \"user/42/a b\": segment 3 has a character not allowed: ' ' \
             (allowed: A-Z a-z 0-9 _ . : @ -)"
        );
        let cases = [
            ("user/*", 2, '*'),
            ("user/**", 2, '*'),
            ("a/#", 2, '#'),
            ("a/+/b", 2, '+'),
            ("über", 1, 'ü'),
            ("room/日本", 2, '日'),
            ("emoji/🙂", 2, '🙂'),
            (" user", 1, ' '),
            ("user ", 1, ' '),
            ("a\tb", 1, '\t'),
            ("a\0", 1, '\0'),
            ("a/b\nc", 2, '\n'),
            ("a\\b", 1, '\\'),
            ("{sub}", 1, '{'),
            ("a?b", 1, '?'),
            ("a%2Fb", 1, '%'),
        ];
        for (s, index, ch) in cases {
            assert_eq!(
                err(s),
                TopicError::BadChar {
                    topic: s.to_owned(),
                    index,
                    ch
                },
                "{s:?}"
            );
        }
        // Control characters are escaped in the message, not written raw.
        assert!(msg("a\nb").contains(r#""a\nb""#));
    }

    #[test]
    fn messages_truncate_long_input() {
        let long = format!("{}/ /x", "a".repeat(200));
        let e = msg(&long);
        assert!(e.contains(&format!("\"{}…\"", "a".repeat(64))), "{e}");
        assert!(e.len() < 200, "{e}");

        let huge = "é".repeat(10_000);
        let e = msg(&huge);
        assert!(e.contains(&format!("\"{}…\"", "é".repeat(64))), "{e}");
    }

    #[test]
    fn constructors() {
        assert_eq!(Topic::user("42").unwrap(), "user/42");
        assert_eq!(Topic::room("chat:room001").unwrap(), "room/chat:room001");
        assert_eq!(Topic::broadcast(), "broadcast");
        assert_eq!(Topic::broadcast(), Topic::parse("broadcast").unwrap());
        assert_eq!(Topic::user(&"u".repeat(64)).unwrap().len_segments(), 2);

        assert_eq!(
            Topic::room("a/b").unwrap_err().to_string(),
            "invalid topic \"room/a/b\": segment 2 has a character not allowed: '/' \
             (allowed: A-Z a-z 0-9 _ . : @ -)"
        );
        assert!(matches!(
            Topic::user(""),
            Err(TopicError::EmptySegment { index: 2, .. })
        ));
        assert!(matches!(
            Topic::user("a b"),
            Err(TopicError::BadChar { ch: ' ', .. })
        ));
        assert!(matches!(
            Topic::user(&"u".repeat(65)),
            Err(TopicError::SegmentTooLong { index: 2, .. })
        ));
        assert!(Topic::room("../x").is_err());
    }

    #[test]
    fn is_valid_segment_cases() {
        assert!(is_valid_segment("d-9"));
        assert!(is_valid_segment("chat:room001"));
        for s in ["", "a/b", "*", "a b", "é", &"x".repeat(65)] {
            assert!(!is_valid_segment(s), "{s:?}");
        }
    }

    #[test]
    fn works_as_map_key_queried_by_str() {
        let mut m: HashMap<Topic, u32> = HashMap::new();
        m.insert(Topic::parse("room/a").unwrap(), 1);
        assert_eq!(m.get("room/a"), Some(&1));
        assert_eq!(m.get("room/b"), None);

        let mut v = [
            Topic::parse("b").unwrap(),
            Topic::parse("a/z").unwrap(),
            Topic::parse("a").unwrap(),
        ];
        v.sort();
        let strs: Vec<&str> = v.iter().map(Topic::as_str).collect();
        assert_eq!(strs, ["a", "a/z", "b"]);
    }

    #[test]
    fn conversions() {
        let t: Topic = "a/b".parse().unwrap();
        assert_eq!(Topic::try_from("a/b").unwrap(), t);
        assert_eq!(t.as_ref(), "a/b");
        let arc: Arc<str> = t.clone().into();
        assert_eq!(&*arc, "a/b");
        assert!("a b".parse::<Topic>().is_err());
    }

    #[test]
    fn serde_round_trip_and_validation() {
        let t = Topic::parse("user/42/notifications").unwrap();
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, r#""user/42/notifications""#);
        assert_eq!(serde_json::from_str::<Topic>(&json).unwrap(), t);

        let e = serde_json::from_str::<Topic>(r#""a//b""#).unwrap_err();
        assert!(e.to_string().contains("segment 2 is empty"), "{e}");
        let e = serde_json::from_str::<Topic>("42").unwrap_err();
        assert!(e.to_string().contains("a topic string"), "{e}");
        // Escaped input is validated after unescaping.
        assert!(serde_json::from_str::<Topic>(r#""a\/b""#).is_ok());
        assert!(serde_json::from_str::<Topic>(r#""a\u0000b""#).is_err());
    }

    /// A slow, obviously correct reference implementation of the grammar.
    fn reference_valid(s: &str) -> bool {
        let segments: Vec<&str> = s.split('/').collect();
        !s.is_empty()
            && s.len() <= 256
            && segments.len() <= 16
            && segments.iter().all(|seg| {
                (1..=64).contains(&seg.len())
                    && seg
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_.:@-".contains(c))
            })
    }

    #[test]
    fn agrees_with_reference_on_generated_input() {
        // Deterministic pseudo-random strings over an alphabet biased towards edge cases.
        let alphabet = [
            "a", "Z", "9", "/", "/", "-", ".", " ", "*", "é", "🙂", "\0", "ab",
        ];
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let len = (next() % 40) as usize;
            let mut s = String::new();
            for _ in 0..len {
                s.push_str(alphabet[(next() % alphabet.len() as u64) as usize]);
            }
            // Occasionally blow up a segment past the limits.
            if next() % 10 == 0 {
                s.push_str(&"x".repeat((next() % 300) as usize));
            }
            let parsed = Topic::parse(&s);
            assert_eq!(parsed.is_ok(), reference_valid(&s), "{s:?}: {parsed:?}");
            if let Ok(t) = parsed {
                assert_eq!(t.len_segments(), t.segments().count());
                assert!(t.segments().all(is_valid_segment));
            }
        }
    }
}
