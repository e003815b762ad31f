//! One behaviour suite, the semantics of `herald_core::store::MemoryStore`, run against each
//! backend on the real servers of this machine: SQLite (a file in a temporary directory),
//! PostgreSQL (a random schema) and MariaDB (a random database). Every check gets a database
//! of its own, removed at the end.

#![cfg(all(feature = "sqlite", feature = "postgres", feature = "mysql"))]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Kind, TestDb, ids, rec, rec_aged, strings};
use futures_util::future::join_all;
use herald_core::store::{InboxStatus, Inserted, Retention, Store};
use herald_store_sql::{Options, SCHEMA_VERSION};

const HOUR: Duration = Duration::from_secs(3600);

/// Every check as one test per backend: `sqlite::idempotency`, `postgres::idempotency`, …
macro_rules! suite {
    ($($check:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    super::$check(&super::TestDb::new(super::Kind::Sqlite).await).await;
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    super::$check(&super::TestDb::new(super::Kind::Postgres).await).await;
                }
            )+
        }
        mod mysql {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    super::$check(&super::TestDb::new(super::Kind::MySql).await).await;
                }
            )+
        }
    };
}

suite!(
    idempotency,
    concurrent_duplicates,
    replay_order,
    sent_and_ack,
    concurrent_updates_share_commits,
    acks_overtake_queued_inserts,
    retries_and_failed,
    list_filters,
    purge_by_count,
    purge_by_age,
    concurrent_inserts_are_batched,
    migrations_are_idempotent,
    reconnects_after_losing_connections,
    locked_table_fails_promptly,
    oversized_record_fails_alone,
    refused_record_fails_alone,
    two_writers_share_ids,
);

async fn idempotency(db: &TestDb) {
    let store = db.open().await;
    let s: &dyn Store = &store;
    assert_eq!(s.insert(rec("m1", "alice")).await.unwrap(), Inserted::New);
    assert_eq!(
        s.insert(rec("m1", "alice")).await.unwrap(),
        Inserted::Duplicate
    );
    assert_eq!(
        s.insert(rec("m1", "bob")).await.unwrap(),
        Inserted::Duplicate,
        "ids are unique across the store, not per user"
    );
    assert!(s.undelivered("bob", 10).await.unwrap().is_empty());
    // Exact comparison: no case folding, no trailing-space padding (MySQL collations).
    for id in ["M1", "m1 ", " m1", "m1\u{301}"] {
        assert_eq!(
            s.insert(rec(id, "alice")).await.unwrap(),
            Inserted::New,
            "{id:?}"
        );
    }
    // What goes in comes out: unicode, JSON text, trace id.
    let mut r = rec("m2", "Ålice ✓");
    r.trace_id = Some("trace-ü".into());
    r.topic = "user/Ålice ✓".into();
    let data = r.data.get().to_owned();
    s.insert(r).await.unwrap();
    let got = s.list("Ålice ✓", None, 10).await.unwrap();
    assert_eq!(ids(&got), ["m2"]);
    assert_eq!(got[0].data.get(), data);
    assert_eq!(got[0].trace_id.as_deref(), Some("trace-ü"));
    assert_eq!(got[0].topic, "user/Ålice ✓");
    assert_eq!(got[0].status, InboxStatus::Pending);
    assert!(
        s.list("ålice ✓", None, 10).await.unwrap().is_empty(),
        "users are case-sensitive"
    );
    assert!(
        s.list("Ålice ✓ ", None, 10).await.unwrap().is_empty(),
        "and space-exact"
    );
    s.ping().await.unwrap();
}

async fn concurrent_duplicates(db: &TestDb) {
    let store = Arc::new(db.open().await);
    // Many pairs at once: some pairs land in one batch, some in two, some race other writes.
    let mut tasks = Vec::new();
    for i in 0..50 {
        for _ in 0..2 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                (i, store.insert(rec(&format!("dup-{i}"), "carol")).await)
            }));
        }
    }
    let mut new = vec![0; 50];
    for t in tasks {
        let (i, r) = t.await.unwrap();
        if r.unwrap() == Inserted::New {
            new[i] += 1;
        }
    }
    assert!(
        new.iter().all(|n| *n == 1),
        "exactly one New per id: {new:?}"
    );
    assert_eq!(store.list("carol", None, 1000).await.unwrap().len(), 50);
}

