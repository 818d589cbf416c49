//! The durable store: a redb database written by one thread with group commits.
//!
//! Every change goes through [`Store::write`] as an [`Op`]; the writer thread takes every op
//! waiting, applies them all in one transaction, commits it to disk, and only then answers each
//! op. Whoever waits for the answer therefore knows its data survives a crash.
//!
//! Tables (keys are `(batch, n)` pairs of big-endian integers, so a batch is one key range):
//!
//! | table | key | value |
//! |---|---|---|
//! | `meta` | name | the next batch id |
//! | `batches` | batch | [`BatchMeta`] as JSON |
//! | `jobs` | (batch, line) | template, a newline, the job's JSON line as submitted |
//! | `results` | (batch, n) | the n-th result (0-based) in completion order, as JSON |
//! | `done` | (batch, line) | `n << 8 \| status`: that line's result and its status |
//! | `attempts` | (batch, line) | attempts already made, for jobs taken back from a worker |

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const BATCHES: TableDefinition<u64, &[u8]> = TableDefinition::new("batches");
const JOBS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("jobs");
const RESULTS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("results");
const DONE: TableDefinition<(u64, u64), u64> = TableDefinition::new("done");
const ATTEMPTS: TableDefinition<(u64, u64), u32> = TableDefinition::new("attempts");

const NEXT_BATCH: &str = "next_batch";

/// Status codes stored in `done`: indexes into `Status::ALL`.
pub const STATUS_CODES: usize = shardbox_proto::Status::ALL.len();

/// Page cache of the database.
const STORE_CACHE_BYTES: usize = 64 << 20;

/// Most ops applied in one transaction.
const MAX_OPS_PER_COMMIT: usize = 256;

/// What is kept of a batch besides its jobs and results.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct BatchMeta {
    /// Name given at submission.
    pub name: String,
    /// Priority given at submission.
    pub priority: i32,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// Non-blank lines received so far.
    pub lines: u64,
    /// Number of the last line received, blank lines included in the count.
    #[serde(default)]
    pub last_line: u64,
    /// Lines stored as jobs.
    pub accepted: u64,
    /// Lines given `invalid` results.
    pub invalid: u64,
    /// Whether the body has ended (normally or not).
    pub closed: bool,
    /// Whether the body ended early.
    pub truncated: bool,
    /// Whether the batch was cancelled.
    pub cancelled: bool,
}

/// A new result: for `line` of a batch, with its status code and JSON.
#[derive(Debug, Clone)]
pub struct NewResult {
    /// The line the result is for.
    pub line: u64,
    /// [`shardbox_proto::Status`] as its index in `Status::ALL`.
    pub status: u8,
    /// The result as one line of JSON, without the newline.
    pub json: Vec<u8>,
}

/// One change to the store.
#[derive(Debug)]
pub enum Op {
    /// Creates or rewrites a batch's record.
    Batch {
        /// The batch.
        batch: u64,
        /// Its record.
        meta: BatchMeta,
    },
    /// Stores jobs (line, template, JSON) of a batch and rewrites its record.
    Jobs {
        /// The batch.
        batch: u64,
        /// Its record after these jobs.
        meta: BatchMeta,
        /// Line, template and JSON of each job.
        jobs: Vec<(u64, String, Vec<u8>)>,
    },
    /// Appends results of a batch, numbering them in order; the batch's result counter is
    /// published after the commit.
    Results {
        /// The batch.
        batch: u64,
        /// The results.
        results: Vec<NewResult>,
        /// Where the batch's count of stored results is published.
        published: watch::Sender<u64>,
    },
    /// Records attempts already made by jobs taken back from a worker.
    Attempts {
        /// (batch, line, attempts made).
        entries: Vec<(u64, u64, u32)>,
    },
}

/// Why the store failed. Any of these is fatal for the scheduler: it cannot promise durability.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be opened or created.
    #[error("cannot open the store at {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: redb::DatabaseError,
    },
    /// A transaction failed.
    #[error("store transaction failed: {0}")]
    Transaction(String),
    /// The writer thread is gone.
    #[error("the store's writer has stopped")]
    Stopped,
}

