//! Ordered topic rules (SPEC §5): who may subscribe and publish to which topics, and the
//! per-topic delivery options.
//!
//! # Rules
//!
//! Configuration is a list of [`TopicRule`]s (`[[topics]]` in TOML), compiled once into an
//! [`Acl`]. Each rule has a pattern, a [`Permission`] for subscribe and one for publish (both
//! default to deny), and options (`history`, `retain`, `durable`, `conflate_ms`).
//!
//! # Patterns
//!
//! Segments separated by `/`; each segment is one of
//! - a literal (same charset as topic segments, `[A-Za-z0-9_.:@-]{1,64}`), matched exactly;
//! - `*`: exactly one segment, any value;
//! - `{name}` (`name` is `[A-Za-z0-9_]+`): exactly one segment, which must equal the
//!   connection's claim `name` (see [Claims](#claims));
//! - `**`: zero or more remaining segments; only allowed as the last segment, so
//!   `user/{sub}/**` matches `user/42` as well as `user/42/a/b`.
//!
//! Patterns are checked when the [`Acl`] is built; errors name the rule (`topics[i]`,
//! counted from 0) and quote the pattern.
//!
//! # Decision: [`Acl::allows`]
//!
//! Rules are tried in order. A rule *matches* when its pattern matches the topic, including
//! its `{name}` placeholders against the connection's claims. The **first** matching rule
//! decides, and only its permission for the requested action counts: `allow`, `deny`, or
//! `{ roles = [..] }` (allowed if any of the identity's roles is listed). A rule that matches
//! the topic but denies the action **stops the search**: later rules are not consulted. A rule
//! whose placeholder does not equal this connection's claim does not match, and the search
//! goes on. When no rule matches, the action is denied.
//!
//! # Options: [`Acl::options`]
//!
//! The options of a topic come from the first rule whose pattern matches it with every
//! `{name}` treated as `*` (publishers using the server API have no claims). No match: all
//! options off.
//!
//! # Claims
//!
//! `{name}` looks up `name` in [`Identity::claims`]: a string must equal the segment; a number
//! matches its decimal string form (`7` matches `7`, not `07`); an array matches if any of its
//! string or number elements does; booleans, null and objects never match. A missing claim
//! never matches, except that when `name` is the configured user claim (`sub` by default) and
//! the claims lack it, [`Identity::user_id`] is used.
//!
//! # Defaults
//!
//! With no rules configured ([`Acl::from_config`] with an empty list, or [`Acl::defaults`]):
//! subscribe to `user/{<user claim>}/**`, `broadcast`, `global/**` and `org/{org_id}/**`;
//! subscribe and publish on `room/*`; everything else is denied.
//!
//! # Cost
//!
//! [`Acl::allows`] runs on every subscribe and client publish. Patterns are split once at
//! construction; matching walks the topic's segments with no allocation, and a rule whose
//! segment count cannot fit the topic is skipped without walking.

use std::fmt::{self, Write as _};
use std::time::Duration;

use serde::de::{self, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::identity::Identity;
use crate::topic::{MAX_SEGMENT_LEN, MAX_SEGMENTS, Topic, excerpt, is_segment_byte};

/// Smallest and largest `history.size`.
pub const HISTORY_SIZE_RANGE: std::ops::RangeInclusive<usize> = 1..=100_000;

/// What a connection wants to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Subscribe,
    Publish,
}

/// Who may perform an action. In configuration: `"allow"`, `"deny"` or
/// `{ roles = ["admin", …] }` (a non-empty list).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Permission {
    #[default]
    Deny,
    Allow,
    /// Allowed if any of the identity's roles is in the list.
    Roles(Vec<String>),
}

impl Permission {
    /// Whether an identity with `roles` is allowed.
    pub fn permits(&self, roles: &[String]) -> bool {
        match self {
            Permission::Deny => false,
            Permission::Allow => true,
            Permission::Roles(listed) => roles.iter().any(|r| listed.contains(r)),
        }
    }
}

/// Per-topic message history (delivery class 2): a ring of the last `size` messages, each kept
/// at most `ttl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryOptions {
    /// 1..=100 000 messages.
    #[serde(deserialize_with = "deserialize_history_size")]
    pub size: usize,
    #[serde(with = "crate::duration::serde_duration")]
    pub ttl: Duration,
}

/// One `[[topics]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicRule {
    pub pattern: String,
    #[serde(default)]
    pub subscribe: Permission,
    #[serde(default)]
    pub publish: Permission,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<HistoryOptions>,
    #[serde(default)]
    pub retain: bool,
    #[serde(default)]
    pub durable: bool,
    #[serde(default)]
    pub conflate_ms: u64,
}

/// The delivery options of one topic (see [`Acl::options`]). The default is all off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TopicOptions {
    pub history: Option<HistoryOptions>,
    pub retain: bool,
    pub durable: bool,
    pub conflate_ms: u64,
}

