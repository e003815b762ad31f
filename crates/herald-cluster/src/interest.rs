//! Seed 001's interest counters: for topics matching a pattern such as
//! `device/{deviceID}/telemetry`, the cluster keeps a counter under a key such as
//! `ws:sub:{deviceID}` holding how many clients watch that device, so an uplink can skip
//! telemetry nobody watches. Pure: matching and key building; the backends write the values.

use std::time::Duration;

use herald_core::topic::Topic;

/// The counter settings: which topics, which key, how long a value outlives its last refresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterestCounters {
    segments: Vec<Segment>,
    key: Vec<Part>,
    /// A counter not refreshed for this long disappears (a dead node's share with it).
    pub ttl: Duration,
    /// While watched, a counter's TTL is renewed this often.
    pub refresh: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Var(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Var(usize),
}

/// A bad pattern or key template (a configuration error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TemplateError(String);

fn var_name(s: &str) -> Option<&str> {
    s.strip_prefix('{')?.strip_suffix('}')
}

impl InterestCounters {
    /// `topic`: segments separated by `/`, a whole segment `{name}` captures one topic
    /// segment. `key`: text in which each `{name}` is replaced by the captured segment.
    pub fn new(
        topic: &str,
        key: &str,
        ttl: Duration,
        refresh: Duration,
    ) -> Result<Self, TemplateError> {
        let mut segments = Vec::new();
        for seg in topic.split('/') {
            match var_name(seg) {
                Some(v) if !v.is_empty() && !v.contains(['{', '}']) => {
                    if segments.contains(&Segment::Var(v.to_owned())) {
                        return Err(TemplateError(format!(
                            "interest topic {topic:?}: {{{v}}} appears twice"
                        )));
                    }
                    segments.push(Segment::Var(v.to_owned()))
                }
                _ if seg.contains(['{', '}']) || seg.is_empty() => {
                    return Err(TemplateError(format!(
                        "interest topic {topic:?}: segment {seg:?} must be text or a whole {{name}}"
                    )));
                }
                _ => segments.push(Segment::Literal(seg.to_owned())),
            }
        }
        let mut parts = Vec::new();
        let mut rest = key;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_owned()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| TemplateError(format!("interest key {key:?}: unclosed {{")))?
                + open;
            let name = &rest[open + 1..close];
            let index = segments
                .iter()
                .position(|s| *s == Segment::Var(name.to_owned()))
                .ok_or_else(|| {
                    TemplateError(format!(
                        "interest key {key:?}: {{{name}}} is not a variable of the topic {topic:?}"
                    ))
                })?;
            parts.push(Part::Var(index));
            rest = &rest[close + 1..];
        }
        if rest.contains('}') {
            return Err(TemplateError(format!("interest key {key:?}: stray }}")));
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_owned()));
        }
        if !parts.iter().any(|p| matches!(p, Part::Var(_))) {
            return Err(TemplateError(format!(
                "interest key {key:?} names no topic variable: every device would share one counter"
            )));
        }
        if refresh.is_zero() || refresh >= ttl {
            return Err(TemplateError(format!(
                "interest refresh ({refresh:?}) must be shorter than its ttl ({ttl:?})"
            )));
        }
        Ok(Self {
            segments,
            key: parts,
            ttl,
            refresh,
        })
    }

    /// Seed 001's defaults: `device/{deviceID}/telemetry` → `ws:sub:{deviceID}`, TTL 300 s
    /// refreshed every 120 s.
    pub fn seed_default() -> Self {
        Self {
            segments: vec![
                Segment::Literal("device".into()),
                Segment::Var("deviceID".into()),
                Segment::Literal("telemetry".into()),
            ],
            key: vec![Part::Literal("ws:sub:".into()), Part::Var(1)],
            ttl: Duration::from_secs(300),
            refresh: Duration::from_secs(120),
        }
    }

    /// The counter key of `topic`, when it matches the pattern.
    pub fn key_for(&self, topic: &Topic) -> Option<String> {
        let mut captured: Vec<&str> = Vec::with_capacity(self.segments.len());
        let mut n = 0;
        for (seg, pat) in topic.segments().zip(&self.segments) {
            match pat {
                Segment::Literal(l) if l != seg => return None,
                _ => captured.push(seg),
            }
            n += 1;
        }
        if n != self.segments.len() || topic.len_segments() != n {
            return None;
        }
        let mut key = String::new();
        for p in &self.key {
            match p {
                Part::Literal(l) => key.push_str(l),
                Part::Var(i) => key.push_str(captured[*i]),
            }
        }
        Some(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Topic {
        Topic::parse(s).unwrap()
    }

    #[test]
    fn the_seed_default_matches_device_telemetry_only() {
        let c = InterestCounters::seed_default();
        assert_eq!(
            c.key_for(&t("device/d-9/telemetry")).as_deref(),
            Some("ws:sub:d-9")
        );
        assert_eq!(c.key_for(&t("device/d-9/status")), None);
        assert_eq!(c.key_for(&t("device/d-9/telemetry/x")), None);
        assert_eq!(c.key_for(&t("device/d-9")), None);
        assert_eq!(c.key_for(&t("room/d-9/telemetry")), None);
        let parsed = InterestCounters::new(
            "device/{deviceID}/telemetry",
            "ws:sub:{deviceID}",
            Duration::from_secs(300),
            Duration::from_secs(120),
        )
        .unwrap();
        assert_eq!(parsed, c);
    }

    #[test]
    fn templates_with_several_variables() {
        let c = InterestCounters::new(
            "site/{site}/dev/{id}",
            "{site}.watch.{id}!",
            Duration::from_secs(10),
            Duration::from_secs(4),
        )
        .unwrap();
        assert_eq!(
            c.key_for(&t("site/s1/dev/d2")).as_deref(),
            Some("s1.watch.d2!")
        );
    }

    #[test]
    fn bad_templates_are_refused_with_the_reason() {
        let d = |topic: &str, key: &str| {
            InterestCounters::new(
                topic,
                key,
                Duration::from_secs(300),
                Duration::from_secs(120),
            )
            .unwrap_err()
            .to_string()
        };
        assert!(d("device/{id}/t", "k:{other}").contains("not a variable"));
        assert!(d("device/{id}/t", "k:{id").contains("unclosed"));
        assert!(d("device/{id}/t", "k:id}").contains("stray"));
        assert!(d("device/{id}/t", "constant").contains("names no topic variable"));
        assert!(d("device/x{id}/t", "k:{id}").contains("whole {name}"));
        assert!(d("device//t", "k:{id}").contains("must be text"));
        assert!(d("a/{id}/{id}", "k:{id}").contains("twice"));
        let slow = InterestCounters::new(
            "device/{id}",
            "k:{id}",
            Duration::from_secs(100),
            Duration::from_secs(100),
        );
        assert!(
            slow.unwrap_err()
                .to_string()
                .contains("shorter than its ttl")
        );
    }
}
