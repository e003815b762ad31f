//! Percent-encoding of one URL component (a path segment or a query value).

/// Percent-encodes `s` as one URL component: every byte outside the RFC 3986 unreserved set
/// (`A-Z a-z 0-9 - . _ ~`) becomes `%XX`, so `/` turns into `%2F` and a topic stays one path
/// segment (`device/d-9/telemetry` → `device%2Fd-9%2Ftelemetry`).
pub fn percent_encode(s: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::percent_encode;

    #[test]
    fn topic_becomes_one_segment() {
        assert_eq!(
            percent_encode("device/d-9/telemetry"),
            "device%2Fd-9%2Ftelemetry"
        );
        assert_eq!(percent_encode("room/chat:room001"), "room%2Fchat%3Aroom001");
    }

    #[test]
    fn unreserved_kept_everything_else_escaped() {
        assert_eq!(percent_encode("aZ09-._~"), "aZ09-._~");
        assert_eq!(
            percent_encode("a b+c&d=e?f#g%"),
            "a%20b%2Bc%26d%3De%3Ff%23g%25"
        );
        assert_eq!(percent_encode("user@x"), "user%40x");
        // Multi-byte UTF-8 is escaped byte by byte.
        assert_eq!(percent_encode("é"), "%C3%A9");
        assert_eq!(percent_encode(""), "");
    }
}
