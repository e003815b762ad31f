//! Authentication: credentials in, identities out; server API keys; revocations; token minting.
//!
//! # Flow
//!
//! A client credential (from the `Authorization: Bearer` header, the `token`/`api_key` query
//! parameter or an `auth` frame) goes to [`JwtAuthenticator::authenticate`]:
//!
//! 1. It is compared, in constant time, with every configured client API key
//!    (`[[auth.client_keys]]`). A match yields that key's fixed identity, which never expires.
//! 2. Otherwise it is a JWT. Its header `alg` must equal the one pinned algorithm
//!    (`auth.jwt_algorithm`), so `alg: none` and HS/RS confusion are refused before any
//!    cryptography runs. `jsonwebtoken` then checks the signature, `exp` (required), `nbf`,
//!    `iss` and `aud` with the configured leeway. The user id is read from `auth.user_claim`
//!    and must be a valid topic segment, so `user/{user_id}` is always a valid topic.
//! 3. Finally the result is checked against the revocation set: a revoked `jti`, or a user
//!    revoked at or after the token's `iat`, is refused with [`AuthError::Revoked`]. Live
//!    connections call [`JwtAuthenticator::is_revoked`] (when
//!    [`JwtAuthenticator::revocation_generation`] moves) to close with 4011.
//!
//! Backend services use server API keys (`[[auth.api_keys]]`), checked by
//! [`JwtAuthenticator::authorize_api`] against the scope a route needs (`admin` implies
//! `publish`). Key material is never logged and every comparison runs over all keys.
//!
//! `herald token` and `herald serve --dev` mint tokens with [`mint_hs256`],
//! [`mint_with_key_file`] and [`dev_claims`].

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use herald_core::identity::{AuthError, Authenticated, Authenticator, Identity};
use herald_core::topic::is_valid_segment;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use subtle::{Choice, ConditionallySelectable, ConstantTimeEq};

/// Shortest accepted API key (server or client), in characters.
pub const MIN_API_KEY_LEN: usize = 16;
/// Largest accepted clock-skew leeway.
pub const MAX_LEEWAY: Duration = Duration::from_secs(3600);
/// Longer credentials are refused as malformed before any parsing.
const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Longest `jti` accepted in a revocation request.
const MAX_JTI_LEN: usize = 1024;
/// How much of a refused user id is echoed back in [`AuthError::BadUserId`].
const MAX_ECHOED_USER_ID: usize = 80;

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// A configured secret (JWT secret, API key). `Debug` and `Display` print `***`; the value is
/// only reachable through [`Secret::expose`].
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The JWT algorithms Herald accepts. Exactly one is pinned per server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JwtAlgorithm {
    #[serde(rename = "HS256")]
    Hs256,
    #[serde(rename = "RS256")]
    Rs256,
    #[serde(rename = "ES256")]
    Es256,
}

impl JwtAlgorithm {
    /// The name used in JWT headers and in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hs256 => "HS256",
            Self::Rs256 => "RS256",
            Self::Es256 => "ES256",
        }
    }

    fn to_jwt(self) -> Algorithm {
        match self {
            Self::Hs256 => Algorithm::HS256,
            Self::Rs256 => Algorithm::RS256,
            Self::Es256 => Algorithm::ES256,
        }
    }
}

impl fmt::Display for JwtAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JwtAlgorithm {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "HS256" => Ok(Self::Hs256),
            "RS256" => Ok(Self::Rs256),
            "ES256" => Ok(Self::Es256),
            other => Err(format!(
                "unknown JWT algorithm {other:?}: expected HS256, RS256 or ES256"
            )),
        }
    }
}

/// What a server API key may do. `admin` implies `publish`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Publish,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Publish => "publish",
            Self::Admin => "admin",
        }
    }

    /// Whether holding `self` is enough for a route that needs `needed`.
    pub fn grants(self, needed: Scope) -> bool {
        self == needed || self == Scope::Admin
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[[auth.api_keys]]`: a server API key for backend services.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    pub key: Secret,
    pub scopes: Vec<Scope>,
    /// Shown in logs instead of the key.
    #[serde(default)]
    pub name: Option<String>,
}

/// `[[auth.client_keys]]`: a client API key standing for a fixed identity (seed 001's
/// `api_key`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientKeyConfig {
    pub key: Secret,
    /// The user id of every connection made with this key.
    pub user: String,
    #[serde(default)]
    pub roles: Vec<String>,
    /// Extra claims the topic rules may refer to (`org_id = "7"`).
    #[serde(default)]
    pub claims: Map<String, Value>,
}

/// The `[auth]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 shared secret. Exclusive with `jwt_public_key_file`.
    pub jwt_secret: Option<Secret>,
    /// PEM public key (RS256 or ES256). Exclusive with `jwt_secret`.
    pub jwt_public_key_file: Option<PathBuf>,
    /// The one accepted algorithm. Defaults to HS256 with a secret; required with a key file.
    pub jwt_algorithm: Option<JwtAlgorithm>,
    /// When set, `iss` must be present and equal to it.
    pub issuer: Option<String>,
    /// When set, `aud` (a string or an array) must be present and contain it.
    pub audience: Option<String>,
    /// The claim holding the user id (default `sub`). A dotted path (`user.id`) reaches into
    /// objects when no claim has that exact name.
    pub user_claim: String,
    /// The claim holding roles, a string or an array of strings (default `roles`). Dotted
    /// paths work as for `user_claim` (`realm_access.roles`).
    pub roles_claim: String,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(with = "herald_core::duration::serde_duration")]
    pub leeway: Duration,
    /// How long a revocation without `until` is kept.
    #[serde(with = "herald_core::duration::serde_duration")]
    pub revocation_ttl: Duration,
    pub api_keys: Vec<ApiKeyConfig>,
    pub client_keys: Vec<ClientKeyConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            jwt_secret: None,
            jwt_public_key_file: None,
            jwt_algorithm: None,
            issuer: None,
            audience: None,
            user_claim: "sub".to_owned(),
            roles_claim: "roles".to_owned(),
            leeway: Duration::ZERO,
            revocation_ttl: Duration::from_secs(24 * 3600),
            api_keys: Vec::new(),
            client_keys: Vec::new(),
        }
    }
}

impl AuthConfig {
    /// Checks the section without touching the file system (the key file is read by
    /// [`JwtAuthenticator::new`]). The message names the offending key and never contains
    /// key material. Unknown scopes and algorithms are already refused by deserialization.
    pub fn validate(&self) -> Result<(), String> {
        self.validate_jwt()?;
        for (name, value) in [
            ("user_claim", &self.user_claim),
            ("roles_claim", &self.roles_claim),
        ] {
            if value.is_empty() {
                return Err(format!("auth.{name} must not be empty"));
            }
        }
        for (name, value) in [("issuer", &self.issuer), ("audience", &self.audience)] {
            if value.as_deref() == Some("") {
                return Err(format!("auth.{name} must not be empty when set"));
            }
        }
        if self.leeway > MAX_LEEWAY {
            return Err(format!(
                "auth.leeway must be at most {}s (it allows for clock skew)",
                MAX_LEEWAY.as_secs()
            ));
        }
        if self.revocation_ttl.as_secs() == 0 {
            return Err("auth.revocation_ttl must be at least 1s".to_owned());
        }
        self.validate_keys()
    }

    fn validate_jwt(&self) -> Result<(), String> {
        match (
            &self.jwt_secret,
            &self.jwt_public_key_file,
            self.jwt_algorithm,
        ) {
            (Some(_), Some(_), _) => Err(
                "auth.jwt_secret and auth.jwt_public_key_file are exclusive: set only one"
                    .to_owned(),
            ),
            (Some(secret), None, alg) => {
                if secret.is_empty() {
                    return Err("auth.jwt_secret must not be empty".to_owned());
                }
                match alg {
                    None | Some(JwtAlgorithm::Hs256) => Ok(()),
                    Some(other) => Err(format!(
                        "auth.jwt_algorithm = \"{other}\" needs auth.jwt_public_key_file; \
                         auth.jwt_secret only works with HS256"
                    )),
                }
            }
            (None, Some(path), alg) => {
                if path.as_os_str().is_empty() {
                    return Err("auth.jwt_public_key_file must not be empty".to_owned());
                }
                match alg {
                    Some(JwtAlgorithm::Rs256 | JwtAlgorithm::Es256) => Ok(()),
                    Some(JwtAlgorithm::Hs256) => {
                        Err("auth.jwt_algorithm = \"HS256\" needs auth.jwt_secret; \
                         with auth.jwt_public_key_file use RS256 or ES256"
                            .to_owned())
                    }
                    None => Err("auth.jwt_algorithm (RS256 or ES256) is required with \
                         auth.jwt_public_key_file"
                        .to_owned()),
                }
            }
            (None, None, Some(_)) => {
                Err("auth.jwt_algorithm is set but neither auth.jwt_secret nor \
                 auth.jwt_public_key_file is"
                    .to_owned())
            }
            (None, None, None) if self.client_keys.is_empty() => {
                Err("auth: set auth.jwt_secret or auth.jwt_public_key_file \
                 (or configure auth.client_keys to accept API keys only)"
                    .to_owned())
            }
            (None, None, None) => Ok(()),
        }
    }