async fn replay_order(db: &TestDb) {
    let store = db.open().await;
    let s: &dyn Store = &store;
    // Oldest first by created_at, ties in insertion order.
    let same = rec_aged("b", "dave", HOUR);
    let mut later = rec("c", "dave");
    later.created_at = same.created_at;
    s.insert(same).await.unwrap();
    s.insert(later).await.unwrap();
    s.insert(rec_aged("a", "dave", 2 * HOUR)).await.unwrap();
    s.insert(rec("d", "dave")).await.unwrap();
    s.insert(rec("x", "erin")).await.unwrap();
    assert_eq!(
        ids(&s.undelivered("dave", 10).await.unwrap()),
        ["a", "b", "c", "d"]
    );
    assert_eq!(ids(&s.undelivered("dave", 2).await.unwrap()), ["a", "b"]);
    assert!(s.undelivered("dave", 0).await.unwrap().is_empty());
    assert_eq!(
        ids(&s.list("dave", None, 10).await.unwrap()),
        ["d", "c", "b", "a"]
    );
    assert!(s.undelivered("nobody", 10).await.unwrap().is_empty());
}

async fn sent_and_ack(db: &TestDb) {
    let store = db.open().await;
    let s: &dyn Store = &store;
    for id in ["1", "2", "3"] {
        s.insert(rec(id, "frank")).await.unwrap();
    }
    s.insert(rec("g1", "grace")).await.unwrap();
    s.mark_sent("frank", &strings(&["1", "2", "nope"]))
        .await
        .unwrap();
    s.mark_sent("frank", &[]).await.unwrap();
    let sent = s.list("frank", Some(InboxStatus::Sent), 10).await.unwrap();
    assert_eq!(ids(&sent), ["2", "1"]);
    assert!(sent[0].updated_at >= sent[0].created_at);
    // Sent messages are still undelivered until acked.
    assert_eq!(
        ids(&s.undelivered("frank", 10).await.unwrap()),
        ["1", "2", "3"]
    );

    assert_eq!(
        s.ack("grace", &strings(&["1", "2"])).await.unwrap(),
        0,
        "another user's ack touches nothing"
    );
    assert_eq!(
        s.ack("frank", &strings(&["g1"])).await.unwrap(),
        0,
        "nor theirs"
    );
    assert_eq!(
        s.ack("frank", &strings(&["1", "1", "3", "nope"]))
            .await
            .unwrap(),
        2,
        "each unacked message of the user counts once"
    );
    assert_eq!(
        s.ack("frank", &strings(&["1"])).await.unwrap(),
        0,
        "already acked"
    );
    assert_eq!(s.ack("frank", &[]).await.unwrap(), 0);
    assert_eq!(ids(&s.undelivered("frank", 10).await.unwrap()), ["2"]);
    assert_eq!(ids(&s.undelivered("grace", 10).await.unwrap()), ["g1"]);
    // An acked message never goes back to sent.
    s.mark_sent("frank", &strings(&["1"])).await.unwrap();
    assert_eq!(
        ids(&s.list("frank", Some(InboxStatus::Acked), 10).await.unwrap()),
        ["3", "1"]
    );
    // Many ids at once (several statements).
    let many: Vec<String> = (0..1200).map(|i| format!("many-{i}")).collect();
    assert_eq!(s.ack("frank", &many).await.unwrap(), 0);
}

/// An ack queued behind a backlog of inserts is written in the writer's next round, not
/// after the backlog: status updates have their own queue. (With one queue, the ack waited
/// for every insert ahead of it, long enough for the message to be sent again.)
async fn acks_overtake_queued_inserts(db: &TestDb) {
    const BACKLOG: usize = 2000;
    let store = Arc::new(
        db.open_with(Options {
            // Small rounds: the backlog takes many of them.
            batch_max: 20,
            ..Options::default()
        })
        .await,
    );
    store.insert(rec("first", "olivia")).await.unwrap();
    let done = Arc::new(AtomicUsize::new(0));
    let backlog: Vec<_> = (0..BACKLOG)
        .map(|i| {
            let (store, done) = (store.clone(), done.clone());
            tokio::spawn(async move {
                let s: &dyn Store = &*store;
                s.insert(rec(&format!("b{i}"), "peggy")).await.unwrap();
                done.fetch_add(1, Ordering::SeqCst);
            })
        })
        .collect();
    // Let the backlog reach the queue before the ack: the writer has started on it, and the
    // rest of the spawned inserts have had time to queue.
    while done.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let s: &dyn Store = &*store;
    assert_eq!(s.ack("olivia", &strings(&["first"])).await.unwrap(), 1);
    let written = done.load(Ordering::SeqCst);
    assert!(
        written < BACKLOG / 2,
        "the ack was answered after {written} of {BACKLOG} queued inserts"
    );
    for task in backlog {
        task.await.unwrap();
    }
    assert_eq!(
        ids(&s
            .list("olivia", Some(InboxStatus::Acked), 10)
            .await
            .unwrap()),
        ["first"]
    );
    assert_eq!(s.list("peggy", None, 1000).await.unwrap().len(), 1000);
}

