use std::sync::Arc;
use std::time::Duration;
use herald_core::store::{InboxRecord, InboxStatus, Store};
use herald_store_sql::{Options, SqlStore};
use serde_json::value::RawValue;
use sqlx::Connection;

fn rec(id: &str) -> InboxRecord {
    InboxRecord { id: id.into(), user: "tom".into(), topic: "t".into(), event: "e".into(),
        data: RawValue::from_string("{}".into()).unwrap(), trace_id: None, status: InboxStatus::Pending,
        retry_count: 0, created_at: 1_800_000_000_000, updated_at: 1 }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let db = format!("herald_dbg_{}", std::process::id());
    let mut admin = sqlx::MySqlConnection::connect("mysql://root@127.0.0.1:3306/test").await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}"))).execute(&mut admin).await.unwrap();
    let url = format!("mysql://root@127.0.0.1:3306/{db}");
    for attempt in 0..200 {
        let t0 = std::time::Instant::now();
        let a = Arc::new(SqlStore::connect(&url, Options::default()).await.unwrap());
        let b = Arc::new(SqlStore::connect(&url, Options::default()).await.unwrap());
        let mut tasks = Vec::new();
        for round in 0..5 { for s in [&a, &b] { for i in 0..100 {
            let s = s.clone(); let id = format!("{attempt}-{round}-{i}");
            tasks.push(tokio::spawn(async move { s.insert(rec(&id)).await }));
        }}}
        let watchdog = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let mut c = sqlx::MySqlConnection::connect("mysql://root@127.0.0.1:3306/test").await.unwrap();
            let rows: Vec<(i64, Option<String>, Option<String>, Option<String>)> = sqlx::query_as("SELECT ID, COMMAND, STATE, LEFT(INFO, 120) FROM information_schema.PROCESSLIST").fetch_all(&mut c).await.unwrap();
            for r in rows { println!("PL {r:?}"); }
            let st: (String, String, String) = sqlx::query_as("SHOW ENGINE INNODB STATUS").fetch_one(&mut c).await.unwrap();
            let s = st.2; if let (Some(i), Some(j)) = (s.find("LIST OF TRANSACTIONS"), s.find("FILE I/O")) { println!("{}", &s[i..j]); }
            if let Some(i) = s.find("LATEST DETECTED DEADLOCK") { println!("{}", &s[i..(i+3000).min(s.len())]); }
        });
        let mut errs = 0;
        for t in tasks { if let Err(e) = t.await.unwrap() { errs += 1; if errs == 1 { println!("ERR {e}"); } } }
        watchdog.abort();
        let el = t0.elapsed(); if el > Duration::from_millis(500) || errs > 0 { println!("attempt {attempt}: {el:?} errors {errs} stats {:?} {:?}", a.write_stats(), b.write_stats()); }
        if errs > 0 { break; }
    }
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {db}"))).execute(&mut admin).await.unwrap();
}