    fn validate_keys<'a>(&'a self) -> Result<(), String> {
        // Key value → the name of the setting that first used it.
        let mut seen: HashMap<&'a str, String> = HashMap::new();
        let mut check_key = |key: &'a Secret, label: String| -> Result<(), String> {
            if key.expose().chars().count() < MIN_API_KEY_LEN {
                return Err(format!(
                    "{label} must be at least {MIN_API_KEY_LEN} characters long"
                ));
            }
            if let Some(first) = seen.get(key.expose()) {
                return Err(format!("{label} duplicates {first}"));
            }
            seen.insert(key.expose(), label);
            Ok(())
        };
        for (i, api_key) in self.api_keys.iter().enumerate() {
            check_key(&api_key.key, format!("auth.api_keys[{i}].key"))?;
            if api_key.scopes.is_empty() {
                return Err(format!(
                    "auth.api_keys[{i}].scopes must name at least one of \"publish\", \"admin\""
                ));
            }
            if api_key.name.as_deref() == Some("") {
                return Err(format!(
                    "auth.api_keys[{i}].name must not be empty when set"
                ));
            }
        }
        for (i, client_key) in self.client_keys.iter().enumerate() {
            check_key(&client_key.key, format!("auth.client_keys[{i}].key"))?;
            if !is_valid_segment(&client_key.user) {
                return Err(format!(
                    "auth.client_keys[{i}].user {:?} is not a valid user id \
                     (1-64 characters of A-Z a-z 0-9 _ . : @ -)",
                    client_key.user
                ));
            }
            if client_key.roles.iter().any(String::is_empty) {
                return Err(format!("auth.client_keys[{i}].roles must not contain \"\""));
            }
        }
        Ok(())
    }
}

/// Why a [`JwtAuthenticator`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error("invalid [auth] configuration: {0}")]
    Config(String),
    #[error("cannot read auth.jwt_public_key_file {}: {source}", path.display())]
    ReadKey {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("auth.jwt_public_key_file {} is not a usable {alg} public key: {reason}", path.display())]
    BadKey {
        path: PathBuf,
        alg: JwtAlgorithm,
        reason: String,
    },
}

// ---------------------------------------------------------------------------------------------
// Server API keys
// ---------------------------------------------------------------------------------------------

/// Why a server API request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ApiAuthError {
    /// No `Authorization: Bearer` key (401).
    #[error("missing api key")]
    Missing,
    /// Not a configured key (401).
    #[error("unknown api key")]
    Unknown,
    /// A known key without the needed scope (403).
    #[error("api key not allowed to do this")]
    Forbidden,
}

impl ApiAuthError {
    /// The HTTP status the API answers with.
    pub fn http_status(self) -> u16 {
        match self {
            Self::Missing | Self::Unknown => 401,
            Self::Forbidden => 403,
        }
    }
}

/// The backend service behind an accepted server API key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiPrincipal {
    /// The key's configured `name`, for logs.
    pub name: Option<String>,
    /// The key's scopes, as configured.
    pub scopes: Vec<Scope>,
}

impl ApiPrincipal {
    pub fn allows(&self, needed: Scope) -> bool {
        self.scopes.iter().any(|s| s.grants(needed))
    }
}

/// Takes the credential out of an `Authorization` header value (`Bearer <credential>`, the
/// scheme matched case-insensitively). `None` for another scheme or an empty credential.
pub fn bearer_token(header_value: &str) -> Option<&str> {
    let value = header_value.trim();
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim();
    (!token.is_empty()).then_some(token)
}

/// A set of secret keys searched in constant time.
///
/// Every key is stored as a keyed HMAC-SHA256 digest (the HMAC key is random per process), and
/// a candidate is digested the same way and compared with every stored digest with `subtle`.
/// The comparison therefore takes the same time whichever key (if any) matches, and does not
/// depend on the stored keys' lengths either.
struct KeySet {
    hmac_key: EncodingKey,
    digests: Vec<Vec<u8>>,
}

impl KeySet {
    fn new<'a>(keys: impl IntoIterator<Item = &'a Secret>) -> Self {
        let mut salt = Vec::with_capacity(32);
        for _ in 0..2 {
            // 80 random bits per ULID.
            salt.extend_from_slice(&ulid::Ulid::new().random().to_be_bytes());
        }
        let hmac_key = EncodingKey::from_secret(&salt);
        let mut set = Self {
            hmac_key,
            digests: Vec::new(),
        };
        set.digests = keys.into_iter().map(|k| set.digest(k.expose())).collect();
        set
    }

    fn digest(&self, key: &str) -> Vec<u8> {
        // HMAC signing cannot fail with a valid HMAC key; should it ever, the empty digest
        // matches nothing (a stored key that failed would match nothing either).
        jsonwebtoken::crypto::sign(key.as_bytes(), &self.hmac_key, Algorithm::HS256)
            .map(String::into_bytes)
            .unwrap_or_default()
    }

    /// The index of the key equal to `candidate`, looking at every key.
    fn find(&self, candidate: &str) -> Option<usize> {
        if self.digests.is_empty() {
            return None;
        }
        let digest = self.digest(candidate);
        if digest.is_empty() {
            return None;
        }
        let mut found = Choice::from(0);
        let mut index = 0u64;
        for (i, stored) in self.digests.iter().enumerate() {
            let equal = stored.as_slice().ct_eq(digest.as_slice());
            index.conditional_assign(&(i as u64), equal);
            found |= equal;
        }
        if bool::from(found) {
            usize::try_from(index).ok()
        } else {
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Revocations
// ---------------------------------------------------------------------------------------------

/// A recorded revocation (also the unit of cluster sync).
///
/// - `jti`: that token id is refused until `until`.
/// - `user`: every token of that user issued at or before `at` (a token without `iat`
///   counts as issued before) is refused until `until`; a token issued later works. Client
///   API key identities have no `iat`, so they are refused too.
///
/// A revocation with both `jti` and `user` applies both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub jti: Option<String>,
    pub user: Option<String>,
    /// Unix seconds the revocation ends; `None` means `at + auth.revocation_ttl`.
    pub until: Option<u64>,
    /// Unix seconds the revocation was made.
    pub at: u64,
}

/// The body of `POST /api/v1/revocations`: `{jti?, user?, until?}`. Turn it into a
/// [`Revocation`] with [`RevocationRequest::into_revocation`], which stamps `at`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationRequest {
    #[serde(default)]
    pub jti: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    /// Unix seconds; default now + `auth.revocation_ttl`.
    #[serde(default)]
    pub until: Option<u64>,
}

