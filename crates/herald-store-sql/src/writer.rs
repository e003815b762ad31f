//! The single writer of a store: group commit for `insert` and for status updates.
//!
//! Callers queue `(record, reply)` or `(update, reply)` and wait. Inserts and status updates
//! (`sent`, `acked`, retries, `failed`) have their own queues: each round takes every update
//! queued (so an ack never waits behind a backlog of inserts) and up to `batch_max` inserts,
//! writes the inserts in one transaction and the updates in another, and answers each caller
//! after its COMMIT: one fsync for all the acks that arrived while the previous round ran, not
//! one each (S6 in PERFORMANCE.md).
//!
//! `sent` marks are held for one round: most messages are acked within it, and a row acked in
//! the same transaction needs no `sent` write (both end in `acked`: `sent` only applies to
//! rows still `pending`), which saves a row update per delivered message.
//!
//! For inserts: a publisher is never told "stored" before the row is durable, and N
//! concurrent publishes cost one commit (one fsync) instead of N. What must stay true:
//! - every queued job is answered, or its reply dropped (the caller then sees an error);
//! - nobody waits unboundedly: each batch is bounded by `write_timeout`, each caller by its
//!   own deadline, and when the database is unreachable everything queued behind the failed
//!   batch fails at once instead of each batch waiting out its own acquire timeout;
//! - one record the database refuses fails alone: the batch is split in halves until the
//!   record is found (a few transactions, not one per record: each commit is an fsync);
//! - a deadlock or serialization failure with another writer (another node) retries the
//!   whole batch.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use herald_core::store::{InboxRecord, Inserted, StoreError};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, timeout_at};

use herald_core::message::now_ms;
use sqlx::QueryBuilder;

use crate::Options;
use crate::backend::{Failure, Pool, classify, insert_batch, with_pool};
use crate::record::to_db_ms;
use crate::store::{Backend, IDS_PER_STATEMENT, Update, WriteStats};

type Reply = oneshot::Sender<Result<Inserted, StoreError>>;

/// How long held `sent` marks wait when no other write comes to carry them.
const SENT_HOLD: Duration = Duration::from_millis(50);

struct InsertJob {
    record: InboxRecord,
    reply: Reply,
}

/// One status change for some of a user's messages (distinct ids).
struct UpdateJob {
    update: Update,
    user: String,
    ids: Vec<String>,
    reply: oneshot::Sender<Result<u64, StoreError>>,
}

#[derive(Default)]
struct Counters {
    transactions: AtomicU64,
    records: AtomicU64,
}

/// The handle callers use; the task stops when the last handle is dropped.
pub(crate) struct Writer {
    inserts: mpsc::Sender<InsertJob>,
    updates: mpsc::Sender<UpdateJob>,
    counters: Arc<Counters>,
    /// A caller's bound: waiting for room in the queue, its batch and the one before it.
    call_timeout: Duration,
    backend: Backend,
}

impl Writer {
    pub(crate) fn spawn(pool: Pool, backend: Backend, options: &Options) -> Self {
        let (inserts, insert_jobs) = mpsc::channel(options.queue_capacity.max(1));
        let (updates, update_jobs) = mpsc::channel(options.queue_capacity.max(1));
        let counters = Arc::new(Counters::default());
        let task = Task {
            pool,
            backend,
            insert_jobs,
            update_jobs,
            held_sent: Vec::new(),
            batch_max: options.batch_max.max(1),
            write_timeout: options.write_timeout,
            counters: counters.clone(),
        };
        tokio::spawn(task.run());
        Self {
            inserts,
            updates,
            counters,
            call_timeout: options.acquire_timeout + options.write_timeout * 2,
            backend,
        }
    }

    pub(crate) fn stats(&self) -> WriteStats {
        WriteStats {
            transactions: self.counters.transactions.load(Ordering::Relaxed),
            records: self.counters.records.load(Ordering::Relaxed),
        }
    }

