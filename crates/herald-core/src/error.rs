//! The one error type of the gateway's request handling, and its mapping to protocol codes.
//!
//! [`Error::code`] is the single place an error becomes a reply code / HTTP status; the
//! server maps the same value to a JSON `reply`, an `error` frame or an HTTP response.
//! [`Error::origin`] says whose fault it was, which decides the log level.

use crate::bus::BusError;
use crate::history::HistoryError;
use crate::identity::AuthError;
use crate::store::StoreError;
use crate::topic::TopicError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error(transparent)]
    Topic(#[from] TopicError),
    #[error("unauthenticated: {0}")]
    Unauthenticated(#[from] AuthError),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("too large: {0}")]
    TooLarge(String),
    #[error("rate limited: {0}")]
    RateLimited(&'static str),
    #[error("too many subscriptions (at most {0} per connection)")]
    TooManySubscriptions(usize),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error("internal error: {0}")]
    Internal(String),
}

/// Whose fault an error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Bad input or a refused request: logged at debug, the connection survives.
    Client,
    /// A backend (bus, store) failed: logged at warn, the client may retry.
    Backend,
    /// A bug or an invariant broken: logged at error.
    Internal,
}

impl Error {
    /// The reply code / HTTP status (SPEC §2 "Codes").
    pub fn code(&self) -> u16 {
        match self {
            Error::BadRequest(_) | Error::Topic(_) => 400,
            Error::Unauthenticated(_) => 401,
            Error::Forbidden(_) => 403,
            Error::NotFound(_) => 404,
            Error::Conflict(_) => 409,
            Error::TooLarge(_) => 413,
            Error::RateLimited(_) | Error::TooManySubscriptions(_) => 429,
            Error::Bus(_) | Error::Store(_) | Error::History(_) => 503,
            Error::Internal(_) => 500,
        }
    }

    pub fn origin(&self) -> Origin {
        match self {
            Error::Bus(_) | Error::Store(_) | Error::History(_) => Origin::Backend,
            Error::Internal(_) => Origin::Internal,
            _ => Origin::Client,
        }
    }

    /// A short label for the `herald_errors_total{kind}` metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::BadRequest(_) => "bad_request",
            Error::Topic(_) => "invalid_topic",
            Error::Unauthenticated(_) => "unauthenticated",
            Error::Forbidden(_) => "forbidden",
            Error::NotFound(_) => "not_found",
            Error::Conflict(_) => "conflict",
            Error::TooLarge(_) => "too_large",
            Error::RateLimited(_) => "rate_limited",
            Error::TooManySubscriptions(_) => "too_many_subscriptions",
            Error::Bus(_) => "bus",
            Error::Store(_) => "store",
            Error::History(_) => "history",
            Error::Internal(_) => "internal",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        assert_eq!(Error::Forbidden("a".into()).to_string(), "forbidden: a");
        assert_eq!(Error::Forbidden("a".into()).code(), 403);
        assert_eq!(Error::RateLimited("subscribe").code(), 429);
        assert_eq!(Error::Bus(BusError::Unavailable("x".into())).code(), 503);
        assert_eq!(
            Error::Bus(BusError::Unavailable("x".into())).origin(),
            Origin::Backend
        );
        assert_eq!(Error::Unauthenticated(AuthError::Expired).code(), 401);
    }
}