fn txn_error(err: impl std::fmt::Display) -> StoreError {
    StoreError::Transaction(err.to_string())
}

struct Request {
    op: Op,
    reply: oneshot::Sender<Result<(), StoreError>>,
}

/// The store: reads from any thread, writes through the writer thread.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    sender: crossbeam_channel::Sender<Request>,
}

/// What a batch looks like on disk at start-up.
#[derive(Debug)]
pub struct StoredBatch {
    /// Its id.
    pub batch: u64,
    /// Its record.
    pub meta: BatchMeta,
    /// One bit per line (bit `line`), set for lines with a result.
    pub done: Vec<u64>,
    /// Results by status code.
    pub statuses: [u64; STATUS_CODES],
    /// Results stored.
    pub results: u64,
    /// Attempts made by jobs taken back from a worker, by line.
    pub attempts: HashMap<u64, u32>,
}

impl Store {
    /// Opens (or creates) the store in `dir` and starts its writer thread.
    ///
    /// # Errors
    /// [`StoreError`] if the database cannot be opened or initialised.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join("shardbox.redb");
        let db = open_database(&path)?;
        let txn = db.begin_write().map_err(txn_error)?;
        {
            txn.open_table(META).map_err(txn_error)?;
            txn.open_table(BATCHES).map_err(txn_error)?;
            txn.open_table(JOBS).map_err(txn_error)?;
            txn.open_table(RESULTS).map_err(txn_error)?;
            txn.open_table(DONE).map_err(txn_error)?;
            txn.open_table(ATTEMPTS).map_err(txn_error)?;
        }
        txn.commit().map_err(txn_error)?;
        let db = Arc::new(db);
        let next_n = count_results(&db)?;
        let (sender, receiver) = crossbeam_channel::bounded::<Request>(4096);
        let writer_db = Arc::clone(&db);
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer(&writer_db, &receiver, next_n))
            .map_err(txn_error)?;
        Ok(Store { db, sender })
    }

    /// Applies `op` and waits until it is on disk.
    ///
    /// # Errors
    /// [`StoreError`] if the transaction failed or the writer stopped.
    pub async fn write(&self, op: Op) -> Result<(), StoreError> {
        self.send(op).await?.await
    }

    /// Hands `op` to the writer and returns what resolves once it is on disk, so the caller can
    /// prepare the next op meanwhile.
    ///
    /// # Errors
    /// [`StoreError::Stopped`] if the writer stopped.
    pub async fn send(
        &self,
        op: Op,
    ) -> Result<impl std::future::Future<Output = Result<(), StoreError>>, StoreError> {
        let (reply, answer) = oneshot::channel();
        let sender = self.sender.clone();
        let request = Request { op, reply };
        // The channel is bounded: a full one means the disk is the bottleneck, and the caller
        // waits (off the async threads) rather than queueing without limit.
        match sender.try_send(request) {
            Ok(()) => {}
            Err(crossbeam_channel::TrySendError::Full(request)) => {
                tokio::task::spawn_blocking(move || sender.send(request))
                    .await
                    .map_err(|_| StoreError::Stopped)?
                    .map_err(|_| StoreError::Stopped)?;
            }
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => {
                return Err(StoreError::Stopped)
            }
        }
        Ok(async move { answer.await.map_err(|_| StoreError::Stopped)? })
    }

    /// The next batch id to hand out.
    ///
    /// # Errors
    /// [`StoreError`] if the read fails.
    pub fn next_batch(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(txn_error)?;
        let table = txn.open_table(META).map_err(txn_error)?;
        let next = table.get(NEXT_BATCH).map_err(txn_error)?;
        Ok(next.map_or(1, |v| v.value()))
    }

    /// Every batch with what start-up needs to rebuild its state.
    ///
    /// # Errors
    /// [`StoreError`] if a read fails.
    pub fn load_batches(&self) -> Result<Vec<StoredBatch>, StoreError> {
        let txn = self.db.begin_read().map_err(txn_error)?;
        let batches = txn.open_table(BATCHES).map_err(txn_error)?;
        let done_table = txn.open_table(DONE).map_err(txn_error)?;
        let attempts_table = txn.open_table(ATTEMPTS).map_err(txn_error)?;
        let mut out = Vec::new();
        for entry in batches.iter().map_err(txn_error)? {
            let (key, value) = entry.map_err(txn_error)?;
            let batch = key.value();
            let meta: BatchMeta = serde_json::from_slice(value.value()).map_err(txn_error)?;
            let mut done: Vec<u64> = Vec::new();
            let mut statuses = [0; STATUS_CODES];
            let mut results = 0;
            for entry in done_table
                .range((batch, 0)..=(batch, u64::MAX))
                .map_err(txn_error)?
            {
                let (key, value) = entry.map_err(txn_error)?;
                let line = key.value().1;
                let word = (line / 64) as usize;
                if done.len() <= word {
                    done.resize(word + 1, 0);
                }
                done[word] |= 1 << (line % 64);
                let code = (value.value() & 0xff) as usize;
                statuses[code.min(STATUS_CODES - 1)] += 1;
                results += 1;
            }
            let mut attempts = HashMap::new();
            for entry in attempts_table
                .range((batch, 0)..=(batch, u64::MAX))
                .map_err(txn_error)?
            {
                let (key, value) = entry.map_err(txn_error)?;
                attempts.insert(key.value().1, value.value());
            }
            out.push(StoredBatch {
                batch,
                meta,
                done,
                statuses,
                results,
                attempts,
            });
        }
        Ok(out)
    }

    /// Calls `each(line, template)` for every stored job of `batch` in line order.
    ///
    /// # Errors
    /// [`StoreError`] if a read fails.
    pub fn scan_jobs(&self, batch: u64, mut each: impl FnMut(u64, &str)) -> Result<(), StoreError> {
        let txn = self.db.begin_read().map_err(txn_error)?;
        let jobs = txn.open_table(JOBS).map_err(txn_error)?;
        for entry in jobs
            .range((batch, 0)..=(batch, u64::MAX))
            .map_err(txn_error)?
        {
            let (key, value) = entry.map_err(txn_error)?;
            let (template, _) = split_job(value.value());
            each(key.value().1, template);
        }
        Ok(())
    }

    /// The stored JSON of each job in `keys`, in the same order; `None` for a missing one.
    ///
    /// # Errors
    /// [`StoreError`] if a read fails.
    pub fn read_jobs(&self, keys: &[(u64, u64)]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let txn = self.db.begin_read().map_err(txn_error)?;
        let jobs = txn.open_table(JOBS).map_err(txn_error)?;
        keys.iter()
            .map(|key| {
                let value = jobs.get(*key).map_err(txn_error)?;
                Ok(value.map(|v| split_job(v.value()).1.to_vec()))
            })
            .collect()
    }

    /// Results of `batch` from the `offset`-th on, at most `limit` of them, each followed by a
    /// newline.
    ///
    /// # Errors
    /// [`StoreError`] if a read fails.
    pub fn read_results(
        &self,
        batch: u64,
        offset: u64,
        limit: usize,
    ) -> Result<(Vec<u8>, u64), StoreError> {
        let txn = self.db.begin_read().map_err(txn_error)?;
        let results = txn.open_table(RESULTS).map_err(txn_error)?;
        let mut out = Vec::new();
        let mut count = 0;
        for entry in results
            .range((batch, offset)..=(batch, u64::MAX))
            .map_err(txn_error)?
            .take(limit)
        {
            let (_, value) = entry.map_err(txn_error)?;
            out.extend_from_slice(value.value());
            out.push(b'\n');
            count += 1;
        }
        Ok((out, count))
    }
}