    pub(crate) async fn insert(&self, record: InboxRecord) -> Result<Inserted, StoreError> {
        crate::record::check(&record)?;
        let (reply, answer) = oneshot::channel();
        let job = InsertJob { record, reply };
        self.call(&self.inserts, job, answer, "insert").await
    }

    /// Applies `update` to the user's messages `ids` (distinct); how many rows changed.
    pub(crate) async fn update(
        &self,
        update: Update,
        user: String,
        ids: Vec<String>,
    ) -> Result<u64, StoreError> {
        let (reply, answer) = oneshot::channel();
        let job = UpdateJob {
            update,
            user,
            ids,
            reply,
        };
        self.call(&self.updates, job, answer, "update").await
    }

    /// Queues `job` and waits for its answer, within the caller's bound.
    async fn call<J, T>(
        &self,
        queue: &mpsc::Sender<J>,
        job: J,
        answer: oneshot::Receiver<Result<T, StoreError>>,
        what: &str,
    ) -> Result<T, StoreError> {
        let stopped = || {
            StoreError::Unavailable(format!(
                "{}: the store writer has stopped",
                self.backend.name()
            ))
        };
        let wait = async {
            queue.send(job).await.map_err(|_| stopped())?;
            answer.await.map_err(|_| stopped())?
        };
        // On timeout the job may still be queued; the writer skips it if it has not started
        // writing it (its reply is closed by then). If it was already being written, it is
        // stored, and a retried publish of the same id is a duplicate: the message waits in
        // the inbox and is replayed on the next connect.
        tokio::time::timeout(self.call_timeout, wait)
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Unavailable(format!(
                    "{}: {what} not answered within {:?}",
                    self.backend.name(),
                    self.call_timeout
                )))
            })
    }
}

struct Task {
    pool: Pool,
    backend: Backend,
    insert_jobs: mpsc::Receiver<InsertJob>,
    update_jobs: mpsc::Receiver<UpdateJob>,
    /// `sent` marks taken in the previous round, written with this round's updates.
    held_sent: Vec<UpdateJob>,
    batch_max: usize,
    write_timeout: Duration,
    counters: Arc<Counters>,
}

impl Task {
    async fn run(mut self) {
        let mut inserts = Vec::with_capacity(self.batch_max);
        let mut updates = Vec::new();
        loop {
            // Wait for one job (or, with `sent` marks held, at most SENT_HOLD), then take
            // whatever else is queued: rounds grow by themselves while a commit is in flight,
            // and a lone insert is not delayed.
            let holding = !self.held_sent.is_empty();
            let open = tokio::select! {
                biased;
                n = self.update_jobs.recv_many(&mut updates, UPDATES_MAX) => n > 0,
                n = self.insert_jobs.recv_many(&mut inserts, self.batch_max) => n > 0,
                () = tokio::time::sleep(SENT_HOLD), if holding => true,
            };
            if !open {
                // Both queues close together (the handle owns both senders).
                break;
            }
            while updates.len() < UPDATES_MAX
                && let Ok(job) = self.update_jobs.try_recv()
            {
                updates.push(job);
            }
            while inserts.len() < self.batch_max
                && let Ok(job) = self.insert_jobs.try_recv()
            {
                inserts.push(job);
            }
            // A caller that gave up (timeout, cancelled request) is not written for.
            inserts.retain(|j| !j.reply.is_closed());
            updates.retain(|j| !j.reply.is_closed());
            if !inserts.is_empty() {
                self.write(&mut inserts).await;
            }
            self.write_round_updates(&mut updates).await;
        }
        let mut held = std::mem::take(&mut self.held_sent);
        if !held.is_empty() {
            self.write_updates(&mut held).await;
        }
    }

    /// This round's updates with the `sent` marks held from the last one; the new `sent`
    /// marks are held for the next round, unless nothing else is pending (then they go now).
    async fn write_round_updates(&mut self, updates: &mut Vec<UpdateJob>) {
        let mut jobs = std::mem::take(&mut self.held_sent);
        let idle = updates.iter().all(|j| j.update == Update::Sent)
            && self.update_jobs.is_empty()
            && self.insert_jobs.is_empty();
        for job in updates.drain(..) {
            if job.update == Update::Sent && !idle {
                self.held_sent.push(job);
            } else {
                jobs.push(job);
            }
        }
        if jobs.is_empty() {
            return;
        }
        skip_superseded_sent(&mut jobs);
        self.write_updates(&mut jobs).await;
    }

