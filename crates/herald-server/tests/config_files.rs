//! Every file in `tests/config/valid/` must load and validate; every file in
//! `tests/config/invalid/` must be refused with a message containing the substring its first
//! line announces (`# expect: <substring>`). Files are loaded as `herald serve --config FILE`
//! would, with no environment and no flags.

use std::path::{Path, PathBuf};

use herald_server::config::{Overrides, load};

fn config_files(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/config")
        .join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    files.sort();
    files
}

fn name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

#[test]
fn valid_files_load() {
    let files = config_files("valid");
    assert!(
        files.len() >= 4,
        "expected at least 4 valid files, found {}",
        files.len()
    );
    let failures: Vec<String> = files
        .iter()
        .filter_map(|path| {
            load(Some(path), Vec::new(), &Overrides::default())
                .err()
                .map(|e| format!("{}: {e}", name(path)))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "valid files refused:\n{}",
        failures.join("\n")
    );
}

#[test]
fn invalid_files_fail_with_the_expected_message() {
    let files = config_files("invalid");
    assert!(
        files.len() >= 10,
        "expected at least 10 invalid files, found {}",
        files.len()
    );
    let mut failures = Vec::new();
    for path in &files {
        let text = std::fs::read_to_string(path).expect("readable test file");
        let Some(expect) = text
            .lines()
            .next()
            .and_then(|line| line.strip_prefix("# expect:"))
            .map(str::trim)
            .filter(|s| !s.is_empty())
        else {
            failures.push(format!(
                "{}: first line must be `# expect: <substring>`",
                name(path)
            ));
            continue;
        };
        match load(Some(path), Vec::new(), &Overrides::default()) {
            Ok(_) => failures.push(format!(
                "{}: accepted, expected an error containing {expect:?}",
                name(path)
            )),
            Err(e) => {
                let message = e.to_string();
                // Shown with `--nocapture`, to review the messages users get.
                eprintln!("{}: {message}", name(path));
                if !message.contains(expect) {
                    failures.push(format!(
                        "{}: error does not contain {expect:?}:\n    {message}",
                        name(path)
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "invalid files:\n{}",
        failures.join("\n")
    );
}

/// The file's values are what the server gets (spot checks on the full example).
#[test]
fn full_file_values() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/config/valid/full.toml");
    let c = load(Some(&path), Vec::new(), &Overrides::default()).expect("full.toml loads");
    assert_eq!(c.server.listen.to_string(), "0.0.0.0:9090");
    assert_eq!(c.server.node_id, "node-a.1");
    assert_eq!(c.server.allowed_origins.len(), 3);
    assert_eq!(c.server.shutdown_grace.as_secs(), 30);
    assert_eq!(c.auth.user_claim, "user_id");
    assert_eq!(c.auth.api_keys.len(), 2);
    assert_eq!(c.auth.client_keys.len(), 1);
    assert_eq!(c.limits.send_queue, 4096);
    assert_eq!(c.limits.heartbeat_timeout.as_secs(), 45);
    assert_eq!(c.limits.connections_per_ip_per_second, 20);
    assert_eq!(c.log.level, "herald=debug,info");
    assert_eq!(c.topics.len(), 3);
    assert_eq!(c.acl().expect("rules compile").len(), 3);
}

/// Environment and flags apply on top of a file, in that order.
#[test]
fn environment_and_flags_over_a_file() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/config/valid/full.toml");
    let env = vec![
        ("HERALD_LIMITS__SEND_QUEUE".to_owned(), "16".to_owned()),
        ("HERALD_SERVER__NODE_ID".to_owned(), "from-env".to_owned()),
        (
            "HERALD_SERVER__LISTEN".to_owned(),
            "127.0.0.1:7000".to_owned(),
        ),
    ];
    let flags = Overrides {
        listen: Some("127.0.0.1:0".parse().expect("address")),
        ..Overrides::default()
    };
    let c = load(Some(&path), env, &flags).expect("loads");
    assert_eq!(c.limits.send_queue, 16);
    assert_eq!(c.server.node_id, "from-env");
    assert_eq!(c.server.listen.port(), 0);
    assert_eq!(c.limits.max_connections_per_user, 20, "file value kept");

    let env = vec![("HERALD_LIMITS__SEND_QUEUE".to_owned(), "many".to_owned())];
    let e = load(Some(&path), env, &Overrides::default()).expect_err("refused");
    assert!(
        e.to_string()
            .starts_with("environment HERALD_LIMITS__SEND_QUEUE: invalid type"),
        "{e}"
    );
}