/// Status changes from many users at once are grouped into shared commits by the writer;
/// each caller still gets exactly its own count, and nobody touches another user's rows.
async fn concurrent_updates_share_commits(db: &TestDb) {
    let store = db.open().await;
    let s: &dyn Store = &store;
    let users: Vec<String> = (0..20).map(|u| format!("u{u}")).collect();
    for u in &users {
        for m in 0..5 {
            s.insert(rec(&format!("{u}-{m}"), u)).await.unwrap();
        }
    }
    // Every user at once: mark 0..4 sent, ack 0..2 (twice, concurrently), and try to ack
    // the next user's message 0.
    let work = users.iter().enumerate().map(|(n, u)| {
        let next = &users[(n + 1) % users.len()];
        async move {
            let mine =
                |ms: &[usize]| -> Vec<String> { ms.iter().map(|m| format!("{u}-{m}")).collect() };
            let (to_send, to_ack) = (mine(&[0, 1, 2, 3]), mine(&[0, 1, 2]));
            let theirs = [format!("{next}-0"), format!("{next}-4")];
            let (sent, a, b, theirs) = tokio::join!(
                s.mark_sent(u, &to_send),
                s.ack(u, &to_ack),
                s.ack(u, &to_ack),
                s.ack(u, &theirs),
            );
            sent.unwrap();
            (a.unwrap() + b.unwrap(), theirs.unwrap())
        }
    });
    let results = futures_util::future::join_all(work).await;
    for (n, (acked, theirs)) in results.into_iter().enumerate() {
        assert_eq!(
            acked, 3,
            "user {n}: each message acked once across both calls"
        );
        assert_eq!(theirs, 0, "user {n}: another user's ids touch nothing");
    }
    for u in &users {
        let acked = s.list(u, Some(InboxStatus::Acked), 10).await.unwrap();
        let mut acked = ids(&acked);
        acked.sort();
        assert_eq!(
            acked,
            [format!("{u}-0"), format!("{u}-1"), format!("{u}-2")]
        );
        assert_eq!(
            ids(&s.list(u, Some(InboxStatus::Sent), 10).await.unwrap()),
            [format!("{u}-3")]
        );
        assert_eq!(
            ids(&s.list(u, Some(InboxStatus::Pending), 10).await.unwrap()),
            [format!("{u}-4")]
        );
    }
}

async fn retries_and_failed(db: &TestDb) {
    let store = db.open().await;
    let s: &dyn Store = &store;
    for id in ["r1", "r2", "r3"] {
        s.insert(rec(id, "heidi")).await.unwrap();
    }
    s.mark_sent("heidi", &strings(&["r1", "r2"])).await.unwrap();
    s.record_retry("heidi", &strings(&["r1", "r2", "r3"]))
        .await
        .unwrap();
    s.record_retry("heidi", &strings(&["r1", "r1"]))
        .await
        .unwrap();
    s.record_retry("ivan", &strings(&["r1"])).await.unwrap();
    s.ack("heidi", &strings(&["r3"])).await.unwrap();
    s.record_retry("heidi", &strings(&["r3"])).await.unwrap();
    let retries = |list: &[herald_core::store::InboxRecord]| -> Vec<(String, u32)> {
        list.iter().map(|r| (r.id.clone(), r.retry_count)).collect()
    };
    let all = s.list("heidi", None, 10).await.unwrap();
    assert_eq!(
        retries(&all),
        [("r3".into(), 1), ("r2".into(), 1), ("r1".into(), 2)],
        "acked messages and other users' calls are not counted; repeats count once"
    );

    s.mark_failed("heidi", &strings(&["r1", "r3"]))
        .await
        .unwrap();
    s.mark_failed("ivan", &strings(&["r2"])).await.unwrap();
    let failed = s
        .list("heidi", Some(InboxStatus::Failed), 10)
        .await
        .unwrap();
    assert_eq!(ids(&failed), ["r1"], "an acked message stays acked");
    let und = s.undelivered("heidi", 10).await.unwrap();
    assert_eq!(
        ids(&und),
        ["r1", "r2"],
        "failed messages are still replayed"
    );
    assert_eq!(und[0].status, InboxStatus::Failed);
    assert_eq!(und[1].status, InboxStatus::Sent);
    // A failed message can still be acked.
    assert_eq!(s.ack("heidi", &strings(&["r1"])).await.unwrap(), 1);
}