impl RevocationRequest {
    /// Checks the request (the message is meant for a 400 answer) and stamps it with `now`
    /// (unix seconds).
    pub fn into_revocation(self, now: u64) -> Result<Revocation, String> {
        if self.jti.is_none() && self.user.is_none() {
            return Err("a revocation needs `jti` or `user`".to_owned());
        }
        if let Some(jti) = &self.jti
            && (jti.is_empty() || jti.len() > MAX_JTI_LEN)
        {
            return Err(format!("`jti` must be 1 to {MAX_JTI_LEN} bytes long"));
        }
        if let Some(user) = &self.user
            && !is_valid_segment(user)
        {
            return Err(format!("`user` {:?} is not a valid user id", echo(user)));
        }
        if let Some(until) = self.until
            && until <= now
        {
            return Err("`until` must be in the future (unix seconds)".to_owned());
        }
        Ok(Revocation {
            jti: self.jti,
            user: self.user,
            until: self.until,
            at: now,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    at: u64,
    until: u64,
}

/// The live revocations. Only touched under a `parking_lot::RwLock` in short, synchronous
/// critical sections (no `.await` while held).
#[derive(Debug)]
struct RevocationSet {
    jtis: HashMap<String, Window>,
    /// A few windows per user: a later `at` with an earlier `until` is not covered by an
    /// earlier `at` with a later `until`, so both are kept.
    users: HashMap<String, Vec<Window>>,
    /// The earliest `until` of all entries (`u64::MAX` when empty): nothing needs purging
    /// before then.
    next_expiry: u64,
}

impl RevocationSet {
    fn new() -> Self {
        Self {
            jtis: HashMap::new(),
            users: HashMap::new(),
            next_expiry: u64::MAX,
        }
    }

    fn is_empty(&self) -> bool {
        self.jtis.is_empty() && self.users.is_empty()
    }

    fn insert(&mut self, jti: Option<String>, user: Option<String>, window: Window) {
        if let Some(jti) = jti {
            let entry = self.jtis.entry(jti).or_insert(window);
            if window.until > entry.until {
                *entry = window;
            }
        }
        if let Some(user) = user {
            let windows = self.users.entry(user).or_default();
            let covered = windows
                .iter()
                .any(|w| w.at >= window.at && w.until >= window.until);
            if !covered {
                windows.retain(|w| !(w.at <= window.at && w.until <= window.until));
                windows.push(window);
            }
        }
        self.next_expiry = self.next_expiry.min(window.until);
    }

    fn matches(&self, auth: &Authenticated, now: u64) -> bool {
        let jti_revoked = auth
            .jti
            .as_ref()
            .and_then(|jti| self.jtis.get(jti))
            .is_some_and(|w| now < w.until);
        jti_revoked
            || self
                .users
                .get(&*auth.identity.user_id)
                .is_some_and(|windows| {
                    windows
                        .iter()
                        .any(|w| now < w.until && auth.issued_at.is_none_or(|iat| iat <= w.at))
                })
    }

    fn purge(&mut self, now: u64) {
        let mut next = u64::MAX;
        self.jtis.retain(|_, w| {
            let keep = w.until > now;
            if keep {
                next = next.min(w.until);
            }
            keep
        });
        self.users.retain(|_, windows| {
            windows.retain(|w| {
                let keep = w.until > now;
                if keep {
                    next = next.min(w.until);
                }
                keep
            });
            !windows.is_empty()
        });
        self.next_expiry = next;
    }

    fn snapshot(&self, now: u64) -> Vec<Revocation> {
        let jtis = self
            .jtis
            .iter()
            .filter(|(_, w)| w.until > now)
            .map(|(jti, w)| Revocation {
                jti: Some(jti.clone()),
                user: None,
                until: Some(w.until),
                at: w.at,
            });
        let users = self.users.iter().flat_map(|(user, windows)| {
            windows
                .iter()
                .filter(|w| w.until > now)
                .map(|w| Revocation {
                    jti: None,
                    user: Some(user.clone()),
                    until: Some(w.until),
                    at: w.at,
                })
        });
        jtis.chain(users).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The authenticator
// ---------------------------------------------------------------------------------------------

/// The JWT half: one pinned algorithm, its key and the validation rules.
struct JwtVerifier {
    alg: JwtAlgorithm,
    key: DecodingKey,
    validation: Validation,
}

/// Authenticates clients (JWTs and client API keys), authorizes server API keys, and keeps the
/// revocation set. Build once at startup and share behind an `Arc`.
pub struct JwtAuthenticator {
    jwt: Option<JwtVerifier>,
    user_claim: String,
    roles_claim: String,
    client_keys: KeySet,
    /// The fixed identity of each client key, in the order of `client_keys`.
    client_identities: Vec<Authenticated>,
    api_keys: KeySet,
    /// Name and scopes of each server API key, in the order of `api_keys`.
    api_principals: Vec<ApiPrincipal>,
    revocation_ttl: u64,
    revocations: RwLock<RevocationSet>,
    /// Bumped by every [`JwtAuthenticator::revoke`].
    revocation_generation: AtomicU64,
}

impl fmt::Debug for JwtAuthenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtAuthenticator")
            .field("jwt_algorithm", &self.jwt.as_ref().map(|j| j.alg))
            .field("user_claim", &self.user_claim)
            .field("roles_claim", &self.roles_claim)
            .field("client_keys", &self.client_identities.len())
            .field("api_keys", &self.api_principals.len())
            .finish_non_exhaustive()
    }
}

impl JwtAuthenticator {
    /// Validates `cfg` and reads the public key file, if any, so a bad setting fails at
    /// startup with a message naming it.
    pub fn new(cfg: &AuthConfig) -> Result<Self, AuthSetupError> {
        cfg.validate().map_err(AuthSetupError::Config)?;
        let jwt = match (&cfg.jwt_secret, &cfg.jwt_public_key_file) {
            (Some(secret), _) => {
                if secret.expose().len() < 32 {
                    tracing::warn!(
                        "auth.jwt_secret is shorter than 32 bytes; use a long random secret"
                    );
                }
                let key = DecodingKey::from_secret(secret.expose().as_bytes());
                Some(JwtVerifier::new(JwtAlgorithm::Hs256, key, cfg))
            }
            (None, Some(path)) => {
                let alg = cfg.jwt_algorithm.ok_or_else(|| {
                    AuthSetupError::Config(
                        "auth.jwt_algorithm is required with auth.jwt_public_key_file".to_owned(),
                    )
                })?;
                let key = load_public_key(path, alg)?;
                Some(JwtVerifier::new(alg, key, cfg))
            }
            (None, None) => None,
        };

        let client_identities = cfg
            .client_keys
            .iter()
            .map(|k| client_identity(k, &cfg.user_claim, &cfg.roles_claim))
            .collect();
        let api_principals = cfg
            .api_keys
            .iter()
            .map(|k| ApiPrincipal {
                name: k.name.clone(),
                scopes: k.scopes.clone(),
            })
            .collect();

        Ok(Self {
            jwt,
            user_claim: cfg.user_claim.clone(),
            roles_claim: cfg.roles_claim.clone(),
            client_keys: KeySet::new(cfg.client_keys.iter().map(|k| &k.key)),
            client_identities,
            api_keys: KeySet::new(cfg.api_keys.iter().map(|k| &k.key)),
            api_principals,
            revocation_ttl: cfg.revocation_ttl.as_secs(),
            revocations: RwLock::new(RevocationSet::new()),
            revocation_generation: AtomicU64::new(0),
        })
    }

    /// The pinned JWT algorithm; `None` when only client API keys are accepted.
    pub fn jwt_algorithm(&self) -> Option<JwtAlgorithm> {
        self.jwt.as_ref().map(|j| j.alg)
    }

    /// Checks a server API key (the credential of `Authorization: Bearer`) against the scope
    /// a route needs. Every configured key is compared, in constant time.
    pub fn authorize_api(
        &self,
        bearer: Option<&str>,
        needed: Scope,
    ) -> Result<ApiPrincipal, ApiAuthError> {
        let key = bearer
            .filter(|b| !b.is_empty())
            .ok_or(ApiAuthError::Missing)?;
        let principal = self
            .api_keys
            .find(key)
            .and_then(|i| self.api_principals.get(i))
            .ok_or(ApiAuthError::Unknown)?;
        if !principal.allows(needed) {
            tracing::debug!(key_name = ?principal.name, %needed, "api key lacks the scope");
            return Err(ApiAuthError::Forbidden);
        }
        Ok(principal.clone())
    }

    /// Records a revocation. One already over is ignored; expired ones are purged.
    pub fn revoke(&self, r: Revocation) {
        self.revoke_at(r, unix_now());
    }

    fn revoke_at(&self, r: Revocation, now: u64) {
        let until = r
            .until
            .unwrap_or_else(|| r.at.saturating_add(self.revocation_ttl));
        if r.jti.is_none() && r.user.is_none() {
            return;
        }
        tracing::info!(jti = ?r.jti, user = ?r.user, at = r.at, until, "revocation recorded");
        {
            // Short critical section, no await.
            let mut set = self.revocations.write();
            set.purge(now);
            if until > now {
                set.insert(r.jti, r.user, Window { at: r.at, until });
            }
        }
        self.revocation_generation.fetch_add(1, Ordering::Release);
    }

    /// Whether an already authenticated session has been revoked since (a live connection
    /// then closes with 4011).
    pub fn is_revoked(&self, auth: &Authenticated) -> bool {
        self.is_revoked_at(auth, unix_now())
    }

    fn is_revoked_at(&self, auth: &Authenticated, now: u64) -> bool {
        let (revoked, purge_due) = {
            // Short critical section, no await.
            let set = self.revocations.read();
            if set.is_empty() {
                return false;
            }
            (set.matches(auth, now), set.next_expiry <= now)
        };
        if purge_due {
            // Lazy purge; if another thread holds the lock, a later call will do it.
            if let Some(mut set) = self.revocations.try_write() {
                set.purge(now);
            }
        }
        revoked
    }

    /// Changes whenever a revocation is recorded: connections need to re-check
    /// [`JwtAuthenticator::is_revoked`] only when it moved.
    pub fn revocation_generation(&self) -> u64 {
        self.revocation_generation.load(Ordering::Acquire)
    }

    /// The revocations in force, each with `until` filled in (a `jti`-and-`user` revocation
    /// comes back as two), for cluster sync.
    pub fn revocations_snapshot(&self) -> Vec<Revocation> {
        self.revocations.read().snapshot(unix_now())
    }

    fn authenticate_at(&self, credential: &str, now: u64) -> Result<Authenticated, AuthError> {
        if credential.is_empty() {
            return Err(AuthError::Missing);
        }
        let auth = match self.client_keys.find(credential) {
            Some(i) => self
                .client_identities
                .get(i)
                .cloned()
                .ok_or(AuthError::UnknownKey)?,
            None => match &self.jwt {
                Some(jwt) => self.verify_jwt(jwt, credential)?,
                // Client keys only: anything else is an unknown key.
                None => return Err(AuthError::UnknownKey),
            },
        };
        if self.is_revoked_at(&auth, now) {
            return Err(AuthError::Revoked);
        }
        Ok(auth)
    }

    fn verify_jwt(&self, jwt: &JwtVerifier, token: &str) -> Result<Authenticated, AuthError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::Malformed);
        }
        check_header(token, jwt.alg)?;
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &jwt.key, &jwt.validation)
            .map_err(map_jwt_error)?;
        let claims = data.claims;

