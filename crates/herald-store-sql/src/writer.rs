//! The single writer of a store: group commit for `insert`.
//!
//! Callers queue `(record, reply)` and wait. The writer task takes everything queued (up to
//! `batch_max`), writes it in one transaction and answers each caller only after COMMIT, so a
//! publisher is never told "stored" before the row is durable, and N concurrent publishes
//! cost one commit (one fsync) instead of N. What must stay true:
//! - every queued job is answered, or its reply dropped (the caller then sees an error);
//! - nobody waits unboundedly: each batch is bounded by `write_timeout`, each caller by its
//!   own deadline, and when the database is unreachable everything queued behind the failed
//!   batch fails at once instead of each batch waiting out its own acquire timeout;
//! - one record the database refuses fails alone: the batch is retried one record per
//!   transaction.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use herald_core::store::{InboxRecord, Inserted, StoreError};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, timeout_at};

use crate::Options;
use crate::backend::{Pool, WriteError, insert_batch};
use crate::store::{Backend, WriteStats};

type Reply = oneshot::Sender<Result<Inserted, StoreError>>;

struct Job {
    record: InboxRecord,
    reply: Reply,
}

#[derive(Default)]
struct Counters {
    transactions: AtomicU64,
    records: AtomicU64,
}

/// The handle callers use; the task stops when the last handle is dropped.
pub(crate) struct Writer {
    queue: mpsc::Sender<Job>,
    counters: Arc<Counters>,
    /// A caller's bound: waiting for room in the queue, its batch and the one before it.
    call_timeout: Duration,
    backend: Backend,
}

impl Writer {
    pub(crate) fn spawn(pool: Pool, backend: Backend, options: &Options) -> Self {
        let (queue, jobs) = mpsc::channel(options.queue_capacity.max(1));
        let counters = Arc::new(Counters::default());
        let task = Task {
            pool,
            backend,
            jobs,
            batch_max: options.batch_max.max(1),
            write_timeout: options.write_timeout,
            counters: counters.clone(),
        };
        tokio::spawn(task.run());
        Self {
            queue,
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
        let stopped =
            || StoreError::Unavailable(format!("{}: the store writer has stopped", self.backend.name()));
        let (reply, answer) = oneshot::channel();
        let wait = async {
            self.queue
                .send(Job { record, reply })
                .await
                .map_err(|_| stopped())?;
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
                    "{}: insert not answered within {:?}",
                    self.backend.name(),
                    self.call_timeout
                )))
            })
    }
}

struct Task {
    pool: Pool,
    backend: Backend,
    jobs: mpsc::Receiver<Job>,
    batch_max: usize,
    write_timeout: Duration,
    counters: Arc<Counters>,
}

impl Task {
    async fn run(mut self) {
        let mut batch = Vec::with_capacity(self.batch_max);
        // `recv_many` waits for one job, then takes whatever else is queued: batches grow by
        // themselves while a commit is in flight, and a lone insert is not delayed.
        while self.jobs.recv_many(&mut batch, self.batch_max).await > 0 {
            // A caller that gave up (timeout, cancelled request) is not written for.
            batch.retain(|job| !job.reply.is_closed());
            if !batch.is_empty() {
                self.write(&mut batch).await;
            }
            batch.clear();
        }
    }

    /// Writes the batch and answers every job in it.
    async fn write(&mut self, batch: &mut Vec<Job>) {
        // Repeated ids within the batch are written once; the first caller owns the record.
        let mut unique: Vec<InboxRecord> = Vec::with_capacity(batch.len());
        let mut first_of: HashMap<String, usize> = HashMap::with_capacity(batch.len());
        let mut replies: Vec<(Reply, usize, bool)> = Vec::with_capacity(batch.len());
        for Job { record, reply } in batch.drain(..) {
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
        let error = match timeout_at(deadline, insert_batch(&self.pool, recs)).await {
            Ok(Ok(flags)) => {
                self.committed(recs.len());
                return flags.into_iter().map(Ok).collect();
            }
            Ok(Err(e)) if e.is_per_record() && recs.len() > 1 => {
                tracing::debug!(error = %e, records = recs.len(), "store batch refused; writing one by one");
                return self.store_one_by_one(recs, deadline).await;
            }
            Ok(Err(e)) => {
                let per_record = e.is_per_record();
                let error = self.unavailable(&e);
                if per_record {
                    return vec![Err(error)];
                }
                error
            }
            Err(_) => self.timed_out(),
        };
        tracing::warn!(error = %error, records = recs.len(), "store write failed");
        self.fail_queued(&error);
        vec![Err(error); recs.len()]
    }

    /// One transaction per record, within the batch's deadline; stops at the first sign
    /// that the database is unreachable.
    async fn store_one_by_one(
        &mut self,
        recs: &[InboxRecord],
        deadline: Instant,
    ) -> Vec<Result<bool, StoreError>> {
        let mut out = Vec::with_capacity(recs.len());
        let mut gone: Option<StoreError> = None;
        for rec in recs {
            if let Some(e) = &gone {
                out.push(Err(e.clone()));
                continue;
            }
            match timeout_at(deadline, insert_batch(&self.pool, std::slice::from_ref(rec))).await {
                Ok(Ok(flags)) => {
                    self.committed(1);
                    out.push(Ok(flags.first().copied().unwrap_or(false)));
                }
                Ok(Err(e)) if e.is_per_record() => {
                    tracing::warn!(error = %e, id = %rec.id, "store refused a record");
                    out.push(Err(self.unavailable(&e)));
                }
                Ok(Err(e)) => {
                    let e = self.unavailable(&e);
                    gone = Some(e.clone());
                    out.push(Err(e));
                }
                Err(_) => {
                    let e = self.timed_out();
                    gone = Some(e.clone());
                    out.push(Err(e));
                }
            }
        }
        if let Some(e) = gone {
            tracing::warn!(error = %e, "store write failed");
            self.fail_queued(&e);
        }
        out
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
        while let Ok(job) = self.jobs.try_recv() {
            let _ = job.reply.send(Err(error.clone()));
        }
    }

    fn unavailable(&self, e: &WriteError) -> StoreError {
        StoreError::Unavailable(format!("{}: {e}", self.backend.name()))
    }

    fn timed_out(&self) -> StoreError {
        StoreError::Unavailable(format!(
            "{}: write not committed within {:?}",
            self.backend.name(),
            self.write_timeout
        ))
    }
}