async fn list_filters(db: &TestDb) {
    let store = db.open().await;
    let s: &dyn Store = &store;
    for i in 0..6 {
        s.insert(rec(&format!("l{i}"), "judy")).await.unwrap();
    }
    s.mark_sent("judy", &strings(&["l1", "l2", "l3"]))
        .await
        .unwrap();
    s.ack("judy", &strings(&["l2"])).await.unwrap();
    s.mark_failed("judy", &strings(&["l3"])).await.unwrap();
    assert_eq!(
        ids(&s.list("judy", None, 100).await.unwrap()),
        ["l5", "l4", "l3", "l2", "l1", "l0"]
    );
    assert_eq!(ids(&s.list("judy", None, 2).await.unwrap()), ["l5", "l4"]);
    assert!(s.list("judy", None, 0).await.unwrap().is_empty());
    assert_eq!(
        ids(&s
            .list("judy", Some(InboxStatus::Pending), 100)
            .await
            .unwrap()),
        ["l5", "l4", "l0"]
    );
    assert_eq!(
        ids(&s.list("judy", Some(InboxStatus::Pending), 1).await.unwrap()),
        ["l5"]
    );
    assert_eq!(
        ids(&s.list("judy", Some(InboxStatus::Sent), 100).await.unwrap()),
        ["l1"]
    );
    assert_eq!(
        ids(&s.list("judy", Some(InboxStatus::Acked), 100).await.unwrap()),
        ["l2"]
    );
    assert_eq!(
        ids(&s
            .list("judy", Some(InboxStatus::Failed), 100)
            .await
            .unwrap()),
        ["l3"]
    );
    assert!(s.list("nobody", None, 100).await.unwrap().is_empty());
}

async fn purge_by_count(db: &TestDb) {
    let store = db.open().await;
    let s: &dyn Store = &store;
    for i in 0..5 {
        s.insert(rec(&format!("k{i}"), "ken")).await.unwrap();
    }
    for i in 0..2 {
        s.insert(rec(&format!("l{i}"), "lea")).await.unwrap();
    }
    let keep3 = Retention {
        max_per_user: 3,
        max_age: 24 * HOUR,
    };
    assert_eq!(s.purge(keep3).await.unwrap(), 2, "ken's two oldest");
    assert_eq!(
        ids(&s.list("ken", None, 10).await.unwrap()),
        ["k4", "k3", "k2"]
    );
    assert_eq!(ids(&s.list("lea", None, 10).await.unwrap()), ["l1", "l0"]);
    assert_eq!(s.purge(keep3).await.unwrap(), 0, "nothing left to purge");
    assert_eq!(
        s.insert(rec("k0", "ken")).await.unwrap(),
        Inserted::New,
        "purged ids are forgotten"
    );
    let keep0 = Retention {
        max_per_user: 0,
        max_age: 24 * HOUR,
    };
    assert_eq!(s.purge(keep0).await.unwrap(), 6);
    assert!(s.list("ken", None, 10).await.unwrap().is_empty());
}

async fn purge_by_age(db: &TestDb) {
    let store = db.open().await;
    let s: &dyn Store = &store;
    s.insert(rec_aged("old1", "mia", 3 * HOUR)).await.unwrap();
    s.insert(rec_aged("old2", "nils", 2 * HOUR)).await.unwrap();
    s.insert(rec("new1", "mia")).await.unwrap();
    let one_hour = Retention {
        max_per_user: 1000,
        max_age: HOUR,
    };
    assert_eq!(s.purge(one_hour).await.unwrap(), 2);
    assert_eq!(ids(&s.list("mia", None, 10).await.unwrap()), ["new1"]);
    assert!(s.list("nils", None, 10).await.unwrap().is_empty());
    drop(store);

    // Reads apply the store's own retention before any purge: an expired message is neither
    // replayed nor listed.
    let store = db
        .open_with(Options {
            retention: one_hour,
            ..Options::default()
        })
        .await;
    let s: &dyn Store = &store;
    s.insert(rec_aged("old3", "mia", 2 * HOUR)).await.unwrap();
    assert_eq!(ids(&s.undelivered("mia", 10).await.unwrap()), ["new1"]);
    assert_eq!(ids(&s.list("mia", None, 10).await.unwrap()), ["new1"]);
}