        let user_id = match claim(&claims, &self.user_claim) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
            _ => return Err(AuthError::MissingUserClaim(self.user_claim.clone())),
        };
        if !is_valid_segment(&user_id) {
            return Err(AuthError::BadUserId(echo(&user_id)));
        }
        let roles = roles_of(claim(&claims, &self.roles_claim));
        let expires_at = optional_numeric_date(claims.get("exp"))?;
        let issued_at = optional_numeric_date(claims.get("iat"))?;
        let jti = match claims.get("jti") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Some(n.to_string()),
            Some(_) => return Err(AuthError::Malformed),
        };

        Ok(Authenticated {
            identity: Identity {
                user_id: Arc::from(user_id),
                claims,
                roles,
            },
            expires_at,
            jti,
            issued_at,
        })
    }
}

impl Authenticator for JwtAuthenticator {
    fn authenticate(&self, credential: &str) -> Result<Authenticated, AuthError> {
        self.authenticate_at(credential, unix_now())
    }
}

impl JwtVerifier {
    fn new(alg: JwtAlgorithm, key: DecodingKey, cfg: &AuthConfig) -> Self {
        let mut validation = Validation::new(alg.to_jwt());
        // Clamped so jsonwebtoken's `now - leeway` can never underflow, validated or not.
        validation.leeway = cfg.leeway.min(MAX_LEEWAY).as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        if let Some(issuer) = &cfg.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match &cfg.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            // Without a configured audience, `aud` is not ours to judge.
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Self {
            alg,
            key,
            validation,
        }
    }
}

/// Refuses a token whose header is not `alg` = the pinned algorithm before any crypto runs:
/// this is what stops `alg: none` and algorithm confusion (an HS256 token signed with an RSA
/// public key). Also refuses a `crit` header, whose extensions we do not understand.
fn check_header(token: &str, alg: JwtAlgorithm) -> Result<(), AuthError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed);
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| AuthError::Malformed)?;
    let header: Map<String, Value> =
        serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed)?;
    match header.get("alg") {
        Some(Value::String(name)) if name == alg.as_str() => {}
        Some(Value::String(_)) => return Err(AuthError::AlgorithmNotAllowed),
        _ => return Err(AuthError::Malformed),
    }
    if header.contains_key("crit") {
        return Err(AuthError::Malformed);
    }
    Ok(())
}

fn map_jwt_error(err: jsonwebtoken::errors::Error) -> AuthError {
    match err.kind() {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::MissingRequiredClaim(c) if c == "iss" => AuthError::WrongIssuer,
        ErrorKind::MissingRequiredClaim(c) if c == "aud" => AuthError::WrongAudience,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::InvalidAlgorithmName => AuthError::AlgorithmNotAllowed,
        ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat => {
            // The key was checked at startup, so this is ours, not the client's.
            tracing::error!(error = %err, "configured JWT key rejected while verifying");
            AuthError::BadSignature
        }
        _ => AuthError::Malformed,
    }
}

/// A claim by exact name, or else by dotted path into nested objects.
fn claim<'a>(claims: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    let found = match claims.get(name) {
        Some(v) => Some(v),
        None if name.contains('.') => {
            let mut path = name.split('.');
            let first = claims.get(path.next()?)?;
            path.try_fold(first, |v, key| v.as_object()?.get(key))
        }
        None => None,
    };
    found.filter(|v| !v.is_null())
}

/// Roles from a string (one role) or an array (its string elements).
fn roles_of(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::String(s)) if !s.is_empty() => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

/// A JWT NumericDate (RFC 7519: seconds, possibly fractional). Absent or null → `None`.
fn optional_numeric_date(value: Option<&Value>) -> Result<Option<u64>, AuthError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(secs) = n.as_u64() {
                return Ok(Some(secs));
            }
            match n.as_f64() {
                // Fractional seconds are truncated; the range check keeps the cast in range.
                Some(f) if f.is_finite() && (0.0..1e18).contains(&f) => Ok(Some(f as u64)),
                _ => Err(AuthError::Malformed),
            }
        }
        Some(_) => Err(AuthError::Malformed),
    }
}

/// The fixed identity of a client API key: its claims, plus `sub` (and the user claim) set to
/// its user, plus its roles under the roles claim.
fn client_identity(key: &ClientKeyConfig, user_claim: &str, roles_claim: &str) -> Authenticated {
    let mut claims = key.claims.clone();
    claims.insert("sub".to_owned(), Value::String(key.user.clone()));
    if user_claim != "sub" {
        claims.insert(user_claim.to_owned(), Value::String(key.user.clone()));
    }
    if !key.roles.is_empty() {
        let roles = key.roles.iter().cloned().map(Value::String).collect();
        claims.insert(roles_claim.to_owned(), Value::Array(roles));
    }
    Authenticated {
        identity: Identity {
            user_id: Arc::from(key.user.as_str()),
            claims,
            roles: key.roles.clone(),
        },
        expires_at: None,
        jti: None,
        issued_at: None,
    }
}

