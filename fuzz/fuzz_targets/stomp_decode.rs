//! Fuzzes `herald_proto::stomp::decode` with small limits. Beyond "never panics", every decoded
//! item is checked against the limits and the spec, the whole message is re-encoded and must
//! decode to the same items, and the server encoders are fed the decoded values and read back.
#![no_main]

use herald_proto::stomp::{self, Command, Incoming, Limits};
use libfuzzer_sys::fuzz_target;

const LIMITS: Limits = Limits {
    max_headers: 8,
    max_header_line: 128,
    max_body: 1024,
};

/// For decoding what we encoded: escaping may lengthen a line (a raw `:` in a value becomes
/// `\c`), so lines are not limited there.
const RELAXED: Limits = Limits {
    max_header_line: usize::MAX,
    ..LIMITS
};

fuzz_target!(|data: &[u8]| {
    let items = match stomp::decode(data, &LIMITS) {
        Ok(items) => items,
        Err(e) => {
            check_error_frame(&e.message());
            return;
        }
    };
    assert!(items.len() <= data.len());

    let mut reencoded = Vec::new();
    let mut round_trips = true;
    let mut after_heartbeat = false;
    for item in &items {
        match item {
            Incoming::Heartbeat => {
                assert!(!after_heartbeat, "one Heartbeat per run of EOLs");
                after_heartbeat = true;
                reencoded.extend_from_slice(stomp::HEARTBEAT);
            }
            Incoming::Frame(f) => {
                after_heartbeat = false;
                check_frame(f);
                let verbatim = matches!(f.command, Command::Connect | Command::Stomp);
                // A verbatim value cannot end in CR: the CR would be read as part of the EOL.
                if verbatim && f.headers.iter().any(|(_, v)| v.ends_with('\r')) {
                    round_trips = false;
                }
                reencoded.extend_from_slice(&f.encode());
                if f.command == Command::Send {
                    check_message(f);
                }
            }
        }
    }
    if round_trips {
        assert_eq!(stomp::decode(&reencoded, &RELAXED).as_ref(), Ok(&items));
    }
});

fn check_frame(f: &stomp::Frame) {
    assert!(f.headers.len() <= LIMITS.max_headers);
    assert!(f.body.len() <= LIMITS.max_body);
    assert!(f.command == Command::Send || f.body.is_empty());
    for (name, value) in &f.headers {
        assert!(!name.is_empty());
        // Unescaping never lengthens, so the decoded line fits the raw line's limit.
        assert!(name.len() + 1 + value.len() <= LIMITS.max_header_line);
    }
    match f.header("content-length") {
        Some(n) => assert_eq!(n.parse::<usize>().ok(), Some(f.body.len())),
        None => assert!(!f.body.contains(&0)),
    }
}

/// A SEND's destination, headers and body, sent on as a MESSAGE (head + shared tail), read back
/// (relabelled SEND, as the decoder takes client frames only).
fn check_message(f: &stomp::Frame) {
    let sub = f.header("destination").unwrap_or("");
    let ack = f.header("receipt");
    let headers: Vec<(&str, &str)> = f
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let mut msg = stomp::message_head(sub, ack);
    msg.extend_from_slice(&stomp::message_tail(&headers, &f.body));
    assert!(msg.starts_with(b"MESSAGE\n"));
    let send = [b"SEND".as_slice(), &msg[b"MESSAGE".len()..]].concat();
    let relaxed = Limits {
        max_headers: usize::MAX,
        ..RELAXED
    };
    let back = match stomp::decode(&send, &relaxed).as_deref() {
        Ok([Incoming::Frame(back)]) => back.clone(),
        other => panic!("MESSAGE does not decode: {other:?}"),
    };
    assert_eq!(back.header("subscription"), Some(sub));
    if ack.is_some() {
        assert_eq!(back.header("ack"), ack);
    }
    assert_eq!(back.body, f.body);
    let content_lengths: Vec<_> = back
        .headers
        .iter()
        .filter(|(n, _)| n == "content-length")
        .collect();
    assert_eq!(content_lengths.len(), 1);
    assert_eq!(
        back.header("content-length"),
        Some(f.body.len().to_string().as_str())
    );
}

/// The ERROR frame for a decode error reads back with that message.
fn check_error_frame(message: &str) {
    assert!(!message.is_empty() && !message.contains(['\n', '\r', '\0']));
    let err = stomp::encode_error(message, Some("r:1"), message);
    let send = [b"SEND".as_slice(), &err[b"ERROR".len()..]].concat();
    match stomp::decode(&send, &RELAXED).as_deref() {
        Ok([Incoming::Frame(back)]) => {
            assert_eq!(back.header("message"), Some(message));
            assert_eq!(back.header("receipt-id"), Some("r:1"));
            assert_eq!(&back.body[..], message.as_bytes());
        }
        other => panic!("ERROR does not decode: {other:?}"),
    }
}