/// Why a rule list was refused. `index` counts rules from 0, as `topics[index]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AclError {
    #[error("topics[{index}].pattern {pattern:?}: {reason}")]
    Pattern {
        index: usize,
        pattern: String,
        reason: PatternError,
    },
    #[error("topics[{index}].{action}: roles list is empty (use \"deny\" to deny everyone)")]
    EmptyRoles { index: usize, action: &'static str },
    #[error("topics[{index}].history.size: must be between 1 and 100000, got {size}")]
    HistorySize { index: usize, size: usize },
    #[error("topics[{index}].history.ttl: must be greater than 0")]
    HistoryTtl { index: usize },
}

/// What is wrong with a pattern. Segment numbers count from 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("empty pattern")]
    Empty,
    #[error("segment {0} is empty")]
    EmptySegment(usize),
    #[error("** is only allowed as the last segment")]
    DoubleStarNotLast,
    #[error("segment {index} {segment:?}: * and ** must be a whole segment")]
    PartialWildcard { index: usize, segment: String },
    #[error("segment {index} {segment:?}: a placeholder must be a whole segment {{name}}")]
    PartialPlaceholder { index: usize, segment: String },
    #[error("segment {index} {segment:?}: placeholder name must be [A-Za-z0-9_]+")]
    BadPlaceholder { index: usize, segment: String },
    #[error(
        "segment {index} has a character not allowed: {ch:?} \
         (allowed: A-Z a-z 0-9 _ . : @ -, or a whole-segment *, ** or {{name}})"
    )]
    BadChar { index: usize, ch: char },
    #[error("segment {index} is longer than {MAX_SEGMENT_LEN} bytes, so it can never match")]
    SegmentTooLong { index: usize },
    #[error(
        "{count} segments (not counting a final **); a topic has at most {MAX_SEGMENTS}, \
         so it can never match"
    )]
    TooManySegments { count: usize },
}

/// One pattern segment, pre-split.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Literal(Box<str>),
    /// `*`
    Any,
    /// `{name}`: the claim name.
    Claim(Box<str>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    /// The segments before a trailing `**` (all of them when there is none).
    segs: Box<[Seg]>,
    /// Ends with `**`: matches any number (including zero) of further segments.
    rest: bool,
}

impl Pattern {
    fn parse(pattern: &str) -> Result<Pattern, PatternError> {
        if pattern.is_empty() {
            return Err(PatternError::Empty);
        }
        let count = pattern.split('/').count();
        let mut segs = Vec::with_capacity(count);
        let mut rest = false;
        for (i, seg) in pattern.split('/').enumerate() {
            let index = i + 1;
            if seg == "**" {
                if index != count {
                    return Err(PatternError::DoubleStarNotLast);
                }
                rest = true;
            } else if seg == "*" {
                segs.push(Seg::Any);
            } else if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                {
                    return Err(PatternError::BadPlaceholder {
                        index,
                        segment: excerpt(seg),
                    });
                }
                segs.push(Seg::Claim(name.into()));
            } else {
                segs.push(Seg::Literal(parse_literal(index, seg)?));
            }
        }
        if segs.len() > MAX_SEGMENTS {
            return Err(PatternError::TooManySegments { count: segs.len() });
        }
        Ok(Pattern {
            segs: segs.into_boxed_slice(),
            rest,
        })
    }

    /// Whether the pattern matches `topic` (which has `n` segments). With `identity`, each
    /// `{name}` must equal the claim; without, it matches any segment.
    fn matches(&self, topic: &Topic, n: usize, claims: Option<(&Identity, &str)>) -> bool {
        let fixed = self.segs.len();
        if n < fixed || (!self.rest && n != fixed) {
            return false;
        }
        // `n >= fixed`, so `zip` visits every pattern segment.
        self.segs
            .iter()
            .zip(topic.segments())
            .all(|(seg, value)| match seg {
                Seg::Literal(lit) => **lit == *value,
                Seg::Any => true,
                Seg::Claim(name) => match claims {
                    None => true,
                    Some((identity, user_claim)) => {
                        claim_matches(identity, name, user_claim, value)
                    }
                },
            })
    }
}

fn parse_literal(index: usize, seg: &str) -> Result<Box<str>, PatternError> {
    if seg.is_empty() {
        return Err(PatternError::EmptySegment(index));
    }
    if let Some(at) = seg.bytes().position(|b| !is_segment_byte(b)) {
        return Err(match seg.as_bytes()[at] {
            b'*' => PatternError::PartialWildcard {
                index,
                segment: excerpt(seg),
            },
            b'{' | b'}' => PatternError::PartialPlaceholder {
                index,
                segment: excerpt(seg),
            },
            // Only ASCII bytes precede `at`, so it is a char boundary.
            _ => PatternError::BadChar {
                index,
                ch: seg[at..]
                    .chars()
                    .next()
                    .unwrap_or(char::REPLACEMENT_CHARACTER),
            },
        });
    }
    if seg.len() > MAX_SEGMENT_LEN {
        return Err(PatternError::SegmentTooLong { index });
    }
    Ok(seg.into())
}

