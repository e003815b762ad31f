//! Who a connection is: the identity an [`Authenticator`] derives from a credential.

use std::sync::Arc;

use serde_json::{Map, Value};

/// An authenticated principal: a user id plus the claims that topic rules may refer to.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// The user id (from the configured user claim, `sub` by default). Always a valid topic
    /// segment, so `user/{user_id}` is a valid topic.
    pub user_id: Arc<str>,
    /// All claims of the token (or the configured claims of a client API key).
    pub claims: Map<String, Value>,
    /// Roles, from the configured roles claim (`roles` by default), string or array.
    pub roles: Vec<String>,
}

/// What a successful authentication yields.
#[derive(Debug, Clone, PartialEq)]
pub struct Authenticated {
    pub identity: Identity,
    /// Unix seconds after which the session must be refreshed or closed (4010). `None` for
    /// credentials that do not expire (client API keys).
    pub expires_at: Option<u64>,
    /// The token id (`jti`), used for revocation.
    pub jti: Option<String>,
    /// Unix seconds the token was issued (`iat`); a user revocation revokes tokens issued
    /// at or before the revocation.
    pub issued_at: Option<u64>,
}

/// Why a credential was refused. Every variant maps to 401 / close 4001 (see `error.rs`),
/// except [`AuthError::Revoked`], which maps to 4011 on a live connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("malformed token")]
    Malformed,
    #[error("invalid token signature")]
    BadSignature,
    #[error("token algorithm not allowed")]
    AlgorithmNotAllowed,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("token issuer not accepted")]
    WrongIssuer,
    #[error("token audience not accepted")]
    WrongAudience,
    #[error("token has no usable `{0}` claim")]
    MissingUserClaim(String),
    #[error("user id {0:?} is not a valid topic segment")]
    BadUserId(String),
    #[error("unknown api key")]
    UnknownKey,
    #[error("token revoked")]
    Revoked,
    #[error("no credential given")]
    Missing,
}

/// Turns a credential (a JWT or a client API key) into an [`Authenticated`] identity.
/// Implementations are pure and synchronous: no network on the connect path.
pub trait Authenticator: Send + Sync + 'static {
    fn authenticate(&self, credential: &str) -> Result<Authenticated, AuthError>;
}
