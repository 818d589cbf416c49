//! The scheduler's state and operations, free of HTTP: batches, queues, workers and leases.
//!
//! ```text
//!  upload ──▶ store (jobs) ──▶ template queue ──lease──▶ worker ──results──▶ store (results)
//!                                  ▲                         │ silent past lease_ms
//!                                  └──── attempt + 1 ────────┘ (or sandbox_error at the max)
//! ```
//!
//! What is durable: batches, jobs, results and the attempts of jobs taken back from a worker.
//! What is not: leases and workers. After a restart every job without a result is queued again,
//! and results that workers still send for jobs they held are accepted if the job has none yet:
//! a job gets exactly one result, whichever attempt produces it first.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use serde::Deserialize;
use shardbox_proto::service::{BatchState, BatchStatus, FinishedJob, ResultsAccepted};
use shardbox_proto::{parse_job_line, InvalidJob, JobResult, Status};
use tokio::sync::watch;
use tokio::time::Instant;

use super::config::ServiceConfig;
use super::queue::{Run, Taken, TemplateQueue};
use super::store::{BatchMeta, NewResult, Op, Store, StoreError, STATUS_CODES};

/// One batch in memory: its record, which lines have results, and counters.
#[derive(Debug)]
pub struct Batch {
    /// Its id.
    pub id: u64,
    inner: Mutex<BatchInner>,
    /// Results stored so far (published by the store after each commit).
    pub results: watch::Sender<u64>,
}

#[derive(Debug)]
struct BatchInner {
    meta: BatchMeta,
    /// One bit per line (bit `line`), set once the line has a result.
    done: Vec<u64>,
    /// Lines with a result.
    finished: u64,
    statuses: [u64; STATUS_CODES],
    templates: HashSet<String>,
}

impl BatchInner {
    fn is_done(&self, line: u64) -> bool {
        let word = (line / 64) as usize;
        self.done
            .get(word)
            .is_some_and(|w| w & (1 << (line % 64)) != 0)
    }

    /// Marks `line` done; false if it already was.
    fn claim(&mut self, line: u64, status: Status) -> bool {
        let word = (line / 64) as usize;
        if self.done.len() <= word {
            self.done.resize(word + 1, 0);
        }
        let bit = 1 << (line % 64);
        if self.done[word] & bit != 0 {
            return false;
        }
        self.done[word] |= bit;
        self.finished += 1;
        self.statuses[status_index(status)] += 1;
        true
    }

    fn complete(&self) -> bool {
        self.meta.closed && self.finished >= self.meta.lines
    }
}

fn status_index(status: Status) -> usize {
    Status::ALL.iter().position(|s| *s == status).unwrap_or(0)
}

/// A lease held by a worker.
#[derive(Debug, Clone, Copy)]
struct Lease {
    attempt: u32,
    template: usize,
}

/// A registered worker.
#[derive(Debug)]
pub struct WorkerEntry {
    /// Its id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Templates it serves, with its capacity for each.
    pub templates: BTreeMap<String, u32>,
    last_seen_ms: AtomicU64,
    leases: Mutex<HashMap<(u64, u64), Lease>>,
}

/// Why a lease request failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The worker id is not registered (the scheduler restarted, or the worker was dropped for
    /// silence): register again.
    #[error("unknown worker {0}: register again")]
    UnknownWorker(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a batch operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// No batch has this id.
    #[error("no batch {0}")]
    Unknown(u64),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A job handed to a worker, with its JSON as submitted.
#[derive(Debug)]
pub struct LeasedJobData {
    /// The job's place and attempt.
    pub taken: Taken,
    /// Its template.
    pub template: String,
    /// Its JSON line.
    pub json: Vec<u8>,
}

/// The scheduler.
pub struct Scheduler {
    config: ServiceConfig,
    store: Store,
    batches: RwLock<HashMap<u64, Arc<Batch>>>,
    /// Template names, by index; the index is what leases remember.
    template_names: RwLock<Vec<String>>,
    queues: RwLock<HashMap<String, (usize, Arc<TemplateQueue>)>>,
    workers: RwLock<HashMap<String, Arc<WorkerEntry>>>,
    next_batch: AtomicU64,
    next_worker: AtomicU64,
    /// Distinguishes worker ids of this process from those of an earlier one.
    boot: u64,
    epoch: Instant,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Deserialize)]
struct StatusOnly {
    status: Status,
}