/// Whether the claim `name` of `identity` equals the topic segment `value`.
fn claim_matches(identity: &Identity, name: &str, user_claim: &str, value: &str) -> bool {
    match identity.claims.get(name) {
        Some(Value::Array(items)) => items.iter().any(|item| scalar_matches(item, value)),
        Some(claim) => scalar_matches(claim, value),
        None => name == user_claim && *identity.user_id == *value,
    }
}

/// A string claim equals `value`; a number's decimal form equals `value`; nothing else does.
fn scalar_matches(claim: &Value, value: &str) -> bool {
    match claim {
        Value::String(s) => s == value,
        Value::Number(n) => {
            if !value.starts_with(|c: char| c.is_ascii_digit() || c == '-') {
                return false;
            }
            // Format on the stack: no allocation on the hot path. A number whose decimal form
            // does not fit cannot equal a segment (at most 64 bytes) anyway.
            let mut buf = SegmentBuf::default();
            write!(buf, "{n}").is_ok() && buf.as_bytes() == value.as_bytes()
        }
        _ => false,
    }
}

/// A fixed buffer of one segment's size, for formatting numbers without allocating.
struct SegmentBuf {
    buf: [u8; MAX_SEGMENT_LEN],
    len: usize,
}

impl Default for SegmentBuf {
    fn default() -> Self {
        SegmentBuf {
            buf: [0; MAX_SEGMENT_LEN],
            len: 0,
        }
    }
}

impl SegmentBuf {
    fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }
}

impl fmt::Write for SegmentBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len.checked_add(s.len()).ok_or(fmt::Error)?;
        let dst = self.buf.get_mut(self.len..end).ok_or(fmt::Error)?;
        dst.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct CompiledRule {
    /// The pattern as written, for `Debug` and diagnostics.
    source: Box<str>,
    pattern: Pattern,
    subscribe: Permission,
    publish: Permission,
    options: TopicOptions,
}

/// Compiled topic rules. Immutable; share it behind an `Arc`.
#[derive(Debug, Clone)]
pub struct Acl {
    rules: Box<[CompiledRule]>,
    user_claim: Box<str>,
}

impl Acl {
    /// Compiles `rules` in order. `user_claim` is the claim the user id comes from (`sub` by
    /// default; see the module doc, [Claims](#claims)). An empty list denies everything; use
    /// [`Acl::from_config`] to get the defaults instead.
    pub fn new(rules: Vec<TopicRule>, user_claim: &str) -> Result<Acl, AclError> {
        let compiled = rules
            .into_iter()
            .enumerate()
            .map(|(index, rule)| compile(index, rule))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Acl {
            rules: compiled.into_boxed_slice(),
            user_claim: user_claim.into(),
        })
    }

    /// The configured rules, or [`Acl::defaults`] when none are configured.
    pub fn from_config(rules: Vec<TopicRule>, user_claim: &str) -> Result<Acl, AclError> {
        if rules.is_empty() {
            Ok(Acl::defaults(user_claim))
        } else {
            Acl::new(rules, user_claim)
        }
    }

    /// The rules used when none are configured: subscribe to `user/{<user_claim>}/**`,
    /// `broadcast`, `global/**` and `org/{org_id}/**`; subscribe and publish on `room/*`;
    /// everything else denied. Works for any claim name, even one that could not be written
    /// as a `{name}` placeholder.
    pub fn defaults(user_claim: &str) -> Acl {
        let lit = |s: &str| Seg::Literal(s.into());
        let subscribe_only = |source: String, segs: Vec<Seg>, rest: bool| CompiledRule {
            source: source.into(),
            pattern: Pattern {
                segs: segs.into_boxed_slice(),
                rest,
            },
            subscribe: Permission::Allow,
            publish: Permission::Deny,
            options: TopicOptions::default(),
        };
        let rules = vec![
            subscribe_only(
                format!("user/{{{user_claim}}}/**"),
                vec![lit("user"), Seg::Claim(user_claim.into())],
                true,
            ),
            subscribe_only("broadcast".to_owned(), vec![lit("broadcast")], false),
            subscribe_only("global/**".to_owned(), vec![lit("global")], true),
            subscribe_only(
                "org/{org_id}/**".to_owned(),
                vec![lit("org"), Seg::Claim("org_id".into())],
                true,
            ),
            CompiledRule {
                publish: Permission::Allow,
                ..subscribe_only("room/*".to_owned(), vec![lit("room"), Seg::Any], false)
            },
        ];
        Acl {
            rules: rules.into_boxed_slice(),
            user_claim: user_claim.into(),
        }
    }

    /// Whether `identity` may perform `action` on `topic`: the first rule whose pattern
    /// matches (placeholders against this identity's claims) decides; no match denies.
    pub fn allows(&self, action: Action, topic: &Topic, identity: &Identity) -> bool {
        let n = topic.len_segments();
        let claims = Some((identity, &*self.user_claim));
        self.rules
            .iter()
            .find(|rule| rule.pattern.matches(topic, n, claims))
            .is_some_and(|rule| match action {
                Action::Subscribe => rule.subscribe.permits(&identity.roles),
                Action::Publish => rule.publish.permits(&identity.roles),
            })
    }

    /// The options of the first rule whose pattern matches `topic`, with every `{name}`
    /// treated as `*`; all off when none matches.
    pub fn options(&self, topic: &Topic) -> TopicOptions {
        let n = topic.len_segments();
        self.rules
            .iter()
            .find(|rule| rule.pattern.matches(topic, n, None))
            .map(|rule| rule.options)
            .unwrap_or_default()
    }

    /// The rules' patterns as written, in order (for diagnostics and `check-config`).
    pub fn patterns(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|rule| &*rule.source)
    }

    /// Number of compiled rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there are no rules (everything is denied).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

