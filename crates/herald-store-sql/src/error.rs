//! Why a SQL store could not start. Every message names the setting, `store.url`, and the
//! URL it shows has its password masked.

use std::path::PathBuf;

/// A store that cannot start: the gateway must not start either (no silent fallback to memory).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(
        "store.url: unsupported scheme {scheme:?} (expected sqlite://…, postgres://… or mysql://…; \
         `memory` is not a SQL store)"
    )]
    UnsupportedScheme { scheme: String },

    #[error(
        "store.url: the {backend} backend is not compiled into this build \
         (cargo feature `{feature}` of herald-store-sql)"
    )]
    NotCompiled {
        backend: &'static str,
        feature: &'static str,
    },

    #[error("store.url: invalid {backend} URL {url}: {source}")]
    InvalidUrl {
        backend: &'static str,
        url: String,
        #[source]
        source: sqlx::Error,
    },

    #[error("store.url: cannot create the directory {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("store.url: cannot connect to {backend} at {url}: {cause} ({source})")]
    Connect {
        backend: &'static str,
        url: String,
        /// `unreachable`, `authentication failed`, `database does not exist`, …
        cause: &'static str,
        #[source]
        source: sqlx::Error,
    },

    #[error("store.url: migrating the {backend} schema at {url} failed: {source}")]
    Migrate {
        backend: &'static str,
        url: String,
        #[source]
        source: sqlx::Error,
    },

    #[error(
        "store.url: the schema at {url} is at version {found}, newer than this build knows \
         ({known}); upgrade Herald"
    )]
    SchemaTooNew { url: String, found: i32, known: i32 },

    #[error(
        "store.url: another node has held the migration lock at {url} for too long; \
         retry when its start-up has finished"
    )]
    MigrationLocked { url: String },
}

/// What an error from opening a connection most likely means, for the message.
pub(crate) fn connect_cause(e: &sqlx::Error) -> &'static str {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => "unreachable",
        sqlx::Error::Tls(_) => "TLS failed",
        sqlx::Error::Database(db) => {
            let code = db.code();
            match code.as_deref() {
                // PostgreSQL: invalid_authorization_specification, invalid_password.
                // MySQL reports 28000 for "access denied" too.
                Some("28000" | "28P01") => "authentication failed",
                Some("3D000") => "database does not exist",
                // MySQL 1049 "Unknown database" is reported as 42000.
                Some("42000") if db.message().contains("Unknown database") => {
                    "database does not exist"
                }
                Some("42000") if db.message().contains("Access denied") => "access denied",
                _ => "refused by the database",
            }
        }
        sqlx::Error::Configuration(_) => "invalid configuration",
        _ => "connection failed",
    }
}