impl Scheduler {
    /// Opens the store and rebuilds the state it holds: batches, results, and a queue entry
    /// for every job without a result.
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be opened or read.
    pub async fn open(config: ServiceConfig) -> Result<Arc<Scheduler>, StoreError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|err| {
            StoreError::Transaction(format!(
                "cannot create {}: {err}",
                config.data_dir.display()
            ))
        })?;
        let store = Store::open(&config.data_dir)?;
        let scheduler = Arc::new(Scheduler {
            next_batch: AtomicU64::new(store.next_batch()?),
            store,
            config,
            batches: RwLock::new(HashMap::new()),
            template_names: RwLock::new(Vec::new()),
            queues: RwLock::new(HashMap::new()),
            workers: RwLock::new(HashMap::new()),
            next_worker: AtomicU64::new(1),
            boot: unix_ms(),
            epoch: Instant::now(),
        });
        scheduler.recover().await?;
        Ok(scheduler)
    }

    /// The configuration.
    pub fn config(&self) -> &ServiceConfig {
        &self.config
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    async fn recover(self: &Arc<Self>) -> Result<(), StoreError> {
        let stored = {
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || store.load_batches())
                .await
                .map_err(|err| StoreError::Transaction(err.to_string()))??
        };
        let (mut requeued, mut batches) = (0u64, 0usize);
        for stored in stored {
            batches += 1;
            let mut meta = stored.meta;
            let mut fix = false;
            if !meta.closed {
                meta.closed = true;
                meta.truncated = true;
                fix = true;
            }
            let batch = Arc::new(Batch {
                id: stored.batch,
                inner: Mutex::new(BatchInner {
                    meta: meta.clone(),
                    done: stored.done,
                    finished: stored.results,
                    statuses: stored.statuses,
                    templates: HashSet::new(),
                }),
                results: watch::Sender::new(stored.results),
            });
            self.batches
                .write()
                .insert(stored.batch, Arc::clone(&batch));
            if fix {
                self.store
                    .write(Op::Batch {
                        batch: batch.id,
                        meta: meta.clone(),
                    })
                    .await?;
            }
            if batch.inner.lock().complete() {
                continue;
            }
            // Queue every job without a result, at the attempt it had reached, as runs of
            // consecutive lines: memory follows the number of runs, not of jobs.
            let mut runs: Vec<(u64, u64, String, u32)> = Vec::new();
            {
                let inner = batch.inner.lock();
                self.store.scan_jobs(batch.id, |line, template| {
                    if inner.is_done(line) {
                        return;
                    }
                    let attempt = stored.attempts.get(&line).map_or(1, |made| made + 1);
                    match runs.last_mut() {
                        Some((_, end, t, a)) if *end == line && t == template && *a == attempt => {
                            *end += 1;
                        }
                        _ => runs.push((line, line + 1, template.to_string(), attempt)),
                    }
                })?;
            }
            let now = Instant::now();
            for (start, end, template, attempt) in runs {
                requeued += end - start;
                self.queue_jobs(&batch, &meta, &template, start, end, attempt, now);
            }
            if meta.cancelled {
                self.cancel(batch.id).await.map_err(|err| match err {
                    BatchError::Store(err) => err,
                    BatchError::Unknown(_) => StoreError::Stopped,
                })?;
            }
        }
        tracing::info!(
            batches,
            requeued,
            "scheduler state recovered from the store"
        );
        Ok(())
    }

    fn queue_of(&self, template: &str) -> (usize, Arc<TemplateQueue>) {
        if let Some((index, queue)) = self.queues.read().get(template) {
            return (*index, Arc::clone(queue));
        }
        let mut queues = self.queues.write();
        let mut names = self.template_names.write();
        let entry = queues.entry(template.to_string()).or_insert_with(|| {
            names.push(template.to_string());
            (
                names.len() - 1,
                Arc::new(TemplateQueue::new(self.config.shards)),
            )
        });
        (entry.0, Arc::clone(&entry.1))
    }

    #[allow(clippy::too_many_arguments)]
    fn queue_jobs(
        &self,
        batch: &Batch,
        meta: &BatchMeta,
        template: &str,
        start: u64,
        end: u64,
        attempt: u32,
        since: Instant,
    ) {
        batch.inner.lock().templates.insert(template.to_string());
        let (_, queue) = self.queue_of(template);
        queue.push(
            batch.id,
            meta.priority,
            Run {
                start,
                end,
                attempt,
                since,
            },
        );
    }

    /// A batch by id.
    pub fn batch(&self, id: u64) -> Option<Arc<Batch>> {
        self.batches.read().get(&id).cloned()
    }

    /// Where a batch stands.
    ///
    /// # Errors
    /// [`BatchError::Unknown`] for an unknown id.
    pub fn status(&self, id: u64) -> Result<BatchStatus, BatchError> {
        let batch = self.batch(id).ok_or(BatchError::Unknown(id))?;
        Ok(self.status_of(&batch))
    }

    /// Every batch's status, oldest first.
    pub fn statuses(&self) -> Vec<BatchStatus> {
        let mut batches: Vec<Arc<Batch>> = self.batches.read().values().cloned().collect();
        batches.sort_by_key(|b| b.id);
        batches.iter().map(|b| self.status_of(b)).collect()
    }

    fn status_of(&self, batch: &Batch) -> BatchStatus {
        let inner = batch.inner.lock();
        let meta = &inner.meta;
        let queued: u64 = inner
            .templates
            .iter()
            .filter_map(|t| self.queues.read().get(t).map(|(_, q)| Arc::clone(q)))
            .map(|q| q.queued_of(batch.id, meta.priority))
            .sum();
        let state = if !meta.closed {
            BatchState::Receiving
        } else if inner.complete() && *batch.results.borrow() >= meta.lines {
            BatchState::Done
        } else {
            BatchState::Running
        };
        let statuses = Status::ALL
            .iter()
            .zip(inner.statuses)
            .filter(|(_, n)| *n > 0)
            .map(|(s, n)| (s.as_str().to_string(), n))
            .collect();
        BatchStatus {
            batch: batch.id,
            name: meta.name.clone(),
            priority: meta.priority,
            state,
            cancelled: meta.cancelled,
            truncated: meta.truncated,
            lines: meta.lines,
            accepted: meta.accepted,
            invalid: meta.invalid,
            results: *batch.results.borrow(),
            queued,
            leased: meta
                .lines
                .saturating_sub(inner.finished)
                .saturating_sub(queued),
            statuses,
            created_ms: meta.created_ms,
        }
    }

    /// Starts a batch: its record is on disk when this returns.
    ///
    /// # Errors
    /// [`StoreError`] if the record cannot be stored.
    pub async fn begin_batch(
        self: &Arc<Self>,
        name: String,
        priority: i32,
    ) -> Result<Upload, StoreError> {
        let id = self.next_batch.fetch_add(1, Ordering::Relaxed);
        let meta = BatchMeta {
            name,
            priority,
            created_ms: unix_ms(),
            ..BatchMeta::default()
        };
        self.store
            .write(Op::Batch {
                batch: id,
                meta: meta.clone(),
            })
            .await?;
        let batch = Arc::new(Batch {
            id,
            inner: Mutex::new(BatchInner {
                meta: meta.clone(),
                done: Vec::new(),
                finished: 0,
                statuses: [0; STATUS_CODES],
                templates: HashSet::new(),
            }),
            results: watch::Sender::new(0),
        });
        self.batches.write().insert(id, Arc::clone(&batch));
        metrics::counter!("shardbox_scheduler_batches_total").increment(1);
        Ok(Upload {
            scheduler: Arc::clone(self),
            batch,
            meta,
            jobs: Vec::new(),
            invalid: Vec::new(),
            in_flight: None,
            ids: HashSet::new(),
            hasher: std::hash::RandomState::new(),
        })
    }

    /// Registers a worker and returns its entry.
    pub fn register(&self, name: String, templates: BTreeMap<String, u32>) -> Arc<WorkerEntry> {
        let n = self.next_worker.fetch_add(1, Ordering::Relaxed);
        let id = format!("{:x}-{n}", self.boot);
        for template in templates.keys() {
            self.queue_of(template);
        }
        let entry = Arc::new(WorkerEntry {
            id: id.clone(),
            name,
            templates,
            last_seen_ms: AtomicU64::new(self.now_ms()),
            leases: Mutex::new(HashMap::new()),
        });
        tracing::info!(worker = %id, name = %entry.name, templates = ?entry.templates, "worker registered");
        let mut workers = self.workers.write();
        workers.insert(id, Arc::clone(&entry));
        metrics::gauge!("shardbox_scheduler_workers").set(workers.len() as f64);
        entry
    }

    /// The registered worker `id`, marked as seen now.
    ///
    /// # Errors
    /// [`LeaseError::UnknownWorker`] if it is not registered.
    pub fn touch(&self, id: &str) -> Result<Arc<WorkerEntry>, LeaseError> {
        let worker = self
            .workers
            .read()
            .get(id)
            .cloned()
            .ok_or_else(|| LeaseError::UnknownWorker(id.to_string()))?;
        worker.last_seen_ms.store(self.now_ms(), Ordering::Relaxed);
        Ok(worker)
    }

    /// Jobs leased to a worker.
    pub fn leased_by(&self, worker: &WorkerEntry) -> u64 {
        worker.leases.lock().len() as u64
    }

    /// Leases up to `want` jobs per template to worker `id`, waiting up to `wait` for a first
    /// one.
    ///
    /// # Errors
    /// [`LeaseError`] for an unknown worker or a store failure.
    pub async fn lease(
        &self,
        id: &str,
        want: &BTreeMap<String, u32>,
        wait: Duration,
    ) -> Result<Vec<LeasedJobData>, LeaseError> {
        let worker = self.touch(id)?;
        let queues: Vec<(String, usize, Arc<TemplateQueue>, usize)> = want
            .iter()
            .filter_map(|(t, n)| {
                // Never more than the capacity the worker registered.
                let n = (*n).min(*worker.templates.get(t)?);
                (n > 0).then_some((t, n))
            })
            .map(|(t, n)| {
                let (index, queue) = self.queue_of(t);
                (t.clone(), index, queue, n as usize)
            })
            .collect();
        let deadline = Instant::now() + wait.min(Duration::from_millis(self.config.max_wait_ms));
        let mut taken: Vec<(usize, Taken)> = Vec::new();
        loop {
            let mut waits = Vec::new();
            for (_, _, queue, _) in &queues {
                let mut notified = Box::pin(queue.queued.notified());
                notified.as_mut().enable();
                waits.push(notified);
            }
            let mut buffer = Vec::new();
            for (_, index, queue, n) in &queues {
                buffer.clear();
                queue.take(*n, &mut buffer);
                taken.extend(buffer.iter().map(|t| (*index, *t)));
            }
            // Jobs done since they were queued (a late result of an earlier attempt) are
            // dropped here rather than run twice.
            taken.retain(|(_, t)| {
                self.batch(t.batch)
                    .is_some_and(|b| !b.inner.lock().is_done(t.line))
            });
            if !taken.is_empty() || waits.is_empty() || Instant::now() >= deadline {
                break;
            }
            // Wait in slices shorter than a lease period: a worker waiting here is alive, and
            // one dropped meanwhile for silence takes nothing.
            let slice = Instant::now() + Duration::from_millis(self.config.lease_ms / 4);
            let any = futures_util::future::select_all(waits);
            let _ = tokio::time::timeout_at(deadline.min(slice), any).await;
            if !self.workers.read().contains_key(id) {
                return Err(LeaseError::UnknownWorker(id.to_string()));
            }
            worker.last_seen_ms.store(self.now_ms(), Ordering::Relaxed);
        }
        worker.last_seen_ms.store(self.now_ms(), Ordering::Relaxed);
        if taken.is_empty() {
            return Ok(Vec::new());
        }
        {
            let mut leases = worker.leases.lock();
            for (template, t) in &taken {
                leases.insert(
                    (t.batch, t.line),
                    Lease {
                        attempt: t.attempt,
                        template: *template,
                    },
                );
            }
        }
        if !self.workers.read().contains_key(id) {
            // Dropped for silence between taking and recording: put the jobs back.
            let entry = Arc::clone(&worker);
            let leases: Vec<_> = entry.leases.lock().drain().collect();
            let names = self.template_names.read().clone();
            for ((batch_id, line), lease) in leases {
                if let Some(batch) = self.batch(batch_id) {
                    let meta = batch.inner.lock().meta.clone();
                    let template = &names[lease.template];
                    let now = Instant::now();
                    self.queue_jobs(&batch, &meta, template, line, line + 1, lease.attempt, now);
                }
            }
            return Err(LeaseError::UnknownWorker(id.to_string()));
        }
        metrics::counter!("shardbox_scheduler_leased_total").increment(taken.len() as u64);
        let keys: Vec<(u64, u64)> = taken.iter().map(|(_, t)| (t.batch, t.line)).collect();
        let store = self.store.clone();
        let bodies = tokio::task::spawn_blocking(move || store.read_jobs(&keys))
            .await
            .map_err(|err| StoreError::Transaction(err.to_string()))??;
        let names = self.template_names.read().clone();
        let mut out = Vec::with_capacity(taken.len());
        for ((template, taken), body) in taken.into_iter().zip(bodies) {
            match body {
                Some(json) => out.push(LeasedJobData {
                    taken,
                    template: names[template].clone(),
                    json,
                }),
                None => {
                    tracing::error!(
                        batch = taken.batch,
                        line = taken.line,
                        "leased job missing from the store"
                    );
                    worker.leases.lock().remove(&(taken.batch, taken.line));
                }
            }
        }
        Ok(out)
    }

    /// Records results sent by worker `id` (known or not): each job's first result counts,
    /// later ones are counted as duplicates and dropped. Returns once they are on disk.
    ///
    /// # Errors
    /// [`StoreError`] if the store fails.
    pub async fn finish(
        &self,
        id: &str,
        finished: Vec<FinishedJob>,
    ) -> Result<ResultsAccepted, StoreError> {
        let worker = self.touch(id).ok();
        let mut answer = ResultsAccepted::default();
        let mut by_batch: HashMap<u64, Vec<NewResult>> = HashMap::new();
        for job in finished {
            if let Some(worker) = &worker {
                worker.leases.lock().remove(&(job.batch, job.line));
            }
            let Some(batch) = self.batch(job.batch) else {
                answer.unknown += 1;
                continue;
            };
            let raw = job.result.get();
            let status = match job.status {
                Some(status) => Ok(status),
                None => serde_json::from_str::<StatusOnly>(raw).map(|parsed| parsed.status),
            };
            let (status, json) = match status {
                Ok(status) => (status, raw.as_bytes().to_vec()),
                Err(err) => {
                    let id = self.job_id(job.batch, job.line);
                    let mut result = JobResult::without_run(
                        id.unwrap_or_else(|| format!("line-{}", job.line)),
                        Status::SandboxError,
                        format!("the worker sent an unreadable result: {err}"),
                    );
                    result.line = Some(job.line);
                    (Status::SandboxError, to_json(&result))
                }
            };
            let mut inner = batch.inner.lock();
            if job.line == 0 || job.line > inner.meta.last_line {
                answer.unknown += 1;
                continue;
            }
            if !inner.claim(job.line, status) {
                answer.duplicates += 1;
                continue;
            }
            drop(inner);
            answer.recorded += 1;
            metrics::counter!("shardbox_scheduler_results_total", "status" => status.as_str())
                .increment(1);
            by_batch.entry(job.batch).or_default().push(NewResult {
                line: job.line,
                status: status_index(status) as u8,
                json,
            });
        }
        if answer.duplicates > 0 {
            metrics::counter!("shardbox_scheduler_duplicate_results_total")
                .increment(answer.duplicates);
        }
        self.write_results(by_batch).await?;
        Ok(answer)
    }

    async fn write_results(
        &self,
        by_batch: HashMap<u64, Vec<NewResult>>,
    ) -> Result<(), StoreError> {
        let writes = by_batch.into_iter().filter_map(|(id, results)| {
            let batch = self.batch(id)?;
            Some(self.store.write(Op::Results {
                batch: id,
                results,
                published: batch.results.clone(),
            }))
        });
        for outcome in futures_util::future::join_all(writes).await {
            outcome?;
        }
        Ok(())
    }

    /// Drops worker `id`, putting its leased jobs back in the queue. With `failed`, the
    /// attempt counts: a job that reached `max_attempts` ends `sandbox_error`.
    ///
    /// # Errors
    /// [`StoreError`] if the store fails.
    pub async fn drop_worker(&self, id: &str, failed: bool) -> Result<u64, StoreError> {
        let Some(worker) = self.workers.write().remove(id) else {
            return Ok(0);
        };
        metrics::gauge!("shardbox_scheduler_workers").set(self.workers.read().len() as f64);
        let leases: Vec<((u64, u64), Lease)> = worker.leases.lock().drain().collect();
        let names = self.template_names.read().clone();
        let now = Instant::now();
        let mut attempts = Vec::new();
        let mut gave_up: HashMap<u64, Vec<NewResult>> = HashMap::new();
        let mut requeued = 0;
        for ((batch_id, line), lease) in leases {
            let Some(batch) = self.batch(batch_id) else {
                continue;
            };
            let mut inner = batch.inner.lock();
            if inner.is_done(line) {
                continue;
            }
            if failed && lease.attempt >= self.config.max_attempts {
                inner.claim(line, Status::SandboxError);
                drop(inner);
                let mut result = JobResult::without_run(
                    format!("line-{line}"),
                    Status::SandboxError,
                    format!(
                        "gave up after {} attempts: the last worker ({}) stopped answering",
                        lease.attempt, worker.name
                    ),
                );
                result.line = Some(line);
                result.attempts = lease.attempt;
                result.id = self.job_id(batch_id, line).unwrap_or(result.id);
                gave_up.entry(batch_id).or_default().push(NewResult {
                    line,
                    status: status_index(Status::SandboxError) as u8,
                    json: to_json(&result),
                });
                continue;
            }
            if inner.meta.cancelled {
                inner.claim(line, Status::Cancelled);
                drop(inner);
                let id = self
                    .job_id(batch_id, line)
                    .unwrap_or_else(|| format!("line-{line}"));
                let mut result =
                    JobResult::without_run(id, Status::Cancelled, "the batch was cancelled");
                result.line = Some(line);
                result.attempts = lease.attempt;
                gave_up.entry(batch_id).or_default().push(NewResult {
                    line,
                    status: status_index(Status::Cancelled) as u8,
                    json: to_json(&result),
                });
                continue;
            }
            let meta = inner.meta.clone();
            drop(inner);
            let attempt = if failed {
                lease.attempt + 1
            } else {
                lease.attempt
            };
            if failed {
                attempts.push((batch_id, line, lease.attempt));
            }
            self.queue_jobs(
                &batch,
                &meta,
                &names[lease.template],
                line,
                line + 1,
                attempt,
                now,
            );
            requeued += 1;
        }
        if !attempts.is_empty() {
            self.store.write(Op::Attempts { entries: attempts }).await?;
        }
        self.write_results(gave_up).await?;
        metrics::counter!("shardbox_scheduler_requeued_total").increment(requeued);
        tracing::warn!(worker = %id, name = %worker.name, requeued, failed, "worker dropped");
        Ok(requeued)
    }

    fn job_id(&self, batch: u64, line: u64) -> Option<String> {
        #[derive(Deserialize)]
        struct IdOnly {
            id: String,
        }
        let json = self.store.read_jobs(&[(batch, line)]).ok()?.pop()??;
        serde_json::from_slice::<IdOnly>(&json).ok().map(|j| j.id)
    }

    /// Drops every worker silent for longer than `lease_ms`; returns how many jobs went back
    /// to the queue.
    ///
    /// # Errors
    /// [`StoreError`] if the store fails.
    pub async fn expire(&self) -> Result<u64, StoreError> {
        let now = self.now_ms();
        let silent: Vec<String> = self
            .workers
            .read()
            .values()
            .filter(|w| {
                now.saturating_sub(w.last_seen_ms.load(Ordering::Relaxed)) > self.config.lease_ms
            })
            .map(|w| w.id.clone())
            .collect();
        let mut requeued = 0;
        for id in silent {
            requeued += self.drop_worker(&id, true).await?;
        }
        Ok(requeued)
    }

    /// Cancels a batch: its queued jobs get `cancelled` results; jobs running on workers
    /// finish and keep their results.
    ///
    /// # Errors
    /// [`BatchError`] for an unknown batch or a store failure.
    pub async fn cancel(&self, id: u64) -> Result<BatchStatus, BatchError> {
        let batch = self.batch(id).ok_or(BatchError::Unknown(id))?;
        let (meta, templates) = {
            let mut inner = batch.inner.lock();
            inner.meta.cancelled = true;
            (
                inner.meta.clone(),
                inner.templates.iter().cloned().collect::<Vec<_>>(),
            )
        };
        self.store
            .write(Op::Batch {
                batch: id,
                meta: meta.clone(),
            })
            .await?;
        let mut lines = Vec::new();
        for template in templates {
            let (_, queue) = self.queue_of(&template);
            lines.extend(queue.remove_batch(id, meta.priority));
        }
        lines.sort_unstable();
        let mut results = Vec::new();
        for chunk in lines.chunks(4096) {
            let store = self.store.clone();
            let keys: Vec<(u64, u64)> = chunk.iter().map(|l| (id, *l)).collect();
            let bodies = tokio::task::spawn_blocking(move || store.read_jobs(&keys))
                .await
                .map_err(|err| StoreError::Transaction(err.to_string()))??;
            let mut inner = batch.inner.lock();
            for (line, body) in chunk.iter().zip(bodies) {
                if !inner.claim(*line, Status::Cancelled) {
                    continue;
                }
                let job_id = body
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(String::from))
                    .unwrap_or_else(|| format!("line-{line}"));
                let mut result =
                    JobResult::without_run(job_id, Status::Cancelled, "the batch was cancelled");
                result.line = Some(*line);
                results.push(NewResult {
                    line: *line,
                    status: status_index(Status::Cancelled) as u8,
                    json: to_json(&result),
                });
            }
        }
        let mut by_batch = HashMap::new();
        by_batch.insert(id, results);
        self.write_results(by_batch).await?;
        Ok(self.status_of(&batch))
    }

    /// Jobs queued over all templates.
    pub fn queued(&self) -> u64 {
        self.queues.read().values().map(|(_, q)| q.len()).sum()
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("results serialize")
}