async fn concurrent_inserts_are_batched(db: &TestDb) {
    let store = Arc::new(db.open().await);
    let before = store.write_stats();
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .insert(rec(&format!("c{i:04}"), &format!("user{}", i % 10)))
                    .await
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), Inserted::New);
    }
    let stats = store.write_stats();
    let transactions = stats.transactions - before.transactions;
    assert_eq!(stats.records - before.records, 1000);
    assert!(
        transactions < 1000,
        "1000 concurrent inserts took {transactions} transactions: not batched"
    );
    eprintln!(
        "{:?}: 1000 concurrent inserts in {transactions} transactions",
        db.kind
    );
    let mut seen = HashSet::new();
    for u in 0..10 {
        let list = store.list(&format!("user{u}"), None, 1000).await.unwrap();
        assert_eq!(list.len(), 100);
        seen.extend(list.into_iter().map(|r| r.id));
    }
    assert_eq!(seen.len(), 1000);
}

async fn migrations_are_idempotent(db: &TestDb) {
    let first = db.open().await;
    assert_eq!(first.schema_version().await.unwrap(), SCHEMA_VERSION);
    first.insert(rec("kept", "olga")).await.unwrap();
    // Two nodes starting at once on a migrated database, then two more.
    let (a, b) = tokio::join!(db.open(), db.open());
    assert_eq!(a.schema_version().await.unwrap(), SCHEMA_VERSION);
    assert_eq!(ids(&b.list("olga", None, 10).await.unwrap()), ["kept"]);
    drop((first, a, b));
    let fresh = TestDb::new(db.kind).await;
    let (a, b) = tokio::join!(fresh.open(), fresh.open());
    assert_eq!(a.schema_version().await.unwrap(), SCHEMA_VERSION);
    assert_eq!(b.insert(rec("x", "olga")).await.unwrap(), Inserted::New);
    assert_eq!(
        a.insert(rec("x", "olga")).await.unwrap(),
        Inserted::Duplicate
    );
}

async fn reconnects_after_losing_connections(db: &TestDb) {
    let store = db.open().await;
    let s: &dyn Store = &store;
    s.insert(rec("before", "pia")).await.unwrap();
    s.list("pia", None, 10).await.unwrap();
    let killed = db.kill_connections().await;
    if db.kind == Kind::Sqlite {
        assert_eq!(killed, 0);
    } else {
        assert!(killed > 0, "the store held connections");
    }
    // The pool notices dead connections and opens new ones: a call may fail, but only
    // briefly, and never hangs.
    let start = Instant::now();
    let mut failures = 0;
    for i in 0..3 {
        match s.insert(rec(&format!("after{i}"), "pia")).await {
            Ok(Inserted::New) => break,
            Ok(Inserted::Duplicate) => panic!("fresh id reported duplicate"),
            Err(e) => {
                failures += 1;
                eprintln!("after losing connections: {e}");
            }
        }
    }
    assert!(failures < 3, "the store did not recover");
    assert!(start.elapsed() < Duration::from_secs(10));
    s.ping().await.unwrap();
    assert!(ids(&s.list("pia", None, 10).await.unwrap()).contains(&"before"));
}

async fn locked_table_fails_promptly(db: &TestDb) {
    let options = Options {
        write_timeout: Duration::from_millis(800),
        acquire_timeout: Duration::from_millis(500),
        busy_timeout: Duration::from_millis(300),
        ..Options::default()
    };
    let store = db.open_with(options).await;
    let s: &dyn Store = &store;
    s.insert(rec("q0", "quinn")).await.unwrap();
    let blocker = db.block_writes().await;
    let start = Instant::now();
    let results = join_all((1..=20).map(|i| s.insert(rec(&format!("q{i}"), "quinn")))).await;
    let waited = start.elapsed();
    assert!(
        results.iter().all(|r| r.is_err()),
        "inserts behind a lock must fail, not succeed: {results:?}"
    );
    assert!(waited < Duration::from_secs(4), "callers waited {waited:?}");
    blocker.release().await;
    // Once the lock is gone the same store writes again.
    let start = Instant::now();
    loop {
        match s.insert(rec("q-after", "quinn")).await {
            Ok(r) => {
                assert_eq!(r, Inserted::New);
                break;
            }
            Err(e) if start.elapsed() < Duration::from_secs(5) => {
                eprintln!("not yet: {e}");
            }
            Err(e) => panic!("store did not recover after the lock: {e}"),
        }
    }
    let stored = ids(&s.list("quinn", None, 100).await.unwrap())
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
    assert_eq!(stored, ["q-after", "q0"], "failed inserts were not stored");
}