fn compile(index: usize, rule: TopicRule) -> Result<CompiledRule, AclError> {
    let pattern = Pattern::parse(&rule.pattern).map_err(|reason| AclError::Pattern {
        index,
        pattern: excerpt(&rule.pattern),
        reason,
    })?;
    for (action, permission) in [("subscribe", &rule.subscribe), ("publish", &rule.publish)] {
        if matches!(permission, Permission::Roles(roles) if roles.is_empty()) {
            return Err(AclError::EmptyRoles { index, action });
        }
    }
    if let Some(history) = rule.history {
        if !HISTORY_SIZE_RANGE.contains(&history.size) {
            return Err(AclError::HistorySize {
                index,
                size: history.size,
            });
        }
        if history.ttl.is_zero() {
            return Err(AclError::HistoryTtl { index });
        }
    }
    Ok(CompiledRule {
        source: rule.pattern.into_boxed_str(),
        pattern,
        subscribe: rule.subscribe,
        publish: rule.publish,
        options: TopicOptions {
            history: rule.history,
            retain: rule.retain,
            durable: rule.durable,
            conflate_ms: rule.conflate_ms,
        },
    })
}

fn deserialize_history_size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<usize, D::Error> {
    let size = usize::deserialize(deserializer)?;
    if HISTORY_SIZE_RANGE.contains(&size) {
        Ok(size)
    } else {
        Err(de::Error::custom(format_args!(
            "history size must be between 1 and 100000, got {size}"
        )))
    }
}

const PERMISSION_FORMS: &str = r#""allow", "deny" or { roles = ["…"] }"#;

impl<'de> Deserialize<'de> for Permission {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PermissionVisitor;

        impl<'de> Visitor<'de> for PermissionVisitor {
            type Value = Permission;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(PERMISSION_FORMS)
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Permission, E> {
                match v {
                    "allow" => Ok(Permission::Allow),
                    "deny" => Ok(Permission::Deny),
                    _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
                }
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Permission, A::Error> {
                let mut roles: Option<Vec<String>> = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key != "roles" {
                        return Err(de::Error::custom(format_args!(
                            "unknown field `{}` in permission, expected {PERMISSION_FORMS}",
                            excerpt(&key)
                        )));
                    }
                    if roles.is_some() {
                        return Err(de::Error::duplicate_field("roles"));
                    }
                    roles = Some(map.next_value()?);
                }
                match roles {
                    None => Err(de::Error::custom(format_args!(
                        "missing field `roles` in permission, expected {PERMISSION_FORMS}"
                    ))),
                    Some(roles) if roles.is_empty() => Err(de::Error::custom(
                        "roles list is empty (use \"deny\" to deny everyone)",
                    )),
                    Some(roles) => Ok(Permission::Roles(roles)),
                }
            }
        }

        deserializer.deserialize_any(PermissionVisitor)
    }
}

impl Serialize for Permission {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Permission::Allow => serializer.serialize_str("allow"),
            Permission::Deny => serializer.serialize_str("deny"),
            Permission::Roles(roles) => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("roles", roles)?;
                map.end()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;

    fn topic(s: &str) -> Topic {
        Topic::parse(s).unwrap()
    }

    fn identity(user_id: &str, claims: Value, roles: &[&str]) -> Identity {
        let Value::Object(claims) = claims else {
            panic!("claims must be an object");
        };
        Identity {
            user_id: Arc::from(user_id),
            claims,
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
        }
    }

    fn rules(json: &str) -> Vec<TopicRule> {
        serde_json::from_str(json).unwrap()
    }

    fn acl_from(json: &str) -> Acl {
        Acl::new(rules(json), "sub").unwrap()
    }

    fn sub(acl: &Acl, t: &str, id: &Identity) -> bool {
        acl.allows(Action::Subscribe, &topic(t), id)
    }

    fn publ(acl: &Acl, t: &str, id: &Identity) -> bool {
        acl.allows(Action::Publish, &topic(t), id)
    }