/// Reads and parses the PEM public key, failing with the path and a hint.
fn load_public_key(path: &Path, alg: JwtAlgorithm) -> Result<DecodingKey, AuthSetupError> {
    let bad = |reason: String| AuthSetupError::BadKey {
        path: path.to_owned(),
        alg,
        reason,
    };
    let pem = std::fs::read(path).map_err(|source| AuthSetupError::ReadKey {
        path: path.to_owned(),
        source,
    })?;
    match pem_label(&pem).as_deref() {
        None => {
            return Err(bad(
                "no PEM block (-----BEGIN PUBLIC KEY-----) found".to_owned()
            ));
        }
        Some(label) if label.contains("PRIVATE KEY") => {
            return Err(bad(format!(
                "it holds a {label}; give the public key (`openssl pkey -in {} -pubout`)",
                path.display()
            )));
        }
        Some("PUBLIC KEY" | "RSA PUBLIC KEY") => {}
        Some(label) => {
            return Err(bad(format!(
                "expected a PUBLIC KEY PEM block, found {label:?}"
            )));
        }
    }
    let key = match alg {
        JwtAlgorithm::Rs256 => DecodingKey::from_rsa_pem(&pem),
        JwtAlgorithm::Es256 => DecodingKey::from_ec_pem(&pem),
        JwtAlgorithm::Hs256 => {
            return Err(bad("HS256 uses auth.jwt_secret, not a key file".to_owned()));
        }
    };
    let expected = match alg {
        JwtAlgorithm::Es256 => "an EC P-256 public key",
        _ => "an RSA public key",
    };
    let key = key.map_err(|e| bad(format!("not {expected} ({e})")))?;
    // Builds the verifier once: this parses an EC key fully, so a key of the wrong curve
    // fails here rather than on every connection.
    jsonwebtoken::crypto::verify("AA", b"herald", &key, alg.to_jwt())
        .map_err(|e| bad(format!("not {expected} ({e})")))?;
    Ok(key)
}

/// The label of the first `-----BEGIN …-----` line.
fn pem_label(pem: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(pem).ok()?;
    let start = text.find("-----BEGIN ")? + "-----BEGIN ".len();
    let rest = text.get(start..)?;
    let end = rest.find("-----")?;
    Some(rest.get(..end)?.trim().to_owned())
}

