//! Result files: `bench/results/<scenario>-<YYYY-MM-DD>.json` (a JSON array, one object per
//! run, appended) and `<scenario>-<date>.md` (a markdown table, one row per run).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use serde_json::Value;

/// `YYYY-MM-DD` (UTC) of a Unix time in seconds (Howard Hinnant's civil-from-days).
pub fn utc_date(unix_secs: u64) -> String {
    let (y, m, d) = civil(unix_secs / 86_400);
    format!("{y:04}-{m:02}-{d:02}")
}

/// `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_timestamp(unix_secs: u64) -> String {
    let s = unix_secs % 86_400;
    format!(
        "{}T{:02}:{:02}:{:02}Z",
        utc_date(unix_secs),
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

fn civil(days: u64) -> (i64, u32, u32) {
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One markdown row: `columns` are the header, `row` the values (same length).
pub struct MdRow<'a> {
    pub columns: &'a [&'a str],
    pub row: Vec<String>,
}

/// Appends `run` to `<dir>/<scenario>-<date>.json` and `md` to the `.md` table (header
/// written when the file is new). Returns the two paths.
pub fn append(
    dir: &Path,
    scenario: &str,
    date: &str,
    run: &Value,
    md: &MdRow<'_>,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let json_path = dir.join(format!("{scenario}-{date}.json"));
    let mut runs: Vec<Value> = match std::fs::read_to_string(&json_path) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{} is not a JSON array of runs", json_path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", json_path.display())),
    };
    runs.push(run.clone());
    let mut text = serde_json::to_string_pretty(&runs)?;
    text.push('\n');
    std::fs::write(&json_path, text)
        .with_context(|| format!("cannot write {}", json_path.display()))?;

    let md_path = dir.join(format!("{scenario}-{date}.md"));
    let mut out = String::new();
    if !md_path.exists() {
        out.push_str(&format!("| {} |\n", md.columns.join(" | ")));
        out.push_str(&format!(
            "|{}\n",
            md.columns.iter().map(|_| " --- |").collect::<String>()
        ));
    }
    out.push_str(&format!("| {} |\n", md.row.join(" | ")));
    use std::io::Write as _;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&md_path)
        .and_then(|mut f| f.write_all(out.as_bytes()))
        .with_context(|| format!("cannot write {}", md_path.display()))?;
    Ok((json_path, md_path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn dates() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(951_782_400), "2000-02-29");
        assert_eq!(utc_date(1_795_398_000), "2026-11-23");
        assert_eq!(utc_timestamp(1_795_398_000 + 3661), "2026-11-23T02:41:01Z");
    }

    #[test]
    fn appends_runs_and_rows() {
        let dir = tempfile::tempdir().unwrap();
        let cols = ["target", "n"];
        for n in [1, 2] {
            append(
                dir.path(),
                "s1-idle",
                "2026-11-23",
                &json!({"n": n}),
                &MdRow {
                    columns: &cols,
                    row: vec!["herald".into(), n.to_string()],
                },
            )
            .unwrap();
        }
        let runs: Vec<Value> = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("s1-idle-2026-11-23.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(runs, vec![json!({"n": 1}), json!({"n": 2})]);
        let md = std::fs::read_to_string(dir.path().join("s1-idle-2026-11-23.md")).unwrap();
        assert_eq!(
            md,
            "| target | n |\n| --- | --- |\n| herald | 1 |\n| herald | 2 |\n"
        );
    }

    #[test]
    fn refuses_a_corrupt_json_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("s3-fanout-d.json"), "{").unwrap();
        let md = MdRow {
            columns: &["a"],
            row: vec!["1".into()],
        };
        assert!(append(dir.path(), "s3-fanout", "d", &json!({}), &md).is_err());
    }
}
