//! `herald token`: mint a JWT for testing.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::ValueEnum;
use herald_server::auth::{AuthConfig, JwtAlgorithm, dev_claims, mint_hs256, mint_with_key_file};
use herald_server::config::{self, Overrides, parse_duration};
use serde_json::{Map, Value};

use crate::herald_env;

#[derive(clap::Args)]
#[command(group(
    clap::ArgGroup::new("signing_key")
        .args(["config", "secret", "key_file"])
        .required(true)
        .multiple(true)
))]
pub struct TokenArgs {
    /// Take auth.jwt_secret, issuer, audience and claim names from this configuration (with
    /// the HERALD_* environment applied). --secret or --key-file, if given, sign instead.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// HS256 shared secret.
    #[arg(long, value_name = "SECRET", conflicts_with = "key_file")]
    secret: Option<String>,
    /// PEM private key (PKCS#8; PKCS#1 also for RS256).
    #[arg(long, value_name = "PEM", requires = "alg")]
    key_file: Option<PathBuf>,
    /// The algorithm of --key-file.
    #[arg(long, value_enum, requires = "key_file")]
    alg: Option<KeyAlg>,
    /// The user id (in `sub`, or the configured auth.user_claim).
    #[arg(long, default_value = "demo")]
    user: String,
    /// Lifetime, e.g. 30s, 15m, 1h, 7d.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    ttl: Duration,
    /// A role (repeatable); goes in `roles`, or the configured auth.roles_claim.
    #[arg(long = "role", value_name = "ROLE")]
    roles: Vec<String>,
    /// An extra claim `key=value` (repeatable); the value is JSON if it parses, else a string.
    #[arg(long = "claim", value_name = "KEY=VALUE", value_parser = parse_claim)]
    claims: Vec<(String, Value)>,
    /// Audience (`aud`).
    #[arg(long, value_name = "AUD")]
    aud: Option<String>,
    /// Issuer (`iss`).
    #[arg(long, value_name = "ISS")]
    iss: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum KeyAlg {
    #[value(name = "RS256")]
    Rs256,
    #[value(name = "ES256")]
    Es256,
}

impl From<KeyAlg> for JwtAlgorithm {
    fn from(alg: KeyAlg) -> Self {
        match alg {
            KeyAlg::Rs256 => JwtAlgorithm::Rs256,
            KeyAlg::Es256 => JwtAlgorithm::Es256,
        }
    }
}

pub fn token(args: TokenArgs) -> anyhow::Result<ExitCode> {
    let auth = match &args.config {
        Some(file) => config::load(Some(file), herald_env()?, &Overrides::default())?.auth,
        None => AuthConfig::default(),
    };
    let mut extra = Map::new();
    if let Some(iss) = args.iss.or_else(|| auth.issuer.clone()) {
        extra.insert("iss".to_owned(), Value::String(iss));
    }
    if let Some(aud) = args.aud.or_else(|| auth.audience.clone()) {
        extra.insert("aud".to_owned(), Value::String(aud));
    }
    let mut claims = claims_for(&auth, &args.user, args.ttl, &args.roles, extra);
    if let Value::Object(map) = &mut claims {
        map.extend(args.claims);
    }

    let token = match (&args.key_file, args.alg, &args.secret) {
        (Some(pem), Some(alg), _) => mint_with_key_file(alg.into(), pem, &claims)?,
        (_, _, Some(secret)) => mint_hs256(secret, &claims)?,
        _ => match (&auth.jwt_secret, auth.jwt_algorithm, &args.config) {
            (Some(secret), _, _) => mint_hs256(secret.expose(), &claims)?,
            (None, Some(alg), Some(file)) => bail!(
                "{} verifies {alg} tokens with a public key; sign with the private key: \
                 --key-file PRIVATE.pem --alg {alg}",
                file.display()
            ),
            _ => bail!("nothing to sign with: give --secret, --key-file with --alg, or --config"),
        },
    };
    println!("{token}");
    Ok(ExitCode::SUCCESS)
}

/// The token `serve --dev` prints: HS256 with the dev secret, issuer and audience as
/// configured.
pub fn mint_dev_token(
    secret: &str,
    auth: &AuthConfig,
    user: &str,
    ttl: Duration,
    roles: &[String],
) -> anyhow::Result<String> {
    let mut extra = Map::new();
    if let Some(iss) = &auth.issuer {
        extra.insert("iss".to_owned(), Value::String(iss.clone()));
    }
    if let Some(aud) = &auth.audience {
        extra.insert("aud".to_owned(), Value::String(aud.clone()));
    }
    let claims = claims_for(auth, user, ttl, roles, extra);
    mint_hs256(secret, &claims).context("cannot sign the dev token")
}

/// `sub`/`iat`/`exp`/`jti` for `user`, the user id also under `auth.user_claim` and the roles
/// under `auth.roles_claim` (dotted names become nested objects, as the server reads them),
/// then `extra`.
fn claims_for(
    auth: &AuthConfig,
    user: &str,
    ttl: Duration,
    roles: &[String],
    extra: Map<String, Value>,
) -> Value {
    let mut claims = Map::new();
    if auth.user_claim != "sub" {
        set_claim(&mut claims, &auth.user_claim, Value::from(user));
    }
    if !roles.is_empty() {
        set_claim(&mut claims, &auth.roles_claim, Value::from(roles.to_vec()));
    }
    claims.extend(extra);
    dev_claims(user, ttl, claims)
}

/// Sets `path` (`a.b.c`) in `claims`, creating objects on the way (replacing non-objects).
fn set_claim(claims: &mut Map<String, Value>, path: &str, value: Value) {
    match path.split_once('.') {
        None => {
            claims.insert(path.to_owned(), value);
        }
        Some((head, rest)) => {
            let entry = claims
                .entry(head.to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            if !entry.is_object() {
                *entry = Value::Object(Map::new());
            }
            if let Value::Object(inner) = entry {
                set_claim(inner, rest, value);
            }
        }
    }
}

fn parse_claim(s: &str) -> Result<(String, Value), String> {
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))?;
    if key.is_empty() {
        return Err(format!("{s:?}: the claim name is empty"));
    }
    let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_owned()));
    Ok((key.to_owned(), value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn claim_values_are_json_or_strings() {
        assert_eq!(
            parse_claim("org_id=7").unwrap(),
            ("org_id".into(), json!(7))
        );
        assert_eq!(
            parse_claim("a=[1,\"x\"]").unwrap(),
            ("a".into(), json!([1, "x"]))
        );
        assert_eq!(
            parse_claim("name=bob").unwrap(),
            ("name".into(), json!("bob"))
        );
        assert_eq!(parse_claim("eq=a=b").unwrap(), ("eq".into(), json!("a=b")));
        assert_eq!(parse_claim("empty=").unwrap(), ("empty".into(), json!("")));
        assert!(parse_claim("novalue").is_err());
        assert!(parse_claim("=1").is_err());
    }

    #[test]
    fn claims_follow_the_configured_claim_names() {
        let auth = AuthConfig {
            user_claim: "user.id".to_owned(),
            roles_claim: "realm_access.roles".to_owned(),
            ..AuthConfig::default()
        };
        let c = claims_for(
            &auth,
            "42",
            Duration::from_secs(60),
            &["admin".to_owned()],
            Map::new(),
        );
        assert_eq!(c["sub"], json!("42"));
        assert_eq!(c["user"]["id"], json!("42"));
        assert_eq!(c["realm_access"]["roles"], json!(["admin"]));
        let exp = c["exp"].as_u64().unwrap();
        let iat = c["iat"].as_u64().unwrap();
        assert_eq!(exp - iat, 60);

        let c = claims_for(
            &AuthConfig::default(),
            "u",
            Duration::from_secs(1),
            &[],
            Map::new(),
        );
        assert!(c.get("roles").is_none());
        assert_eq!(c["sub"], json!("u"));
    }
}
