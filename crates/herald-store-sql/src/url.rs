//! `store.url`: which backend a URL names, and how it may be shown in messages.

use crate::error::SetupError;
use crate::store::Backend;

/// The backend named by the scheme of `url` (case-insensitive), and the URL as the driver
/// expects it (`mariadb://` becomes `mysql://`, `postgresql://` stays as it is).
pub(crate) fn parse(url: &str) -> Result<(Backend, String), SetupError> {
    let url = url.trim();
    if url.is_empty() {
        return Err(SetupError::UnsupportedScheme {
            scheme: String::new(),
        });
    }
    let (scheme, rest) = url.split_once(':').unwrap_or((url, ""));
    let backend = match scheme.to_ascii_lowercase().as_str() {
        "sqlite" => Backend::Sqlite,
        "postgres" | "postgresql" => Backend::Postgres,
        "mysql" | "mariadb" => Backend::MySql,
        _ => {
            return Err(SetupError::UnsupportedScheme {
                scheme: excerpt(scheme),
            });
        }
    };
    let normalized = match backend {
        Backend::MySql => format!("mysql:{rest}"),
        Backend::Sqlite => format!("sqlite:{rest}"),
        Backend::Postgres => format!("postgres:{rest}"),
    };
    Ok((backend, normalized))
}

/// At most 32 characters of an unknown scheme, for the message.
fn excerpt(s: &str) -> String {
    s.chars().take(32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes() {
        assert_eq!(
            parse("MariaDB://root@h/db").ok(),
            Some((Backend::MySql, "mysql://root@h/db".to_owned()))
        );
        assert_eq!(
            parse("postgresql://h/db").ok(),
            Some((Backend::Postgres, "postgres://h/db".to_owned()))
        );
        assert_eq!(
            parse("sqlite::memory:").ok(),
            Some((Backend::Sqlite, "sqlite::memory:".to_owned()))
        );
        assert!(matches!(
            parse("mongodb://h"),
            Err(SetupError::UnsupportedScheme { scheme }) if scheme == "mongodb"
        ));
        assert!(matches!(
            parse("memory"),
            Err(SetupError::UnsupportedScheme { .. })
        ));
        assert!(matches!(
            parse(" "),
            Err(SetupError::UnsupportedScheme { .. })
        ));
    }
}
