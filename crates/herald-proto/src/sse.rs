//! Server-Sent Events framing (the `text/event-stream` format of the HTML Living Standard,
//! §9.2): what Herald's `/sse` writes. Pure: bytes in, bytes out.

use bytes::{BufMut, BytesMut};

/// One event: optional `event:` and `id:` fields, then `data` as `data:` lines (split at line
/// breaks, which SSE does not allow inside a field; outside JSON strings they are only
/// whitespace, so empty pieces are left out), then the blank line that dispatches it.
pub fn put_event(out: &mut BytesMut, event: Option<&str>, id: Option<&str>, data: &[u8]) {
    out.reserve(data.len() + 32);
    if let Some(e) = event {
        out.put_slice(b"event: ");
        out.put_slice(e.as_bytes());
        out.put_u8(b'\n');
    }
    if let Some(id) = id {
        out.put_slice(b"id: ");
        out.put_slice(id.as_bytes());
        out.put_u8(b'\n');
    }
    let mut any = false;
    for line in data
        .split(|b| *b == b'\n' || *b == b'\r')
        .filter(|l| !l.is_empty())
    {
        out.put_slice(b"data: ");
        out.put_slice(line);
        out.put_u8(b'\n');
        any = true;
    }
    if !any {
        out.put_slice(b"data:\n");
    }
    out.put_u8(b'\n');
}

/// The `retry:` field: how long a client waits before reconnecting.
pub fn put_retry(out: &mut BytesMut, ms: u64) {
    out.put_slice(format!("retry: {ms}\n\n").as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_with_line_breaks_becomes_several_data_lines() {
        let mut out = BytesMut::new();
        put_event(&mut out, Some("e"), Some("a@1"), b"{\"a\":\r\n1,\n\"b\":2}");
        assert_eq!(
            &out[..],
            b"event: e\nid: a@1\ndata: {\"a\":\ndata: 1,\ndata: \"b\":2}\n\n"
        );
    }
}