/// Opens the database file, waiting up to five seconds for an earlier holder in this process
/// (a scheduler being stopped) to let go of it.
fn open_database(path: &Path) -> Result<Database, StoreError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        // The store is written in order and read mostly where it was just written: a modest
        // cache keeps the scheduler's memory flat however many jobs it holds.
        match Database::builder()
            .set_cache_size(STORE_CACHE_BYTES)
            .create(path)
        {
            Ok(db) => return Ok(db),
            Err(redb::DatabaseError::DatabaseAlreadyOpen)
                if std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(source) => {
                return Err(StoreError::Open {
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
}

/// Splits a stored job into its template and its JSON.
fn split_job(value: &[u8]) -> (&str, &[u8]) {
    let cut = value.iter().position(|b| *b == b'\n').unwrap_or(0);
    let template = std::str::from_utf8(&value[..cut]).unwrap_or("");
    (template, &value[(cut + 1).min(value.len())..])
}

/// Results stored per batch, which is where the writer's numbering continues.
fn count_results(db: &Database) -> Result<HashMap<u64, u64>, StoreError> {
    let txn = db.begin_read().map_err(txn_error)?;
    let batches = txn.open_table(BATCHES).map_err(txn_error)?;
    let results = txn.open_table(RESULTS).map_err(txn_error)?;
    let mut next = HashMap::new();
    for entry in batches.iter().map_err(txn_error)? {
        let (key, _) = entry.map_err(txn_error)?;
        let batch = key.value();
        let last = results
            .range((batch, 0)..=(batch, u64::MAX))
            .map_err(txn_error)?
            .next_back()
            .transpose()
            .map_err(txn_error)?;
        next.insert(batch, last.map_or(0, |(k, _)| k.value().1 + 1));
    }
    Ok(next)
}

/// The writer thread: group commits until every sender is gone.
fn writer(
    db: &Database,
    receiver: &crossbeam_channel::Receiver<Request>,
    mut next_n: HashMap<u64, u64>,
) {
    while let Ok(first) = receiver.recv() {
        let mut group = vec![first];
        while group.len() < MAX_OPS_PER_COMMIT {
            match receiver.try_recv() {
                Ok(request) => group.push(request),
                Err(_) => break,
            }
        }
        let mut published = Vec::new();
        let outcome = commit_group(db, &group, &mut next_n, &mut published);
        if let Err(err) = &outcome {
            tracing::error!(error = %err, ops = group.len(), "store commit failed");
        }
        for (sender, count) in published {
            if outcome.is_ok() {
                sender.send_replace(count);
            }
        }
        for request in group {
            let answer = match &outcome {
                Ok(()) => Ok(()),
                Err(err) => Err(StoreError::Transaction(err.to_string())),
            };
            let _ = request.reply.send(answer);
        }
        if outcome.is_err() {
            // A failed commit leaves the numbering unknown; stop taking writes so the
            // scheduler fails loudly instead of acknowledging what is not on disk.
            return;
        }
    }
}

fn commit_group(
    db: &Database,
    group: &[Request],
    next_n: &mut HashMap<u64, u64>,
    published: &mut Vec<(watch::Sender<u64>, u64)>,
) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(txn_error)?;
    let mut staged = next_n.clone();
    {
        let mut meta = txn.open_table(META).map_err(txn_error)?;
        let mut batches = txn.open_table(BATCHES).map_err(txn_error)?;
        let mut jobs = txn.open_table(JOBS).map_err(txn_error)?;
        let mut results = txn.open_table(RESULTS).map_err(txn_error)?;
        let mut done = txn.open_table(DONE).map_err(txn_error)?;
        let mut attempts = txn.open_table(ATTEMPTS).map_err(txn_error)?;
        let mut value = Vec::new();
        for request in group {
            match &request.op {
                Op::Batch {
                    batch,
                    meta: record,
                } => {
                    let json = serde_json::to_vec(record).map_err(txn_error)?;
                    batches.insert(*batch, json.as_slice()).map_err(txn_error)?;
                    let next = meta
                        .get(NEXT_BATCH)
                        .map_err(txn_error)?
                        .map_or(1, |v| v.value());
                    if *batch >= next {
                        meta.insert(NEXT_BATCH, *batch + 1).map_err(txn_error)?;
                    }
                    staged.entry(*batch).or_insert(0);
                }
                Op::Jobs {
                    batch,
                    meta: record,
                    jobs: list,
                } => {
                    for (line, template, json) in list {
                        value.clear();
                        value.extend_from_slice(template.as_bytes());
                        value.push(b'\n');
                        value.extend_from_slice(json);
                        jobs.insert((*batch, *line), value.as_slice())
                            .map_err(txn_error)?;
                    }
                    let json = serde_json::to_vec(record).map_err(txn_error)?;
                    batches.insert(*batch, json.as_slice()).map_err(txn_error)?;
                }
                Op::Results {
                    batch,
                    results: list,
                    published: sender,
                } => {
                    let n = staged.entry(*batch).or_insert(0);
                    for result in list {
                        results
                            .insert((*batch, *n), result.json.as_slice())
                            .map_err(txn_error)?;
                        done.insert((*batch, result.line), (*n << 8) | u64::from(result.status))
                            .map_err(txn_error)?;
                        *n += 1;
                    }
                    published.push((sender.clone(), *n));
                }
                Op::Attempts { entries } => {
                    for (batch, line, made) in entries {
                        attempts.insert((*batch, *line), *made).map_err(txn_error)?;
                    }
                }
            }
        }
    }
    txn.commit().map_err(txn_error)?;
    *next_n = staged;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> BatchMeta {
        BatchMeta {
            name: "t".into(),
            ..BatchMeta::default()
        }
    }

    #[tokio::test]
    async fn writes_survive_reopening_and_results_keep_their_numbering() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .write(Op::Batch {
                    batch: 7,
                    meta: meta(),
                })
                .await
                .unwrap();
            let jobs = vec![
                (1, "python".to_string(), br#"{"id":"a"}"#.to_vec()),
                (2, "exec".to_string(), br#"{"id":"b"}"#.to_vec()),
            ];
            let record = BatchMeta {
                lines: 2,
                accepted: 2,
                ..meta()
            };
            store
                .write(Op::Jobs {
                    batch: 7,
                    meta: record,
                    jobs,
                })
                .await
                .unwrap();
            let (tx, rx) = watch::channel(0);
            let results = vec![NewResult {
                line: 2,
                status: 0,
                json: b"{\"r\":2}".to_vec(),
            }];
            store
                .write(Op::Results {
                    batch: 7,
                    results,
                    published: tx,
                })
                .await
                .unwrap();
            assert_eq!(*rx.borrow(), 1);
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.next_batch().unwrap(), 8);
        let batches = store.load_batches().unwrap();
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].meta.accepted, 2);
        assert_eq!(batches[0].done, vec![1 << 2]);
        assert_eq!(batches[0].statuses[0], 1);
        assert_eq!(batches[0].results, 1);
        let mut seen = Vec::new();
        store
            .scan_jobs(7, |line, t| seen.push((line, t.to_string())))
            .unwrap();
        assert_eq!(seen, vec![(1, "python".into()), (2, "exec".into())]);
        let jobs = store.read_jobs(&[(7, 2), (7, 9)]).unwrap();
        assert_eq!(jobs, vec![Some(br#"{"id":"b"}"#.to_vec()), None]);
        let (tx, _rx) = watch::channel(0);
        let results = vec![NewResult {
            line: 1,
            status: 1,
            json: b"{\"r\":1}".to_vec(),
        }];
        store
            .write(Op::Results {
                batch: 7,
                results,
                published: tx,
            })
            .await
            .unwrap();
        let (text, count) = store.read_results(7, 0, 10).unwrap();
        assert_eq!(count, 2);
        assert_eq!(text, b"{\"r\":2}\n{\"r\":1}\n");
        assert_eq!(store.read_results(7, 1, 10).unwrap().0, b"{\"r\":1}\n");
    }
}
