//! Between [`InboxRecord`] and rows: the columns selected, their limits, and conversions.

use herald_core::store::{InboxRecord, InboxStatus, StoreError};
use serde_json::value::RawValue;
use sqlx::{ColumnIndex, Decode, Row, Type};

/// The columns every read selects, in the order [`decode`] expects.
pub(crate) const COLUMNS: &str = "id, user_id, topic, event, payload, trace_id, status, \
                                  retry_count, created_at, updated_at";

// Column sizes of the schema, in characters (the payload in bytes: MySQL's MEDIUMTEXT).
const ID_MAX: usize = 128;
const USER_MAX: usize = 255;
const TOPIC_MAX: usize = 256;
const EVENT_MAX: usize = 128;
const TRACE_MAX: usize = 128;
const PAYLOAD_MAX: usize = 16 * 1024 * 1024 - 1;

/// Refuses a record that no backend could store as it is, before it joins a batch (where it
/// would fail the whole transaction). The gateway's own checks are stricter, so this only
/// guards against other callers.
pub(crate) fn check(r: &InboxRecord) -> Result<(), StoreError> {
    let fields = [
        ("id", r.id.as_str(), ID_MAX),
        ("user", r.user.as_str(), USER_MAX),
        ("topic", r.topic.as_str(), TOPIC_MAX),
        ("event", r.event.as_str(), EVENT_MAX),
        ("trace_id", r.trace_id.as_deref().unwrap_or(""), TRACE_MAX),
    ];
    for (name, value, max) in fields {
        // Cheap test first: a string of at most `max` bytes has at most `max` characters.
        if value.len() > max && value.chars().count() > max {
            return Err(rejected(format!("{name} is longer than {max} characters")));
        }
        if value.contains('\0') {
            return Err(rejected(format!("{name} contains a NUL character")));
        }
    }
    if r.id.is_empty() {
        return Err(rejected("id is empty".into()));
    }
    if r.data.get().len() > PAYLOAD_MAX {
        return Err(rejected(format!("data is larger than {PAYLOAD_MAX} bytes")));
    }
    Ok(())
}

fn rejected(why: String) -> StoreError {
    StoreError::Unavailable(format!("record rejected by the SQL store: {why}"))
}

/// Unix milliseconds as a BIGINT (saturating; no clock is that far ahead).
pub(crate) fn to_db_ms(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// A count or limit as a bind value.
pub(crate) fn to_db_count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// One row selected with [`COLUMNS`].
pub(crate) fn decode<R>(row: &R) -> Result<InboxRecord, sqlx::Error>
where
    R: Row,
    usize: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Option<String>: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i32: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
{
    let payload: String = row.try_get(4)?;
    let status: String = row.try_get(6)?;
    let retry_count: i32 = row.try_get(7)?;
    let created_at: i64 = row.try_get(8)?;
    let updated_at: i64 = row.try_get(9)?;
    Ok(InboxRecord {
        id: row.try_get(0)?,
        user: row.try_get(1)?,
        topic: row.try_get(2)?,
        event: row.try_get(3)?,
        data: RawValue::from_string(payload).map_err(|e| sqlx::Error::ColumnDecode {
            index: "payload".into(),
            source: Box::new(e),
        })?,
        trace_id: row.try_get(5)?,
        status: InboxStatus::parse(&status).ok_or_else(|| sqlx::Error::ColumnDecode {
            index: "status".into(),
            source: format!("unknown status {status:?}").into(),
        })?,
        retry_count: u32::try_from(retry_count).unwrap_or(0),
        created_at: u64::try_from(created_at).unwrap_or(0),
        updated_at: u64::try_from(updated_at).unwrap_or(0),
    })
}

/// `ids` without repeats (first occurrence kept), so a status update counts each message once
/// even when the list spans several statements.
pub(crate) fn distinct(ids: &[String]) -> Vec<&str> {
    let mut seen = std::collections::HashSet::with_capacity(ids.len());
    ids.iter()
        .map(String::as_str)
        .filter(|id| seen.insert(*id))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str) -> InboxRecord {
        InboxRecord {
            id: id.into(),
            user: "u".into(),
            topic: "user/u".into(),
            event: "n".into(),
            data: RawValue::from_string("{}".into()).expect("valid JSON"),
            trace_id: None,
            status: InboxStatus::Pending,
            retry_count: 0,
            created_at: 1,
            updated_at: 1,
        }
    }

    #[test]
    fn limits() {
        assert!(check(&rec("a")).is_ok());
        assert!(
            check(&rec(&"é".repeat(128))).is_ok(),
            "characters, not bytes"
        );
        assert!(check(&rec(&"a".repeat(129))).is_err());
        assert!(check(&rec("")).is_err());
        assert!(check(&rec("a\0b")).is_err());
        let mut r = rec("a");
        r.trace_id = Some("t".repeat(129));
        assert!(check(&r).is_err());
    }

    #[test]
    fn distinct_keeps_first() {
        let ids: Vec<String> = ["b", "a", "b", "c", "a"].map(String::from).into();
        assert_eq!(distinct(&ids), ["b", "a", "c"]);
    }

    #[test]
    fn conversions_saturate() {
        assert_eq!(to_db_ms(u64::MAX), i64::MAX);
        assert_eq!(to_db_count(usize::MAX), i64::MAX);
        assert_eq!(to_db_count(7), 7);
    }
}