type BoxedWrite =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send>>;

/// A commit of an upload on its way to disk.
struct InFlight {
    writes: Vec<BoxedWrite>,
    runs: Vec<(u64, String)>,
    meta: BatchMeta,
}

/// The body of one batch being received: lines are checked, stored in group commits and
/// queued as soon as they are on disk.
pub struct Upload {
    scheduler: Arc<Scheduler>,
    batch: Arc<Batch>,
    meta: BatchMeta,
    jobs: Vec<(u64, String, Vec<u8>)>,
    invalid: Vec<NewResult>,
    /// The commit being written while the next lines are checked.
    in_flight: Option<InFlight>,
    /// 128-bit hashes of the ids seen, to refuse duplicates.
    ids: HashSet<u128>,
    hasher: std::hash::RandomState,
}

impl Upload {
    /// The batch's id.
    pub fn id(&self) -> u64 {
        self.batch.id
    }

    /// Lines stored as jobs so far (including those not yet committed).
    pub fn accepted(&self) -> u64 {
        self.meta.accepted
    }

    /// Checks one line (without its newline) and adds it to the next commit. Blank lines are
    /// skipped but counted, so line numbers are those of the body, as in `shardbox run`.
    ///
    /// # Errors
    /// [`StoreError`] if a commit made room for it fails.
    pub async fn line(&mut self, text: &[u8]) -> Result<(), StoreError> {
        self.meta.last_line += 1;
        if text.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        self.meta.lines += 1;
        let line = self.meta.last_line;
        let scheduler = Arc::clone(&self.scheduler);
        let config = &scheduler.config;
        let checked = if text.len() > config.max_line_bytes {
            Err(InvalidJob {
                line,
                id: None,
                reason: format!("line longer than {} bytes", config.max_line_bytes),
            })
        } else {
            match std::str::from_utf8(text) {
                Err(_) => Err(InvalidJob {
                    line,
                    id: None,
                    reason: "line is not UTF-8".into(),
                }),
                Ok(text) => parse_job_line(text, line),
            }
        };
        let checked = checked.and_then(|job| {
            // The id is checked first, so it counts even if the line is refused for its
            // template.
            if !self.ids.insert(self.id_key(&job.id)) {
                return Err(InvalidJob {
                    line,
                    id: Some(job.id.clone()),
                    reason: format!("duplicate job id {:?} in this batch", job.id),
                });
            }
            let template = job
                .template
                .clone()
                .unwrap_or_else(|| config.default_template.clone());
            if !config.templates.is_empty() && !config.templates.contains(&template) {
                return Err(InvalidJob {
                    line,
                    id: Some(job.id.clone()),
                    reason: format!("unknown template {template:?}"),
                });
            }
            Ok(template)
        });
        match checked {
            Ok(template) => {
                self.meta.accepted += 1;
                self.jobs.push((line, template, text.to_vec()));
            }
            Err(invalid) => {
                if let Some(id) = &invalid.id {
                    // A refused line's id is taken too: a later line reusing it is a duplicate.
                    self.ids.insert(self.id_key(id));
                }
                self.meta.invalid += 1;
                let mut result = invalid.to_result();
                result.line = Some(line);
                self.invalid.push(NewResult {
                    line,
                    status: status_index(Status::Invalid) as u8,
                    json: to_json(&result),
                });
            }
        }
        if self.jobs.len() + self.invalid.len() >= self.scheduler.config.commit_jobs {
            self.commit().await?;
        }
        Ok(())
    }