    /// Applies the status changes in one transaction and answers each. They cannot be
    /// refused one by one (an update of rows that are not there touches nothing), so a
    /// failure fails them all.
    async fn write_updates(&mut self, jobs: &mut Vec<UpdateJob>) {
        let deadline = Instant::now() + self.write_timeout;
        let outcome = self
            .transaction(deadline, || update_batch(&self.pool, self.backend, jobs))
            .await
            .map_err(|(_, e)| e);
        match outcome {
            Ok(touched) => {
                for (job, n) in jobs.drain(..).zip(touched) {
                    let _ = job.reply.send(Ok(n));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, updates = jobs.len(), "store status update failed");
                for job in jobs.drain(..) {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// Writes the batch and answers every job in it.
    async fn write(&mut self, batch: &mut Vec<InsertJob>) {
        // Repeated ids within the batch are written once; the first caller owns the record.
        let mut unique: Vec<InboxRecord> = Vec::with_capacity(batch.len());
        let mut first_of: HashMap<String, usize> = HashMap::with_capacity(batch.len());
        let mut replies: Vec<(Reply, usize, bool)> = Vec::with_capacity(batch.len());
        for InsertJob { record, reply } in batch.drain(..) {
            match first_of.get(&record.id) {
                Some(&i) => replies.push((reply, i, false)),
                None => {
                    let i = unique.len();
                    first_of.insert(record.id.clone(), i);
                    unique.push(record);
                    replies.push((reply, i, true));
                }
            }
        }
        let outcomes = self.store(&unique).await;
        for (reply, i, first) in replies {
            let answer = match &outcomes[i] {
                Ok(true) if first => Ok(Inserted::New),
                Ok(_) => Ok(Inserted::Duplicate),
                Err(e) => Err(e.clone()),
            };
            // The caller may have given up meanwhile; nothing to do then.
            let _ = reply.send(answer);
        }
    }

    /// Whether each record was new, or why it was not stored; one entry per record.
    async fn store(&mut self, recs: &[InboxRecord]) -> Vec<Result<bool, StoreError>> {
        let deadline = Instant::now() + self.write_timeout;
        let mut out: Vec<Option<Result<bool, StoreError>>> = vec![None; recs.len()];
        // Ranges still to write; a refused range is split and its halves pushed back, the
        // first half on top so records are written in order.
        let mut todo: Vec<Range<usize>> = Vec::with_capacity(8);
        todo.push(0..recs.len());
        let mut gone: Option<StoreError> = None;
        while let Some(range) = todo.pop() {
            if let Some(e) = &gone {
                out[range].fill(Some(Err(e.clone())));
                continue;
            }
            match self.attempt(&recs[range.clone()], deadline).await {
                Ok(flags) => {
                    for (slot, new) in out[range].iter_mut().zip(flags) {
                        *slot = Some(Ok(new));
                    }
                }
                // A record refused, or conflicts that would not settle: smaller batches.
                Err((Failure::Record | Failure::Conflict, e)) if range.len() > 1 => {
                    tracing::debug!(error = %e, records = range.len(), "store batch refused; splitting it");
                    let mid = range.start + range.len() / 2;
                    todo.push(mid..range.end);
                    todo.push(range.start..mid);
                }
                Err((Failure::Record | Failure::Conflict, e)) => {
                    tracing::warn!(error = %e, id = %recs[range.start].id, "store refused a record");
                    out[range.start] = Some(Err(e));
                }
                Err((_, e)) => {
                    tracing::warn!(error = %e, records = recs.len(), "store write failed");
                    out[range].fill(Some(Err(e.clone())));
                    gone = Some(e);
                }
            }
        }
        if let Some(e) = gone {
            self.fail_queued(&e);
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(self.timed_out())))
            .collect()
    }

    /// One transaction for `recs` (see [`Task::transaction`]), counted when committed.
    async fn attempt(
        &self,
        recs: &[InboxRecord],
        deadline: Instant,
    ) -> Result<Vec<bool>, (Failure, StoreError)> {
        let flags = self
            .transaction(deadline, || insert_batch(&self.pool, recs))
            .await?;
        self.committed(recs.len());
        Ok(flags)
    }

    /// Runs the transaction `run` makes, tried again (a few times, within the deadline) when it
    /// lost a deadlock or serialization conflict with another writer.
    async fn transaction<T, F>(
        &self,
        deadline: Instant,
        run: impl Fn() -> F,
    ) -> Result<T, (Failure, StoreError)>
    where
        F: Future<Output = Result<T, sqlx::Error>>,
    {
        const TRIES: u32 = 4;
        let mut tries = 0;
        loop {
            tries += 1;
            match timeout_at(deadline, run()).await {
                Ok(Ok(done)) => return Ok(done),
                Ok(Err(e)) => match classify(self.backend, &e) {
                    Failure::Conflict if tries < TRIES => {
                        tracing::debug!(error = %e, tries, "store transaction conflicted; again");
                        // Let the other writer finish before trying again.
                        tokio::time::sleep(Duration::from_millis(5 * u64::from(tries))).await;
                    }
                    failure => {
                        let e = StoreError::Unavailable(format!("{}: {e}", self.backend.name()));
                        return Err((failure, e));
                    }
                },
                Err(_) => return Err((Failure::Unavailable, self.timed_out())),
            }
        }
    }

    fn committed(&self, records: usize) {
        self.counters.transactions.fetch_add(1, Ordering::Relaxed);
        self.counters
            .records
            .fetch_add(records as u64, Ordering::Relaxed);
    }

    /// The database is unreachable: answer everything queued now rather than let each batch
    /// wait out its own timeout. New inserts try again.
    fn fail_queued(&mut self, error: &StoreError) {
        while let Ok(j) = self.insert_jobs.try_recv() {
            drop(j.reply.send(Err(error.clone())));
        }
        for j in std::mem::take(&mut self.held_sent) {
            drop(j.reply.send(Err(error.clone())));
        }
        while let Ok(j) = self.update_jobs.try_recv() {
            drop(j.reply.send(Err(error.clone())));
        }
    }

    fn timed_out(&self) -> StoreError {
        StoreError::Unavailable(format!(
            "{}: write not committed within {:?}",
            self.backend.name(),
            self.write_timeout
        ))
    }
}

/// Most status updates taken in one round (each is one user's ids; usually one ack).
const UPDATES_MAX: usize = 4096;

/// Drops from `sent` jobs the (user, id) pairs an `acked` job of the same transaction covers:
/// the row ends `acked` either way (`sent` only applies to `pending` rows), so the write is
/// saved. The `sent` callers are not told how many rows changed.
fn skip_superseded_sent(jobs: &mut [UpdateJob]) {
    let acked: HashSet<(&str, &str)> = jobs
        .iter()
        .filter(|j| j.update == Update::Acked)
        .flat_map(|j| j.ids.iter().map(move |id| (j.user.as_str(), id.as_str())))
        .collect();
    if acked.is_empty() {
        return;
    }
    let kept: Vec<Option<Vec<String>>> = jobs
        .iter()
        .map(|j| {
            (j.update == Update::Sent).then(|| {
                j.ids
                    .iter()
                    .filter(|id| !acked.contains(&(j.user.as_str(), id.as_str())))
                    .cloned()
                    .collect()
            })
        })
        .collect();
    for (job, ids) in jobs.iter_mut().zip(kept) {
        if let Some(ids) = ids {
            job.ids = ids;
        }
    }
}

/// Applies every job's status change in one transaction; rows touched per job. On SQLite and
/// PostgreSQL the jobs of one kind become one statement per 500 messages (`(user_id, id) IN
/// (…) RETURNING`, the returned rows credited to their jobs): a round trip per statement, not
/// per job, is what bounds the writer there. MySQL has no `RETURNING`: one statement per job.
async fn update_batch(
    pool: &Pool,
    backend: Backend,
    jobs: &[UpdateJob],
) -> Result<Vec<u64>, sqlx::Error> {
    if backend == Backend::MySql {
        return update_each(pool, jobs).await;
    }
    let now = to_db_ms(now_ms());
    let mut touched = vec![0u64; jobs.len()];
    with_pool!(pool, |p, Db| {
        let mut tx = p.begin().await?;
        // Any order of kinds gives the same end state: each applies only to rows not yet in a
        // final state for it (see `Update::sql`).
        for kind in [Update::Sent, Update::Retry, Update::Failed, Update::Acked] {
            // (user, id) → the first job asking; a repeated pair is written once and credited
            // once, as two statements in a row would have done.
            let mut owner: HashMap<(&str, &str), usize> = HashMap::new();
            let mut pairs: Vec<(&str, &str)> = Vec::new();
            for (i, job) in jobs.iter().enumerate().filter(|(_, j)| j.update == kind) {
                for id in &job.ids {
                    let key = (job.user.as_str(), id.as_str());
                    if let std::collections::hash_map::Entry::Vacant(v) = owner.entry(key) {
                        v.insert(i);
                        pairs.push(key);
                    }
                }
            }
            let (set, only) = kind.sql();
            for chunk in pairs.chunks(IDS_PER_STATEMENT) {
                let mut qb =
                    QueryBuilder::<Db>::new(format!("UPDATE messages SET {set}, updated_at = "));
                qb.push_bind(now);
                // `id IN (…)` first: the planner finds the rows by the unique index on `id`
                // (PostgreSQL scans the table for a row-value list alone); the pairs then keep
                // each update to its own user's rows.
                qb.push(format!(" WHERE {only} AND id IN ("));
                let mut list = qb.separated(", ");
                for (_, id) in chunk {
                    list.push_bind(*id);
                }
                qb.push(") AND (user_id, id) IN (");
                let mut list = qb.separated(", ");
                for (user, id) in chunk {
                    list.push("(");
                    list.push_bind_unseparated(*user);
                    list.push_unseparated(", ");
                    list.push_bind_unseparated(*id);
                    list.push_unseparated(")");
                }
                qb.push(") RETURNING user_id, id");
                let rows: Vec<(String, String)> = qb
                    .build_query_as()
                    .persistent(false)
                    .fetch_all(&mut *tx)
                    .await?;
                for (user, id) in &rows {
                    if let Some(&i) = owner.get(&(user.as_str(), id.as_str())) {
                        touched[i] += 1;
                    }
                }
            }
        }
        tx.commit().await?;
        Ok(touched)
    })
}

/// [`update_batch`] for MySQL: one statement per job, one transaction.
async fn update_each(pool: &Pool, jobs: &[UpdateJob]) -> Result<Vec<u64>, sqlx::Error> {
    let now = to_db_ms(now_ms());
    with_pool!(pool, |p, Db| {
        let mut tx = p.begin().await?;
        let mut touched = Vec::with_capacity(jobs.len());
        for job in jobs {
            let (set, only) = job.update.sql();
            let mut n = 0;
            for chunk in job.ids.chunks(IDS_PER_STATEMENT) {
                let mut qb =
                    QueryBuilder::<Db>::new(format!("UPDATE messages SET {set}, updated_at = "));
                qb.push_bind(now);
                qb.push(" WHERE user_id = ");
                qb.push_bind(job.user.as_str());
                qb.push(format!(" AND {only} AND id IN ("));
                let mut list = qb.separated(", ");
                for id in chunk {
                    list.push_bind(id.as_str());
                }
                qb.push(")");
                n += qb
                    .build()
                    .persistent(false)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            }
            touched.push(n);
        }
        tx.commit().await?;
        Ok(touched)
    })
}