async fn oversized_record_fails_alone(db: &TestDb) {
    let store = Arc::new(db.open().await);
    let long = "x".repeat(129);
    let tasks: Vec<_> = ["ok1", long.as_str(), "ok2"]
        .into_iter()
        .map(|id| {
            let store = store.clone();
            let id = id.to_owned();
            tokio::spawn(async move { store.insert(rec(&id, "rita")).await })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    assert_eq!(results[0].as_ref().ok(), Some(&Inserted::New));
    let err = results[1].as_ref().expect_err("129-character id");
    assert!(err.to_string().contains("longer than 128"), "{err}");
    assert_eq!(results[2].as_ref().ok(), Some(&Inserted::New));
    let long_user = rec("ok3", &"u".repeat(256));
    assert!(
        store.insert(long_user).await.is_err(),
        "user ids up to 255 characters"
    );
}

async fn refused_record_fails_alone(db: &TestDb) {
    let store = Arc::new(db.open().await);
    // A rule of the database the store cannot check beforehand.
    db.execute(match db.kind {
        Kind::Sqlite => {
            "CREATE TRIGGER no_poison BEFORE INSERT ON messages WHEN NEW.id = 'poison' \
             BEGIN SELECT RAISE(ABORT, 'poisoned'); END"
        }
        _ => "ALTER TABLE messages ADD CONSTRAINT no_poison CHECK (id <> 'poison')",
    })
    .await;
    let before = store.write_stats();
    // Queued together, so most share a batch with the poison.
    let results = join_all((0..40).map(|i| {
        let id = if i == 20 {
            "poison".to_owned()
        } else {
            format!("fine{i}")
        };
        store.insert(rec(&id, "sven"))
    }))
    .await;
    for (i, r) in results.iter().enumerate() {
        if i == 20 {
            assert!(r.is_err(), "the refused record fails");
        } else {
            assert_eq!(r.as_ref().ok(), Some(&Inserted::New), "record {i}: {r:?}");
        }
    }
    assert_eq!(store.list("sven", None, 100).await.unwrap().len(), 39);
    let tx = store.write_stats().transactions - before.transactions;
    assert!(
        tx > 1,
        "its batch was written again one record per transaction ({tx})"
    );
    assert_eq!(
        store.insert(rec("fine0", "sven")).await.unwrap(),
        Inserted::Duplicate,
        "records written one by one are really stored"
    );
}

/// Two nodes inserting the same ids at once (a retried publish reaching both): every id is
/// new exactly once across both.
async fn two_writers_share_ids(db: &TestDb) {
    let a = Arc::new(db.open().await);
    let b = Arc::new(db.open().await);
    let mut tasks = Vec::new();
    for round in 0..5 {
        for store in [&a, &b] {
            for i in 0..100 {
                let store = store.clone();
                let id = format!("shared-{round}-{i}");
                tasks.push(tokio::spawn(async move {
                    let r = store.insert(rec(&id, "tom")).await;
                    (id, r)
                }));
            }
        }
    }
    let mut new: HashMap<String, usize> = HashMap::new();
    for t in tasks {
        let (id, r) = t.await.unwrap();
        let n = new.entry(id).or_default();
        if r.unwrap() == Inserted::New {
            *n += 1;
        }
    }
    assert_eq!(new.len(), 500);
    let wrong: Vec<_> = new.iter().filter(|(_, n)| **n != 1).collect();
    assert!(wrong.is_empty(), "ids not new exactly once: {wrong:?}");
    assert_eq!(a.list("tom", None, 1000).await.unwrap().len(), 500);
    let (sa, sb) = (a.write_stats(), b.write_stats());
    eprintln!(
        "{:?}: two writers, {} + {} transactions",
        db.kind, sa.transactions, sb.transactions
    );
}

/// The in-memory SQLite database runs the same lifecycle (one connection, shared).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_memory_lifecycle() {
    let db = TestDb::new(Kind::SqliteMemory).await;
    idempotency(&db).await;
    let db = TestDb::new(Kind::SqliteMemory).await;
    sent_and_ack(&db).await;
    let db = TestDb::new(Kind::SqliteMemory).await;
    concurrent_inserts_are_batched(&db).await;
}