    /// The SPEC §5 example, as JSON (the TOML shape maps onto it one to one).
    const SPEC_RULES: &str = r#"[
        { "pattern": "user/{sub}/**", "subscribe": "allow" },
        { "pattern": "org/{org_id}/**", "subscribe": "allow" },
        { "pattern": "admin/**", "subscribe": { "roles": ["admin"] } },
        { "pattern": "room/*", "subscribe": "allow", "publish": "allow",
          "history": { "size": 100, "ttl": "10m" } },
        { "pattern": "device/*/telemetry", "subscribe": "allow", "retain": true,
          "conflate_ms": 0, "durable": false }
    ]"#;

    #[test]
    fn spec_example_rules() {
        let acl = acl_from(SPEC_RULES);
        assert_eq!(acl.len(), 5);
        let alice = identity("42", json!({ "sub": "42", "org_id": 7 }), &[]);
        let admin = identity("1", json!({ "sub": "1" }), &["admin"]);

        assert!(sub(&acl, "user/42/notifications", &alice));
        assert!(sub(&acl, "user/42", &alice));
        assert!(!sub(&acl, "user/43/notifications", &alice));
        assert!(!publ(&acl, "user/42/notifications", &alice));

        assert!(sub(&acl, "org/7/terminals/status", &alice));
        assert!(!sub(&acl, "org/8/terminals/status", &alice));
        assert!(!sub(&acl, "org/7/terminals/status", &admin));

        assert!(sub(&acl, "admin/stats", &admin));
        assert!(sub(&acl, "admin", &admin));
        assert!(!sub(&acl, "admin/stats", &alice));
        assert!(!publ(&acl, "admin/stats", &admin));

        assert!(sub(&acl, "room/chat:room001", &alice));
        assert!(publ(&acl, "room/chat:room001", &alice));
        assert!(!sub(&acl, "room/a/b", &alice));
        assert!(!sub(&acl, "room", &alice));

        assert!(sub(&acl, "device/d-9/telemetry", &alice));
        assert!(!publ(&acl, "device/d-9/telemetry", &alice));
        assert!(!sub(&acl, "device/d-9/status", &alice));

        assert!(!sub(&acl, "broadcast", &alice));
        assert!(!sub(&acl, "task/t-1/summary", &alice));

        assert_eq!(
            acl.options(&topic("room/lobby")),
            TopicOptions {
                history: Some(HistoryOptions {
                    size: 100,
                    ttl: Duration::from_secs(600)
                }),
                ..TopicOptions::default()
            }
        );
        assert_eq!(
            acl.options(&topic("device/d-9/telemetry")),
            TopicOptions {
                retain: true,
                ..TopicOptions::default()
            }
        );
        assert_eq!(acl.options(&topic("nothing/here")), TopicOptions::default());
    }

    #[test]
    fn defaults() {
        let acl = Acl::defaults("sub");
        let u42 = identity("42", json!({ "sub": "42" }), &[]);

        assert!(sub(&acl, "user/42/x", &u42));
        assert!(sub(&acl, "user/42", &u42));
        assert!(sub(&acl, "user/42/a/b/c", &u42));
        assert!(!sub(&acl, "user/43/x", &u42));
        assert!(!sub(&acl, "user/43", &u42));
        assert!(!publ(&acl, "user/42", &u42));

        assert!(sub(&acl, "broadcast", &u42));
        assert!(!sub(&acl, "broadcast/x", &u42));
        assert!(!publ(&acl, "broadcast", &u42));
        assert!(sub(&acl, "global", &u42));
        assert!(sub(&acl, "global/news", &u42));

        assert!(sub(&acl, "room/lobby", &u42));
        assert!(publ(&acl, "room/lobby", &u42));
        assert!(!publ(&acl, "room/lobby/x", &u42));

        assert!(!sub(&acl, "admin/x", &u42));
        assert!(!sub(&acl, "device/d-9/telemetry", &u42));
        assert!(!sub(&acl, "org/7/x", &u42), "no org_id claim");

        assert_eq!(acl.options(&topic("room/lobby")), TopicOptions::default());
    }

    #[test]
    fn defaults_org_claim_forms() {
        let acl = Acl::defaults("sub");
        let string = identity("1", json!({ "org_id": "7" }), &[]);
        let number = identity("1", json!({ "org_id": 7 }), &[]);
        let array = identity("1", json!({ "org_id": [3, "7", true] }), &[]);
        let array_num = identity("1", json!({ "org_id": ["x", 7] }), &[]);
        for id in [&string, &number, &array, &array_num] {
            assert!(sub(&acl, "org/7/terminals/status", id), "{:?}", id.claims);
            assert!(sub(&acl, "org/7", id), "{:?}", id.claims);
            assert!(!sub(&acl, "org/8/terminals/status", id), "{:?}", id.claims);
            assert!(!publ(&acl, "org/7/x", id), "{:?}", id.claims);
        }
        assert!(sub(&acl, "org/3/x", &array));

        // Decimal form only: no leading zeros, no bool/null/object matches.
        assert!(!sub(&acl, "org/07/x", &number));
        for claim in [
            json!(true),
            json!(null),
            json!({ "id": "7" }),
            json!([[7]]),
            json!([]),
        ] {
            let id = identity("1", json!({ "org_id": claim }), &[]);
            assert!(!sub(&acl, "org/7/x", &id), "{claim}");
            assert!(!sub(&acl, "org/true/x", &id), "{claim}");
        }
        let neg = identity("1", json!({ "org_id": -5 }), &[]);
        assert!(sub(&acl, "org/-5/x", &neg));
        let float = identity("1", json!({ "org_id": 1.5 }), &[]);
        assert!(sub(&acl, "org/1.5/x", &float));
        let big = identity("1", json!({ "org_id": u64::MAX }), &[]);
        assert!(sub(&acl, &format!("org/{}/x", u64::MAX), &big));
    }

    #[test]
    fn user_claim_falls_back_to_user_id() {
        // The user id came from `sub`, but the claims map lacks it.
        let acl = Acl::defaults("sub");
        let id = identity("42", json!({}), &[]);
        assert!(sub(&acl, "user/42/x", &id));
        assert!(!sub(&acl, "user/43/x", &id));

        // A present claim wins over the user id.
        let id = identity("42", json!({ "sub": "9" }), &[]);
        assert!(sub(&acl, "user/9/x", &id));
        assert!(!sub(&acl, "user/42/x", &id));

        // Other placeholders never fall back.
        let acl = acl_from(r#"[{ "pattern": "team/{team}/**", "subscribe": "allow" }]"#);
        let id = identity("42", json!({}), &[]);
        assert!(!sub(&acl, "team/42", &id));

        // A custom user claim, even one that is not a valid placeholder name.
        let acl = Acl::defaults("https://example.com/uid");
        let id = identity("u-1", json!({}), &[]);
        assert!(sub(&acl, "user/u-1/x", &id));
        let acl = Acl::new(
            rules(r#"[{ "pattern": "me/{uid}", "subscribe": "allow" }]"#),
            "uid",
        )
        .unwrap();
        assert!(sub(&acl, "me/u-1", &id));
        assert!(!sub(&acl, "me/u-2", &id));
    }

    #[test]
    fn first_match_wins() {
        let acl = acl_from(
            r#"[
            { "pattern": "room/secret", "subscribe": "deny" },
            { "pattern": "room/*", "subscribe": "allow", "publish": "allow" },
            { "pattern": "room/**", "publish": "deny" }
        ]"#,
        );
        let id = identity("1", json!({}), &[]);
        assert!(!sub(&acl, "room/secret", &id));
        // The matching rule denies publish (by default) and stops the search, even though the
        // next rule would allow it.
        assert!(!publ(&acl, "room/secret", &id));
        assert!(sub(&acl, "room/lobby", &id));
        assert!(publ(&acl, "room/lobby", &id));

        // A placeholder that does not match this identity does not stop the search.
        let acl = acl_from(
            r#"[
            { "pattern": "user/{sub}/**", "subscribe": "allow" },
            { "pattern": "user/**", "subscribe": { "roles": ["support"] } }
        ]"#,
        );
        let user = identity("42", json!({ "sub": "42" }), &[]);
        let support = identity("7", json!({ "sub": "7" }), &["support"]);
        assert!(sub(&acl, "user/42/x", &user));
        assert!(!sub(&acl, "user/43/x", &user));
        assert!(sub(&acl, "user/42/x", &support));

        // Options come from the first rule matching with placeholders as `*`.
        let acl = acl_from(
            r#"[
            { "pattern": "user/{sub}/inbox", "subscribe": "allow", "durable": true },
            { "pattern": "user/*/inbox", "retain": true },
            { "pattern": "**", "conflate_ms": 100 }
        ]"#,
        );
        let opts = acl.options(&topic("user/99/inbox"));
        assert!(opts.durable && !opts.retain);
        assert_eq!(acl.options(&topic("x")).conflate_ms, 100);
    }

    #[test]
    fn roles() {
        let acl = acl_from(
            r#"[{ "pattern": "ops/**",
            "subscribe": { "roles": ["admin", "ops"] }, "publish": { "roles": ["admin"] } }]"#,
        );
        let admin = identity("1", json!({}), &["user", "admin"]);
        let ops = identity("2", json!({}), &["ops"]);
        let nobody = identity("3", json!({}), &[]);
        assert!(sub(&acl, "ops/x", &admin) && publ(&acl, "ops/x", &admin));
        assert!(sub(&acl, "ops/x", &ops) && !publ(&acl, "ops/x", &ops));
        assert!(!sub(&acl, "ops/x", &nobody) && !publ(&acl, "ops/x", &nobody));
        assert!(!Permission::Roles(vec!["a".into()]).permits(&["A".into()]));
    }

    #[test]
    fn pattern_shapes() {
        let acl = acl_from(
            r#"[
            { "pattern": "a/*/c", "subscribe": "allow" },
            { "pattern": "x/**", "subscribe": "allow" },
            { "pattern": "p/{sub}/{team}/q", "subscribe": "allow" }
        ]"#,
        );
        let id = identity("u", json!({ "team": ["t1", "t2"] }), &[]);
        assert!(sub(&acl, "a/b/c", &id));
        assert!(!sub(&acl, "a/c", &id));
        assert!(!sub(&acl, "a/b/c/d", &id));
        assert!(!sub(&acl, "A/b/c", &id));
        assert!(sub(&acl, "x", &id));
        assert!(sub(&acl, "x/1/2/3/4/5/6/7/8/9/10/11/12/13/14/15", &id));
        assert!(!sub(&acl, "xx/1", &id));
        assert!(sub(&acl, "p/u/t2/q", &id));
        assert!(!sub(&acl, "p/u/t3/q", &id));
        assert!(!sub(&acl, "p/v/t1/q", &id));

        let everything = acl_from(r#"[{ "pattern": "**", "subscribe": "allow" }]"#);
        assert!(sub(&everything, "anything/at/all", &id));

        let sixteen = (0..16).map(|i| i.to_string()).collect::<Vec<_>>().join("/");
        let acl16 = Acl::new(
            vec![TopicRule {
                pattern: format!("{sixteen}/**"),
                subscribe: Permission::Allow,
                ..TopicRule::default()
            }],
            "sub",
        )
        .unwrap();
        assert!(sub(&acl16, &sixteen, &id));
    }

    fn pattern_err(pattern: &str) -> String {
        let rule = TopicRule {
            pattern: pattern.to_owned(),
            ..TopicRule::default()
        };
        let filler = TopicRule {
            pattern: "ok/*".to_owned(),
            ..TopicRule::default()
        };
        match Acl::new(vec![filler.clone(), filler, rule], "sub") {
            Ok(_) => panic!("pattern {pattern:?} accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn bad_patterns_are_explained() {
        assert_eq!(
            pattern_err("a/**/b"),
            r#"topics[2].pattern "a/**/b": ** is only allowed as the last segment"#
        );
        assert_eq!(pattern_err(""), r#"topics[2].pattern "": empty pattern"#);
        assert_eq!(
            pattern_err("a//b"),
            r#"topics[2].pattern "a//b": segment 2 is empty"#
        );
        assert_eq!(
            pattern_err("/a"),
            r#"topics[2].pattern "/a": segment 1 is empty"#
        );
        assert_eq!(
            pattern_err("a/"),
            r#"topics[2].pattern "a/": segment 2 is empty"#
        );
        assert_eq!(
            pattern_err("a/b*"),
            r#"topics[2].pattern "a/b*": segment 2 "b*": * and ** must be a whole segment"#
        );
        assert!(pattern_err("a/***").contains("* and ** must be a whole segment"));
        assert_eq!(
            pattern_err("user/{sub}x"),
            r#"topics[2].pattern "user/{sub}x": segment 2 "{sub}x": a placeholder must be a whole segment {name}"#
        );
        assert_eq!(
            pattern_err("user/{}"),
            r#"topics[2].pattern "user/{}": segment 2 "{}": placeholder name must be [A-Za-z0-9_]+"#
        );
        assert!(pattern_err("user/{org-id}").contains("placeholder name must be"));
        assert!(pattern_err("user/{a{b}").contains("placeholder name must be"));
        assert!(pattern_err("user/{sub").contains("a placeholder must be a whole segment"));
        assert!(pattern_err("a b").contains("segment 1 has a character not allowed: ' '"));
        assert!(pattern_err("über").contains("character not allowed: 'ü'"));
        assert!(pattern_err(&format!("a/{}", "x".repeat(65))).contains("segment 2 is longer"));
        let seventeen = vec!["a"; 17].join("/");
        assert!(pattern_err(&seventeen).contains("17 segments (not counting a final **)"));
        assert!(pattern_err(&format!("{seventeen}/**")).contains("17 segments"));
        // Long patterns are truncated in the message.
        let long = pattern_err(&format!("{}/**/x", "a/".repeat(100)));
        assert!(long.contains('…') && long.len() < 200, "{long}");
    }

    #[test]
    fn bad_rule_values_are_explained() {
        let base = || TopicRule {
            pattern: "a".to_owned(),
            ..TopicRule::default()
        };
        let err = |rule: TopicRule| Acl::new(vec![rule], "sub").unwrap_err().to_string();
        assert_eq!(
            err(TopicRule {
                publish: Permission::Roles(vec![]),
                ..base()
            }),
            r#"topics[0].publish: roles list is empty (use "deny" to deny everyone)"#
        );
        assert_eq!(
            err(TopicRule {
                history: Some(HistoryOptions {
                    size: 0,
                    ttl: Duration::from_secs(1)
                }),
                ..base()
            }),
            "topics[0].history.size: must be between 1 and 100000, got 0"
        );
        assert_eq!(
            err(TopicRule {
                history: Some(HistoryOptions {
                    size: 10,
                    ttl: Duration::ZERO
                }),
                ..base()
            }),
            "topics[0].history.ttl: must be greater than 0"
        );
    }

    fn deser_err(json: &str) -> String {
        match serde_json::from_str::<Vec<TopicRule>>(json) {
            Ok(r) => panic!("{json} accepted as {r:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn permission_forms() {
        let r = rules(
            r#"[{ "pattern": "a", "subscribe": "allow", "publish": { "roles": ["x", "y"] } }]"#,
        );
        assert_eq!(r[0].subscribe, Permission::Allow);
        assert_eq!(
            r[0].publish,
            Permission::Roles(vec!["x".into(), "y".into()])
        );
        let r = rules(r#"[{ "pattern": "a", "subscribe": "deny" }]"#);
        assert_eq!(r[0].subscribe, Permission::Deny);
        assert_eq!(r[0].publish, Permission::Deny, "default");

        for bad in [
            r#""yes""#,
            r#""Allow""#,
            "true",
            "1",
            r#"["admin"]"#,
            "null",
        ] {
            let e = deser_err(&format!(r#"[{{ "pattern": "a", "subscribe": {bad} }}]"#));
            assert!(
                e.contains(r#""allow", "deny" or { roles = ["…"] }"#),
                "{bad}: {e}"
            );
        }
        let e = deser_err(r#"[{ "pattern": "a", "subscribe": { "roles": [] } }]"#);
        assert!(e.contains("roles list is empty"), "{e}");
        let e = deser_err(r#"[{ "pattern": "a", "subscribe": { "role": ["a"] } }]"#);
        assert!(e.contains("unknown field `role`"), "{e}");
        assert!(e.contains(r#""allow", "deny" or"#), "{e}");
        let e = deser_err(r#"[{ "pattern": "a", "subscribe": {} }]"#);
        assert!(e.contains("missing field `roles`"), "{e}");
        let e = deser_err(r#"[{ "pattern": "a", "subscribe": { "roles": "admin" } }]"#);
        assert!(e.contains("invalid type"), "{e}");
        let e =
            deser_err(r#"[{ "pattern": "a", "subscribe": { "roles": ["a"], "roles": ["b"] } }]"#);
        assert!(e.contains("duplicate field `roles`"), "{e}");
    }

    #[test]
    fn rule_fields_are_checked() {
        let e = deser_err(r#"[{ "pattern": "a", "subcribe": "allow" }]"#);
        assert!(e.contains("unknown field `subcribe`"), "{e}");
        let e = deser_err(r#"[{ "subscribe": "allow" }]"#);
        assert!(e.contains("missing field `pattern`"), "{e}");
        let e = deser_err(r#"[{ "pattern": "a", "history": { "size": 0, "ttl": "1m" } }]"#);
        assert!(
            e.contains("history size must be between 1 and 100000, got 0"),
            "{e}"
        );
        let e = deser_err(r#"[{ "pattern": "a", "history": { "size": 100001, "ttl": "1m" } }]"#);
        assert!(e.contains("got 100001"), "{e}");
        let e = deser_err(r#"[{ "pattern": "a", "history": { "size": 10, "ttl": "10" } }]"#);
        assert!(e.contains("missing unit"), "{e}");
        let e = deser_err(r#"[{ "pattern": "a", "history": { "size": 10 } }]"#);
        assert!(e.contains("missing field `ttl`"), "{e}");
        let e =
            deser_err(r#"[{ "pattern": "a", "history": { "size": 10, "ttl": "1m", "max": 3 } }]"#);
        assert!(e.contains("unknown field `max`"), "{e}");
        let e = deser_err(r#"[{ "pattern": "a", "conflate_ms": -1 }]"#);
        assert!(e.contains("invalid value"), "{e}");

        let r = rules(r#"[{ "pattern": "a", "history": { "size": 100000, "ttl": "7d" } }]"#);
        assert_eq!(
            r[0].history,
            Some(HistoryOptions {
                size: 100_000,
                ttl: Duration::from_secs(7 * 86_400)
            })
        );
        let r = rules(r#"[{ "pattern": "a" }]"#);
        assert_eq!(
            r[0],
            TopicRule {
                pattern: "a".to_owned(),
                ..TopicRule::default()
            }
        );
    }

    #[test]
    fn rules_serialize_back() {
        let r = rules(SPEC_RULES);
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Vec<TopicRule>>(&json).unwrap(), r);
        assert!(json.contains(r#""ttl":"10m""#), "{json}");
        assert!(
            json.contains(r#""subscribe":{"roles":["admin"]}"#),
            "{json}"
        );
    }

    #[test]
    fn from_config_uses_defaults_only_when_empty() {
        let id = identity("42", json!({}), &[]);
        let acl = Acl::from_config(vec![], "sub").unwrap();
        assert_eq!(
            acl.patterns().collect::<Vec<_>>(),
            [
                "user/{sub}/**",
                "broadcast",
                "global/**",
                "org/{org_id}/**",
                "room/*"
            ]
        );
        assert!(sub(&acl, "broadcast", &id));
        let acl = Acl::from_config(rules(r#"[{ "pattern": "x" }]"#), "sub").unwrap();
        assert!(!sub(&acl, "broadcast", &id));
        let empty = Acl::new(vec![], "sub").unwrap();
        assert!(empty.is_empty());
        assert!(!sub(&empty, "user/42", &id));
        assert!(Acl::from_config(rules(r#"[{ "pattern": "a/**/b" }]"#), "sub").is_err());
    }

    #[test]
    fn number_buffer_never_panics() {
        let mut buf = SegmentBuf::default();
        assert!(write!(buf, "{}", "9".repeat(64)).is_ok());
        assert!(write!(buf, "9").is_err());
        assert_eq!(buf.as_bytes().len(), 64);
    }
}