    /// Hands what was added since the last commit to the store, then waits for the previous
    /// commit and queues its jobs: checking lines overlaps with writing them.
    ///
    /// # Errors
    /// [`StoreError`] if the store fails.
    pub async fn commit(&mut self) -> Result<(), StoreError> {
        let scheduler = Arc::clone(&self.scheduler);
        let jobs = std::mem::take(&mut self.jobs);
        let invalid = std::mem::take(&mut self.invalid);
        let runs: Vec<(u64, String)> = jobs.iter().map(|(l, t, _)| (*l, t.clone())).collect();
        let stored = scheduler
            .store
            .send(Op::Jobs {
                batch: self.batch.id,
                meta: self.meta.clone(),
                jobs,
            })
            .await?;
        let mut writes: Vec<BoxedWrite> = vec![Box::pin(stored)];
        if !invalid.is_empty() {
            {
                let mut inner = self.batch.inner.lock();
                for result in &invalid {
                    inner.claim(result.line, Status::Invalid);
                }
            }
            let results = scheduler
                .store
                .send(Op::Results {
                    batch: self.batch.id,
                    results: invalid,
                    published: self.batch.results.clone(),
                })
                .await?;
            writes.push(Box::pin(results));
        }
        let previous = self.in_flight.replace(InFlight {
            writes,
            runs,
            meta: self.meta.clone(),
        });
        if let Some(previous) = previous {
            self.settle(previous).await?;
        }
        Ok(())
    }

