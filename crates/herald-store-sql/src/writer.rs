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
//! - one record the database refuses fails alone: the batch is split in halves until the
//!   record is found (a few transactions, not one per record: each commit is an fsync);
//! - a deadlock or serialization failure with another writer (another node) retries the
//!   whole batch.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use herald_core::store::{InboxRecord, Inserted, StoreError};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, timeout_at};

use crate::Options;
use crate::backend::{Failure, Pool, classify, insert_batch};
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
        let stopped = || {
            StoreError::Unavailable(format!(
                "{}: the store writer has stopped",
                self.backend.name()
            ))
        };
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

    /// One transaction for `recs`, tried again (a few times, within the deadline) when it lost
    /// a deadlock or serialization conflict with another writer.
    async fn attempt(
        &self,
        recs: &[InboxRecord],
        deadline: Instant,
    ) -> Result<Vec<bool>, (Failure, StoreError)> {
        const TRIES: u32 = 4;
        let mut tries = 0;
        loop {
            tries += 1;
            match timeout_at(deadline, insert_batch(&self.pool, recs)).await {
                Ok(Ok(flags)) => {
                    self.committed(recs.len());
                    return Ok(flags);
                }
                Ok(Err(e)) => match classify(self.backend, &e) {
                    Failure::Conflict if tries < TRIES => {
                        tracing::debug!(error = %e, tries, "store batch conflicted; again");
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
        while let Ok(job) = self.jobs.try_recv() {
            let _ = job.reply.send(Err(error.clone()));
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