/// A user-supplied value shortened for error messages.
fn echo(value: &str) -> String {
    if value.chars().count() <= MAX_ECHOED_USER_ID {
        value.to_owned()
    } else {
        let mut short: String = value.chars().take(MAX_ECHOED_USER_ID).collect();
        short.push('…');
        short
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// ---------------------------------------------------------------------------------------------
// Minting (herald token, herald serve --dev)
// ---------------------------------------------------------------------------------------------

/// Why a token could not be minted.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("the HS256 secret is empty")]
    EmptySecret,
    #[error("token claims must be a JSON object")]
    ClaimsNotObject,
    #[error("{0} signs with a shared secret, not a key file")]
    NeedsSecret(JwtAlgorithm),
    #[error("cannot read private key file {}: {source}", path.display())]
    ReadKey {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a usable {alg} private key (PEM, PKCS#8): {reason}", path.display())]
    BadKey {
        path: PathBuf,
        alg: JwtAlgorithm,
        reason: String,
    },
    #[error("cannot sign the token: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

/// Signs `claims` (a JSON object) with HS256.
pub fn mint_hs256(secret: &str, claims: &Value) -> Result<String, MintError> {
    if secret.is_empty() {
        return Err(MintError::EmptySecret);
    }
    if !claims.is_object() {
        return Err(MintError::ClaimsNotObject);
    }
    let key = EncodingKey::from_secret(secret.as_bytes());
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &key,
    )?)
}

/// Signs `claims` (a JSON object) with the PEM private key at `pem_path`: RS256 (PKCS#1 or
/// PKCS#8) or ES256 (P-256, PKCS#8: `openssl pkcs8 -topk8 -nocrypt` converts a SEC1
/// `EC PRIVATE KEY`).
pub fn mint_with_key_file(
    alg: JwtAlgorithm,
    pem_path: &Path,
    claims: &Value,
) -> Result<String, MintError> {
    if !claims.is_object() {
        return Err(MintError::ClaimsNotObject);
    }
    let pem = std::fs::read(pem_path).map_err(|source| MintError::ReadKey {
        path: pem_path.to_owned(),
        source,
    })?;
    let key = match alg {
        JwtAlgorithm::Rs256 => EncodingKey::from_rsa_pem(&pem),
        JwtAlgorithm::Es256 => EncodingKey::from_ec_pem(&pem),
        JwtAlgorithm::Hs256 => return Err(MintError::NeedsSecret(alg)),
    }
    .map_err(|e| MintError::BadKey {
        path: pem_path.to_owned(),
        alg,
        reason: e.to_string(),
    })?;
    Ok(jsonwebtoken::encode(
        &Header::new(alg.to_jwt()),
        claims,
        &key,
    )?)
}

/// Claims for a test or dev token: `sub` = `user`, `iat` = now, `exp` = now + `ttl`, a random
/// `jti`, plus `extra` (whose keys win, so `extra` may override any of these).
pub fn dev_claims(user: &str, ttl: Duration, extra: Map<String, Value>) -> Value {
    let now = unix_now();
    let mut claims = Map::new();
    claims.insert("sub".to_owned(), Value::from(user));
    claims.insert("iat".to_owned(), Value::from(now));
    claims.insert(
        "exp".to_owned(),
        Value::from(now.saturating_add(ttl.as_secs())),
    );
    claims.insert("jti".to_owned(), Value::from(ulid::Ulid::new().to_string()));
    claims.extend(extra);
    Value::Object(claims)
}

/// A random key (240 random bits, 60 hex characters) for `herald serve --dev` secrets and API
/// keys.
pub fn random_key() -> String {
    (0..3)
        .map(|_| format!("{:020x}", ulid::Ulid::new().random()))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use serde_json::json;

    const SECRET: &str = "a-long-test-secret-of-at-least-32-bytes!";
    const ADMIN_KEY: &str = "admin-key-0123456789";
    const PUBLISH_KEY: &str = "publish-key-0123456789";
    const CLIENT_KEY: &str = "client-key-0123456789";

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    fn hs_config() -> AuthConfig {
        AuthConfig {
            jwt_secret: Some(Secret::new(SECRET)),
            ..AuthConfig::default()
        }
    }

    fn auth_with(cfg: &AuthConfig) -> JwtAuthenticator {
        match JwtAuthenticator::new(cfg) {
            Ok(a) => a,
            Err(e) => panic!("authenticator setup failed: {e}"),
        }
    }

    fn token(claims: Value) -> String {
        mint_hs256(SECRET, &claims).expect("mint")
    }

    fn now() -> u64 {
        unix_now()
    }

    fn claims_for(user: &str) -> Value {
        dev_claims(user, Duration::from_secs(600), Map::new())
    }

    fn b64(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    #[test]
    fn hs256_good_token() {
        let auth = auth_with(&hs_config());
        let mut extra = Map::new();
        extra.insert("org_id".to_owned(), json!("7"));
        let claims = dev_claims("42", Duration::from_secs(600), extra);
        let a = auth
            .authenticate(&token(claims.clone()))
            .expect("valid token");
        assert_eq!(&*a.identity.user_id, "42");
        assert_eq!(a.identity.claims.get("org_id"), Some(&json!("7")));
        assert_eq!(a.expires_at, claims["exp"].as_u64());
        assert_eq!(a.issued_at, claims["iat"].as_u64());
        assert_eq!(a.jti.as_deref(), claims["jti"].as_str());
        assert!(a.identity.roles.is_empty());
    }

    #[test]
    fn wrong_secret_is_bad_signature() {
        let auth = auth_with(&hs_config());
        let t = mint_hs256("another-secret-entirely", &claims_for("42")).expect("mint");
        assert_eq!(auth.authenticate(&t), Err(AuthError::BadSignature));
    }

    #[test]
    fn expired_token() {
        let auth = auth_with(&hs_config());
        let t = token(json!({"sub": "42", "exp": now() - 100}));
        assert_eq!(auth.authenticate(&t), Err(AuthError::Expired));
    }

    #[test]
    fn missing_exp_is_malformed() {
        let auth = auth_with(&hs_config());
        let t = token(json!({"sub": "42"}));
        assert_eq!(auth.authenticate(&t), Err(AuthError::Malformed));
        let t = token(json!({"sub": "42", "exp": "tomorrow"}));
        assert_eq!(auth.authenticate(&t), Err(AuthError::Malformed));
    }

    #[test]
    fn nbf_in_future() {
        let auth = auth_with(&hs_config());
        let t = token(json!({"sub": "42", "exp": now() + 600, "nbf": now() + 100}));
        assert_eq!(auth.authenticate(&t), Err(AuthError::NotYetValid));
    }

    #[test]
    fn leeway_allows_skew() {
        let cfg = AuthConfig {
            leeway: Duration::from_secs(30),
            ..hs_config()
        };
        let auth = auth_with(&cfg);
        let expired = token(json!({"sub": "42", "exp": now() - 10}));
        let early = token(json!({"sub": "42", "exp": now() + 600, "nbf": now() + 10}));
        assert!(auth.authenticate(&expired).is_ok());
        assert!(auth.authenticate(&early).is_ok());
        let strict = auth_with(&hs_config());
        assert_eq!(strict.authenticate(&expired), Err(AuthError::Expired));
        assert_eq!(strict.authenticate(&early), Err(AuthError::NotYetValid));
    }

    #[test]
    fn issuer_checked() {
        let cfg = AuthConfig {
            issuer: Some("https://issuer".to_owned()),
            ..hs_config()
        };
        let auth = auth_with(&cfg);
        let exp = now() + 600;
        let good = token(json!({"sub": "42", "exp": exp, "iss": "https://issuer"}));
        let wrong = token(json!({"sub": "42", "exp": exp, "iss": "https://evil"}));
        let missing = token(json!({"sub": "42", "exp": exp}));
        assert!(auth.authenticate(&good).is_ok());
        assert_eq!(auth.authenticate(&wrong), Err(AuthError::WrongIssuer));
        assert_eq!(auth.authenticate(&missing), Err(AuthError::WrongIssuer));
    }

    #[test]
    fn audience_checked() {
        let cfg = AuthConfig {
            audience: Some("herald".to_owned()),
            ..hs_config()
        };
        let auth = auth_with(&cfg);
        let exp = now() + 600;
        let good = token(json!({"sub": "42", "exp": exp, "aud": "herald"}));
        let array = token(json!({"sub": "42", "exp": exp, "aud": ["billing", "herald"]}));
        let wrong = token(json!({"sub": "42", "exp": exp, "aud": "billing"}));
        let wrong_array = token(json!({"sub": "42", "exp": exp, "aud": ["billing", "crm"]}));
        let missing = token(json!({"sub": "42", "exp": exp}));
        assert!(auth.authenticate(&good).is_ok());
        assert!(auth.authenticate(&array).is_ok());
        assert_eq!(auth.authenticate(&wrong), Err(AuthError::WrongAudience));
        assert_eq!(
            auth.authenticate(&wrong_array),
            Err(AuthError::WrongAudience)
        );
        assert_eq!(auth.authenticate(&missing), Err(AuthError::WrongAudience));
    }

    #[test]
    fn audience_ignored_when_not_configured() {
        let auth = auth_with(&hs_config());
        let t = token(json!({"sub": "42", "exp": now() + 600, "aud": "someone-else"}));
        assert!(auth.authenticate(&t).is_ok());
    }

    #[test]
    fn alg_none_refused() {
        let auth = auth_with(&hs_config());
        let header = b64(&json!({"alg": "none", "typ": "JWT"}));
        let payload = b64(&json!({"sub": "42", "exp": now() + 600}));
        let t = format!("{header}.{payload}.");
        assert_eq!(auth.authenticate(&t), Err(AuthError::AlgorithmNotAllowed));
    }

    #[test]
    fn garbage_is_malformed() {
        let auth = auth_with(&hs_config());
        for bad in [
            "x",
            "a.b",
            "a.b.c",
            "a.b.c.d",
            "...",
            "é.é.é",
            "eyJhbGciOiJIUzI1NiJ9.e30",
        ] {
            assert_eq!(auth.authenticate(bad), Err(AuthError::Malformed), "{bad}");
        }
        let long = "a".repeat(MAX_TOKEN_LEN + 1);
        assert_eq!(auth.authenticate(&long), Err(AuthError::Malformed));
        assert_eq!(auth.authenticate(""), Err(AuthError::Missing));
        // A header without alg, and one with a crit extension.
        let payload = b64(&json!({"sub": "42", "exp": now() + 600}));
        let no_alg = format!("{}.{payload}.sig", b64(&json!({"typ": "JWT"})));
        assert_eq!(auth.authenticate(&no_alg), Err(AuthError::Malformed));
        let crit = format!(
            "{}.{payload}.sig",
            b64(&json!({"alg": "HS256", "crit": ["x"]}))
        );
        assert_eq!(auth.authenticate(&crit), Err(AuthError::Malformed));
        // Claims that are not an object.
        let array = format!("{}.{}.sig", b64(&json!({"alg": "HS256"})), b64(&json!([1])));
        assert!(auth.authenticate(&array).is_err());
    }

    fn rs_config() -> AuthConfig {
        AuthConfig {
            jwt_public_key_file: Some(fixture("rsa_public.pem")),
            jwt_algorithm: Some(JwtAlgorithm::Rs256),
            ..AuthConfig::default()
        }
    }

    fn es_config() -> AuthConfig {
        AuthConfig {
            jwt_public_key_file: Some(fixture("ec_public.pem")),
            jwt_algorithm: Some(JwtAlgorithm::Es256),
            ..AuthConfig::default()
        }
    }

    #[test]
    fn algorithm_confusion_refused() {
        let auth = auth_with(&rs_config());
        let public_pem = std::fs::read_to_string(fixture("rsa_public.pem")).expect("fixture");
        let forged = mint_hs256(&public_pem, &claims_for("42")).expect("mint");
        assert_eq!(
            auth.authenticate(&forged),
            Err(AuthError::AlgorithmNotAllowed)
        );
        // And the other way round: an RS256 token to an HS256 server.
        let rs = mint_with_key_file(
            JwtAlgorithm::Rs256,
            &fixture("rsa_private.pem"),
            &claims_for("42"),
        )
        .expect("mint");
        let hs = auth_with(&hs_config());
        assert_eq!(hs.authenticate(&rs), Err(AuthError::AlgorithmNotAllowed));
    }

    #[test]
    fn rs256_happy_path() {
        let auth = auth_with(&rs_config());
        let t = mint_with_key_file(
            JwtAlgorithm::Rs256,
            &fixture("rsa_private.pem"),
            &claims_for("alice"),
        )
        .expect("mint");
        let a = auth.authenticate(&t).expect("valid RS256 token");
        assert_eq!(&*a.identity.user_id, "alice");
        // Tampered payload.
        let mut parts: Vec<&str> = t.split('.').collect();
        let other = b64(&json!({"sub": "mallory", "exp": now() + 600}));
        parts[1] = &other;
        assert_eq!(
            auth.authenticate(&parts.join(".")),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn es256_happy_path() {
        let auth = auth_with(&es_config());
        let t = mint_with_key_file(
            JwtAlgorithm::Es256,
            &fixture("ec_private.pem"),
            &claims_for("bob"),
        )
        .expect("mint");
        let a = auth.authenticate(&t).expect("valid ES256 token");
        assert_eq!(&*a.identity.user_id, "bob");
        // A signature of the wrong length is a bad signature, not a panic.
        let (head, _) = t.rsplit_once('.').expect("three parts");
        assert_eq!(
            auth.authenticate(&format!("{head}.AAAA")),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn bad_key_files_fail_fast() {
        let missing = AuthConfig {
            jwt_public_key_file: Some(fixture("does-not-exist.pem")),
            ..rs_config()
        };
        let err = JwtAuthenticator::new(&missing).expect_err("missing file");
        assert!(err.to_string().contains("does-not-exist.pem"), "{err}");
        let private = AuthConfig {
            jwt_public_key_file: Some(fixture("rsa_private.pem")),
            ..rs_config()
        };
        let err = JwtAuthenticator::new(&private).expect_err("private key");
        assert!(err.to_string().contains("pubout"), "{err}");
        let rsa_as_ec = AuthConfig {
            jwt_public_key_file: Some(fixture("rsa_public.pem")),
            ..es_config()
        };
        let err = JwtAuthenticator::new(&rsa_as_ec).expect_err("wrong key type");
        assert!(err.to_string().contains("rsa_public.pem"), "{err}");
        let ec_as_rsa = AuthConfig {
            jwt_public_key_file: Some(fixture("ec_public.pem")),
            ..rs_config()
        };
        assert!(JwtAuthenticator::new(&ec_as_rsa).is_err());
    }

    #[test]
    fn numeric_sub() {
        let auth = auth_with(&hs_config());
        let a = auth
            .authenticate(&token(json!({"sub": 42, "exp": now() + 600})))
            .expect("ok");
        assert_eq!(&*a.identity.user_id, "42");
        let float = token(json!({"sub": 4.2, "exp": now() + 600}));
        assert_eq!(
            auth.authenticate(&float),
            Err(AuthError::MissingUserClaim("sub".to_owned()))
        );
    }

    #[test]
    fn missing_sub() {
        let auth = auth_with(&hs_config());
        let t = token(json!({"exp": now() + 600}));
        assert_eq!(
            auth.authenticate(&t),
            Err(AuthError::MissingUserClaim("sub".to_owned()))
        );
    }

    #[test]
    fn sub_with_space_is_bad_user_id() {
        let auth = auth_with(&hs_config());
        let t = token(json!({"sub": "a b", "exp": now() + 600}));
        assert_eq!(
            auth.authenticate(&t),
            Err(AuthError::BadUserId("a b".to_owned()))
        );
        let t = token(json!({"sub": "", "exp": now() + 600}));
        assert_eq!(
            auth.authenticate(&t),
            Err(AuthError::BadUserId(String::new()))
        );
    }

    #[test]
    fn custom_user_claim_and_dotted_paths() {
        let cfg = AuthConfig {
            user_claim: "uid".to_owned(),
            roles_claim: "realm_access.roles".to_owned(),
            ..hs_config()
        };
        let auth = auth_with(&cfg);
        let t = token(json!({
            "sub": "ignored", "uid": "u-1", "exp": now() + 600,
            "realm_access": {"roles": ["admin", "ops"]}
        }));
        let a = auth.authenticate(&t).expect("ok");
        assert_eq!(&*a.identity.user_id, "u-1");
        assert_eq!(a.identity.roles, vec!["admin".to_owned(), "ops".to_owned()]);
    }

    #[test]
    fn roles_as_string_and_array() {
        let auth = auth_with(&hs_config());
        let exp = now() + 600;
        let one = auth.authenticate(&token(json!({"sub": "1", "exp": exp, "roles": "admin"})));
        assert_eq!(one.expect("ok").identity.roles, vec!["admin".to_owned()]);
        let many = token(json!({"sub": "1", "exp": exp, "roles": ["viewer", 3, "ops"]}));
        let many = auth.authenticate(&many).expect("ok");
        assert_eq!(
            many.identity.roles,
            vec!["viewer".to_owned(), "ops".to_owned()]
        );
        assert_eq!(
            many.identity.claims.get("roles"),
            Some(&json!(["viewer", 3, "ops"]))
        );
    }

    fn keys_config() -> AuthConfig {
        let mut claims = Map::new();
        claims.insert("org_id".to_owned(), json!("7"));
        AuthConfig {
            api_keys: vec![
                ApiKeyConfig {
                    key: Secret::new(ADMIN_KEY),
                    scopes: vec![Scope::Admin],
                    name: Some("ops".to_owned()),
                },
                ApiKeyConfig {
                    key: Secret::new(PUBLISH_KEY),
                    scopes: vec![Scope::Publish],
                    name: None,
                },
            ],
            client_keys: vec![ClientKeyConfig {
                key: Secret::new(CLIENT_KEY),
                user: "device-gateway".to_owned(),
                roles: vec!["viewer".to_owned()],
                claims,
            }],
            ..hs_config()
        }
    }

    #[test]
    fn client_key_is_a_fixed_identity() {
        let auth = auth_with(&keys_config());
        let a = auth.authenticate(CLIENT_KEY).expect("client key");
        assert_eq!(&*a.identity.user_id, "device-gateway");
        assert_eq!(a.identity.roles, vec!["viewer".to_owned()]);
        assert_eq!(a.identity.claims.get("sub"), Some(&json!("device-gateway")));
        assert_eq!(a.identity.claims.get("org_id"), Some(&json!("7")));
        assert_eq!(a.identity.claims.get("roles"), Some(&json!(["viewer"])));
        assert_eq!(a.expires_at, None);
        // Server API keys are not client credentials; JWTs still work alongside.
        assert_eq!(auth.authenticate(ADMIN_KEY), Err(AuthError::Malformed));
        assert!(auth.authenticate(&token(claims_for("42"))).is_ok());
    }

    #[test]
    fn client_keys_only() {
        let cfg = AuthConfig {
            jwt_secret: None,
            ..keys_config()
        };
        let auth = auth_with(&cfg);
        assert_eq!(auth.jwt_algorithm(), None);
        assert!(auth.authenticate(CLIENT_KEY).is_ok());
        assert_eq!(
            auth.authenticate(&token(claims_for("42"))),
            Err(AuthError::UnknownKey)
        );
    }

    #[test]
    fn api_key_scopes() {
        let auth = auth_with(&keys_config());
        let admin = auth
            .authorize_api(Some(ADMIN_KEY), Scope::Admin)
            .expect("admin");
        assert_eq!(admin.name.as_deref(), Some("ops"));
        assert!(auth.authorize_api(Some(ADMIN_KEY), Scope::Publish).is_ok());
        assert!(
            auth.authorize_api(Some(PUBLISH_KEY), Scope::Publish)
                .is_ok()
        );
        assert_eq!(
            auth.authorize_api(Some(PUBLISH_KEY), Scope::Admin),
            Err(ApiAuthError::Forbidden)
        );
        assert_eq!(
            auth.authorize_api(Some("not-a-key-at-all-0000"), Scope::Publish),
            Err(ApiAuthError::Unknown)
        );
        assert_eq!(
            auth.authorize_api(Some(CLIENT_KEY), Scope::Publish),
            Err(ApiAuthError::Unknown)
        );
        assert_eq!(
            auth.authorize_api(None, Scope::Publish),
            Err(ApiAuthError::Missing)
        );
        assert_eq!(
            auth.authorize_api(Some(""), Scope::Publish),
            Err(ApiAuthError::Missing)
        );
        assert_eq!(ApiAuthError::Forbidden.http_status(), 403);
        assert_eq!(ApiAuthError::Unknown.http_status(), 401);
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer   abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearer"), None);
    }

    #[test]
    fn revocation_by_jti() {
        let auth = auth_with(&hs_config());
        let claims = claims_for("42");
        let t = token(claims.clone());
        let other = token(claims_for("42"));
        let generation = auth.revocation_generation();
        let request = RevocationRequest {
            jti: claims["jti"].as_str().map(str::to_owned),
            ..RevocationRequest::default()
        };
        auth.revoke(request.into_revocation(now()).expect("valid request"));
        assert_ne!(auth.revocation_generation(), generation);
        assert_eq!(auth.authenticate(&t), Err(AuthError::Revoked));
        assert!(auth.authenticate(&other).is_ok());
    }

    #[test]
    fn revocation_by_user() {
        let auth = auth_with(&keys_config());
        let t0 = now();
        let older = token(json!({"sub": "42", "iat": t0 - 10, "exp": t0 + 600}));
        let no_iat = token(json!({"sub": "42", "exp": t0 + 600}));
        let newer = token(json!({"sub": "42", "iat": t0, "exp": t0 + 600}));
        let someone_else = token(json!({"sub": "43", "iat": t0 - 10, "exp": t0 + 600}));
        let live = auth.authenticate(&older).expect("not yet revoked");
        auth.revoke(Revocation {
            jti: None,
            user: Some("42".to_owned()),
            until: None,
            at: t0 - 5,
        });
        assert!(auth.is_revoked(&live));
        assert_eq!(auth.authenticate(&older), Err(AuthError::Revoked));
        assert_eq!(auth.authenticate(&no_iat), Err(AuthError::Revoked));
        assert!(auth.authenticate(&newer).is_ok());
        assert!(auth.authenticate(&someone_else).is_ok());
        // A client key identity has no iat: revoking its user refuses it.
        auth.revoke(Revocation {
            jti: None,
            user: Some("device-gateway".to_owned()),
            until: None,
            at: t0,
        });
        assert_eq!(auth.authenticate(CLIENT_KEY), Err(AuthError::Revoked));
    }

    #[test]
    fn revocation_expires_and_is_purged() {
        let cfg = AuthConfig {
            revocation_ttl: Duration::from_secs(60),
            ..hs_config()
        };
        let auth = auth_with(&cfg);
        let t0 = now();
        let claims = json!({"sub": "42", "iat": t0 - 10, "exp": t0 + 6000, "jti": "j-1"});
        let a = auth.authenticate(&token(claims)).expect("ok");
        auth.revoke(Revocation {
            jti: Some("j-1".to_owned()),
            user: None,
            until: None,
            at: t0,
        });
        auth.revoke(Revocation {
            jti: None,
            user: Some("42".to_owned()),
            until: Some(t0 + 30),
            at: t0,
        });
        assert_eq!(auth.revocations_snapshot().len(), 2);
        assert!(auth.is_revoked_at(&a, t0 + 29));
        // The user window is over at t0 + 30, the jti one (default ttl) at t0 + 60.
        assert!(auth.is_revoked_at(&a, t0 + 30));
        assert_eq!(auth.revocations.read().users.len(), 0, "purged lazily");
        assert!(!auth.is_revoked_at(&a, t0 + 60));
        assert!(auth.revocations.read().is_empty());
        // A revocation already over is not stored.
        auth.revoke(Revocation {
            jti: Some("j-2".to_owned()),
            user: None,
            until: Some(1),
            at: 0,
        });
        assert!(auth.revocations_snapshot().is_empty());
    }

    #[test]
    fn user_revocation_windows_do_not_merge_wrongly() {
        let auth = auth_with(&hs_config());
        let mut a = auth.authenticate(&token(claims_for("42"))).expect("ok");
        a.issued_at = Some(120);
        let user = Some("42".to_owned());
        auth.revoke_at(
            Revocation {
                jti: None,
                user: user.clone(),
                until: Some(200),
                at: 100,
            },
            0,
        );
        auth.revoke_at(
            Revocation {
                jti: None,
                user,
                until: Some(160),
                at: 150,
            },
            0,
        );
        assert!(auth.is_revoked_at(&a, 155));
        // iat 120 is after the first window's `at` and the second window is over.
        assert!(!auth.is_revoked_at(&a, 170));
    }

    #[test]
    fn revocation_request_checks() {
        let now = 1_000;
        assert!(RevocationRequest::default().into_revocation(now).is_err());
        let bad_user = RevocationRequest {
            user: Some("a b".to_owned()),
            ..Default::default()
        };
        assert!(bad_user.into_revocation(now).is_err());
        let past = RevocationRequest {
            jti: Some("j".to_owned()),
            until: Some(now),
            ..Default::default()
        };
        assert!(past.into_revocation(now).is_err());
        let ok: RevocationRequest =
            serde_json::from_value(json!({"user": "42", "until": now + 10})).expect("parse");
        let r = ok.into_revocation(now).expect("valid");
        assert_eq!(r.at, now);
        assert_eq!(r.until, Some(now + 10));
        assert!(serde_json::from_value::<RevocationRequest>(json!({"usr": "42"})).is_err());
    }

    #[test]
    fn secret_debug_masks() {
        let s = Secret::new("super-secret-value");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(s.expose(), "super-secret-value");
        let printed = format!("{:?}", keys_config());
        assert!(
            !printed.contains(ADMIN_KEY) && !printed.contains(SECRET),
            "{printed}"
        );
        let auth = auth_with(&keys_config());
        assert!(!format!("{auth:?}").contains(CLIENT_KEY));
    }

    #[test]
    fn config_parses_from_toml() {
        let text = r#"
            jwt_secret = "a-long-test-secret-of-at-least-32-bytes!"
            jwt_algorithm = "HS256"
            issuer = "https://issuer"
            audience = "herald"
            leeway = "5s"
            revocation_ttl = "1h"
            [[api_keys]]
            key = "admin-key-0123456789"
            scopes = ["publish", "admin"]
            name = "billing-service"
            [[client_keys]]
            key = "client-key-0123456789"
            user = "device-gateway"
            roles = ["viewer"]
            claims = { org_id = "7" }
        "#;
        let cfg: AuthConfig = toml::from_str(text).expect("valid [auth]");
        assert_eq!(cfg.validate(), Ok(()));
        assert_eq!(cfg.user_claim, "sub");
        assert_eq!(cfg.leeway, Duration::from_secs(5));
        assert_eq!(cfg.revocation_ttl, Duration::from_secs(3600));
        assert_eq!(cfg.api_keys[0].scopes, vec![Scope::Publish, Scope::Admin]);
        assert_eq!(cfg.client_keys[0].claims.get("org_id"), Some(&json!("7")));

        let defaults: AuthConfig = toml::from_str("jwt_secret = \"x\"").expect("defaults");
        assert_eq!(defaults.revocation_ttl, Duration::from_secs(24 * 3600));
        assert_eq!(defaults.leeway, Duration::ZERO);
        assert!(toml::from_str::<AuthConfig>("jwt_secrt = \"x\"").is_err());
        let unknown_scope = "[[api_keys]]\nkey = \"0123456789abcdef\"\nscopes = [\"root\"]";
        assert!(toml::from_str::<AuthConfig>(unknown_scope).is_err());
        assert!(toml::from_str::<AuthConfig>("jwt_algorithm = \"none\"").is_err());
    }

    #[test]
    fn config_validation_messages() {
        fn err(cfg: AuthConfig) -> String {
            cfg.validate().expect_err("invalid config")
        }
        assert!(err(AuthConfig::default()).contains("auth.jwt_secret"));
        let both = AuthConfig {
            jwt_public_key_file: Some(fixture("rsa_public.pem")),
            ..hs_config()
        };
        assert!(err(both).contains("exclusive"));
        let empty = AuthConfig {
            jwt_secret: Some(Secret::new("")),
            ..AuthConfig::default()
        };
        assert!(err(empty).contains("auth.jwt_secret must not be empty"));
        let hs_rs = AuthConfig {
            jwt_algorithm: Some(JwtAlgorithm::Rs256),
            ..hs_config()
        };
        assert!(err(hs_rs).contains("auth.jwt_algorithm"));
        let no_alg = AuthConfig {
            jwt_algorithm: None,
            ..rs_config()
        };
        assert!(err(no_alg).contains("auth.jwt_algorithm"));
        let file_hs = AuthConfig {
            jwt_algorithm: Some(JwtAlgorithm::Hs256),
            ..rs_config()
        };
        assert!(err(file_hs).contains("HS256"));

        let mut short = keys_config();
        short.api_keys[1].key = Secret::new("short");
        let msg = err(short);
        assert!(
            msg.contains("auth.api_keys[1].key") && !msg.contains("short\""),
            "{msg}"
        );
        let mut dup = keys_config();
        dup.client_keys[0].key = Secret::new(ADMIN_KEY);
        let msg = err(dup);
        assert!(
            msg.contains("auth.client_keys[0].key duplicates auth.api_keys[0].key"),
            "{msg}"
        );
        assert!(!msg.contains(ADMIN_KEY));
        let mut no_scopes = keys_config();
        no_scopes.api_keys[0].scopes.clear();
        assert!(err(no_scopes).contains("auth.api_keys[0].scopes"));
        let mut bad_user = keys_config();
        bad_user.client_keys[0].user = "a/b".to_owned();
        assert!(err(bad_user).contains("auth.client_keys[0].user"));
        let big_leeway = AuthConfig {
            leeway: Duration::from_secs(7200),
            ..hs_config()
        };
        assert!(err(big_leeway).contains("auth.leeway"));

        let keys_only = AuthConfig {
            jwt_secret: None,
            ..keys_config()
        };
        assert_eq!(keys_only.validate(), Ok(()));
        let mut seen = HashSet::new();
        assert!(seen.insert(random_key()) && seen.insert(random_key()));
        assert_eq!(random_key().len(), 60);
    }

    #[test]
    fn minting_errors() {
        assert!(matches!(
            mint_hs256("", &claims_for("1")),
            Err(MintError::EmptySecret)
        ));
        assert!(matches!(
            mint_hs256(SECRET, &json!([1])),
            Err(MintError::ClaimsNotObject)
        ));
        let missing =
            mint_with_key_file(JwtAlgorithm::Rs256, &fixture("nope.pem"), &claims_for("1"));
        assert!(matches!(missing, Err(MintError::ReadKey { .. })));
        let wrong = mint_with_key_file(
            JwtAlgorithm::Es256,
            &fixture("rsa_private.pem"),
            &claims_for("1"),
        );
        assert!(matches!(wrong, Err(MintError::BadKey { .. })));
        let mut extra = Map::new();
        extra.insert("exp".to_owned(), json!(5));
        assert_eq!(
            dev_claims("1", Duration::from_secs(60), extra)["exp"],
            json!(5)
        );
    }
}