    /// Waits for a commit, then makes its jobs visible: the batch's record and the queues.
    async fn settle(&mut self, commit: InFlight) -> Result<(), StoreError> {
        for write in commit.writes {
            write.await?;
        }
        let scheduler = Arc::clone(&self.scheduler);
        let cancelled = {
            let mut inner = self.batch.inner.lock();
            let cancelled = inner.meta.cancelled;
            inner.meta = BatchMeta {
                cancelled,
                ..commit.meta.clone()
            };
            cancelled
        };
        metrics::counter!("shardbox_scheduler_jobs_accepted_total")
            .increment(commit.runs.len() as u64);
        // Queue consecutive lines of one template as one run.
        let now = Instant::now();
        let runs = &commit.runs;
        let mut index = 0;
        while index < runs.len() {
            let (start, template) = &runs[index];
            let mut end = *start + 1;
            let mut next = index + 1;
            while next < runs.len() && runs[next].0 == end && runs[next].1 == *template {
                end += 1;
                next += 1;
            }
            scheduler.queue_jobs(&self.batch, &commit.meta, template, *start, end, 1, now);
            index = next;
        }
        if cancelled {
            scheduler
                .cancel(self.batch.id)
                .await
                .map_err(|err| match err {
                    BatchError::Store(err) => err,
                    BatchError::Unknown(_) => StoreError::Stopped,
                })?;
        }
        Ok(())
    }

    /// Stores the rest and closes the batch; `truncated` when the body ended early.
    ///
    /// # Errors
    /// [`StoreError`] if the store fails.
    pub async fn finish(mut self, truncated: bool) -> Result<u64, StoreError> {
        self.meta.closed = true;
        self.meta.truncated = truncated;
        self.commit().await?;
        if let Some(last) = self.in_flight.take() {
            self.settle(last).await?;
        }
        self.batch.results.send_modify(|_| {});
        Ok(self.batch.id)
    }

    /// A 128-bit hash of a job id: collisions between distinct ids are out of reach.
    fn id_key(&self, id: &str) -> u128 {
        let first = self.hasher.hash_one(id);
        let second = self.hasher.hash_one((id, 0x5eed_u32));
        (u128::from(first) << 64) | u128::from(second)
    }

    /// Counts so far: (lines, accepted, invalid).
    pub fn counts(&self) -> (u64, u64, u64) {
        (self.meta.lines, self.meta.accepted, self.meta.invalid)
    }
}

impl Batch {
    /// Whether the body is complete and every line's result is stored.
    pub fn complete(&self) -> bool {
        let inner = self.inner.lock();
        inner.meta.closed && *self.results.borrow() >= inner.meta.lines
    }
}
