//! Credentials out of what is logged or answered: one rule for every URL Herald prints (store,
//! bus, brokers).

/// `url` with the password of its userinfo replaced by `***` (`postgres://u:***@h/db`); the
/// user, host, path and query are kept. A URL without a password comes back unchanged. The
/// authority ends at the first `/`, `?` or `#`, and the userinfo at its last `@`, so a password
/// holding `@` is masked whole.
pub fn url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}{tail}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_passwords_only() {
        assert_eq!(
            url_password("postgres://u:s3cr@t@h:5432/db?x=1"),
            "postgres://u:***@h:5432/db?x=1"
        );
        assert_eq!(
            url_password("redis://:pw@h:6379/0"),
            "redis://:***@h:6379/0"
        );
        assert_eq!(
            url_password("amqp://u:secret@h:5672/%2f"),
            "amqp://u:***@h:5672/%2f"
        );
        assert_eq!(url_password("mysql://root@h/db"), "mysql://root@h/db");
        assert_eq!(url_password("amqp://u@h/v"), "amqp://u@h/v");
        assert_eq!(url_password("sqlite://data/h.db"), "sqlite://data/h.db");
        assert_eq!(url_password("nats://h:4222"), "nats://h:4222");
        assert_eq!(url_password("sqlite::memory:"), "sqlite::memory:");
        assert_eq!(url_password("http://h/p?u=a@b"), "http://h/p?u=a@b");
    }
}
