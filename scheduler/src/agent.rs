//! `shardbox worker`: the pull loop that serves a scheduler service with an [`Executor`].
//!
//! ```text
//!  register ─▶ lease loop ──LeasedJob──▶ job task per job ──FinishedJob──▶ uploader ─▶ scheduler
//!              (long poll, only for       (at most `capacity`    (batches of up to 512,
//!               free capacity)              per template)          retried until sent)
//!  heartbeat task: every `heartbeat_ms`; a 404 (or a 404 to a lease) registers again
//! ```
//!
//! A template with `capacity` n never has more than n jobs in hand: the loop asks for
//! `n - in_flight` jobs, so jobs are pulled as sandboxes free up. Results are kept in memory
//! until the scheduler has taken them (re-sending is safe: the scheduler counts duplicates
//! once); a job leased again while it is in hand (a restarted scheduler queued it again) is not
//! run twice: its first run's result ends both leases. A graceful stop ([`StopLevel::Drain`]) leases nothing more, lets the jobs in hand
//! finish, sends their results, leaves (`DELETE /v1/workers/{id}`) and shuts the executor down;
//! [`StopLevel::Abort`] also gives up the running jobs (leaving hands them back to the queue)
//! and results the scheduler cannot take.
//!
//! Two executors: [`RuntimeExecutor`] runs jobs in the real [`Worker`]'s sandboxes;
//! [`SimulatedExecutor`] runs nothing and answers `ok` after a fixed delay, for benchmarks and
//! tests of the scheduler alone.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::value::RawValue;
use shardbox_proto::service::{
    FinishedJob, LeaseRequest, LeasedJob, RegisterWorker, ResultsRequest,
};
use shardbox_proto::{parse_job_line, JobResult, Status};
use shardbox_worker::config::{Isolation, TemplateConfig};
use shardbox_worker::Worker;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::client::{ApiClient, ClientError};
use crate::stop::{Stop, StopLevel};

/// Runs leased jobs: what the pull loop needs from a worker.
pub trait Executor: Send + Sync + 'static {
    /// The name reported to the scheduler and in results.
    fn name(&self) -> &str;

    /// The templates served, each with how many of its jobs may run at once.
    fn templates(&self) -> BTreeMap<String, u32>;

    /// Runs one leased job to its result. Never fails: a job that cannot run gets an
    /// `invalid` or `sandbox_error` result.
    fn execute(&self, job: LeasedJob) -> impl Future<Output = JobResult> + Send;

    /// Releases what the executor holds (sandboxes); called once, after the last job.
    fn shutdown(&self) -> impl Future<Output = ()> + Send;
}

/// How the pull loop behaves.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Longest wait of one lease call when no job is queued (long polling).
    pub lease_wait: Duration,
    /// Results are sent at most this long after they are ready...
    pub flush_interval: Duration,
    /// ...or as soon as this many are waiting; also the most sent in one request.
    pub flush_max: usize,
    /// First wait after a failed call; doubled after each further failure.
    pub backoff_min: Duration,
    /// Longest wait between retries.
    pub backoff_max: Duration,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            lease_wait: Duration::from_secs(20),
            flush_interval: Duration::from_millis(20),
            flush_max: 512,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// What a run of the pull loop did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentReport {
    /// Times the worker registered (more than once after scheduler restarts).
    pub registrations: u64,
    /// Jobs leased.
    pub leased: u64,
    /// Results the scheduler took (including ones it counted as duplicates).
    pub sent: u64,
    /// Results given up on at an abort because the scheduler could not take them.
    pub dropped: u64,
}

/// Why the pull loop ended without being asked to.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The scheduler refused to register the worker (a wrong token, a bad template list).
    #[error("the scheduler refused to register worker {name}")]
    Register {
        /// The worker's name.
        name: String,
        /// Why.
        #[source]
        source: ClientError,
    },
    /// The scheduler refused a lease for a reason retrying cannot fix (such as a wrong token).
    /// The jobs in hand were finished and their results sent before the loop ended.
    #[error("the scheduler refused to lease jobs to worker {worker}")]
    Lease {
        /// The worker id.
        worker: String,
        /// Why.
        #[source]
        source: ClientError,
    },
}

/// The worker's registration, shared by the lease loop, the uploader and the heartbeat task.
struct Session {
    client: ApiClient,
    request: RegisterWorker,
    options: AgentOptions,
    stop: Stop,
    /// The current worker id.
    id: Mutex<String>,
    heartbeat_ms: AtomicU64,
    registrations: AtomicU64,
    /// Held while registering, so that one stale id leads to one new registration.
    registering: tokio::sync::Mutex<()>,
    /// Jobs (batch, line) running here or whose result the scheduler has not taken yet. A
    /// scheduler that restarted queues them again and may lease them back to this worker: they
    /// are not run twice.
    in_hand: Mutex<HashSet<(u64, u64)>>,
}

impl Session {
    fn id(&self) -> String {
        self.id.lock().clone()
    }

    /// Registers (again, when `stale` is still the current id), retrying while the scheduler
    /// is unreachable. Returns `Ok(false)` when a graceful stop came first.
    async fn register(&self, stale: Option<&str>) -> Result<bool, AgentError> {
        let _registering = self.registering.lock().await;
        if let Some(stale) = stale {
            if *self.id.lock() != stale {
                return Ok(true);
            }
        }
        let mut backoff = Backoff::new(&self.options);
        loop {
            let attempt = tokio::select! {
                biased;
                () = self.stop.wait_for(StopLevel::Drain) => return Ok(false),
                attempt = self.client.register(&self.request) => attempt,
            };
            match attempt {
                Ok(registered) => {
                    tracing::info!(worker = %registered.worker, name = %self.request.name,
                        lease_ms = registered.lease_ms, heartbeat_ms = registered.heartbeat_ms,
                        "registered with the scheduler");
                    self.heartbeat_ms
                        .store(registered.heartbeat_ms.max(1), Ordering::Relaxed);
                    *self.id.lock() = registered.worker;
                    self.registrations.fetch_add(1, Ordering::Relaxed);
                    return Ok(true);
                }
                Err(err) if err.is_retryable() => {
                    tracing::warn!(error = %err, "cannot register; retrying");
                    if !backoff.sleep(&self.stop, StopLevel::Drain, &err).await {
                        return Ok(false);
                    }
                }
                Err(source) => {
                    return Err(AgentError::Register {
                        name: self.request.name.clone(),
                        source,
                    })
                }
            }
        }
    }
}

/// Registers with the scheduler behind `client` and serves it with `executor` until `stop`
/// asks for a stop (or the scheduler refuses the worker), then finishes the jobs in hand,
/// sends their results, leaves and shuts the executor down.
///
/// # Errors
/// [`AgentError`] when the scheduler refuses the worker for a reason retrying cannot fix; the
/// executor is shut down all the same.
pub async fn run_agent<E: Executor>(
    client: ApiClient,
    executor: Arc<E>,
    options: AgentOptions,
    stop: Stop,
) -> Result<AgentReport, AgentError> {
    let templates = executor.templates();
    let session = Arc::new(Session {
        client,
        request: RegisterWorker {
            name: executor.name().to_owned(),
            templates: templates.clone(),
        },
        options: options.clone(),
        stop: stop.clone(),
        id: Mutex::new(String::new()),
        heartbeat_ms: AtomicU64::new(1_000),
        registrations: AtomicU64::new(0),
        registering: tokio::sync::Mutex::new(()),
        in_hand: Mutex::new(HashSet::new()),
    });
    let mut report = AgentReport::default();
    match session.register(None).await {
        Ok(true) => {}
        Ok(false) => {
            executor.shutdown().await;
            return Ok(report);
        }
        Err(err) => {
            executor.shutdown().await;
            return Err(err);
        }
    }

    let (results_tx, results_rx) = mpsc::unbounded_channel();
    let uploader = tokio::spawn(upload(Arc::clone(&session), results_rx));
    let (beat_stop, beat_stopped) = tokio::sync::oneshot::channel::<()>();
    let heartbeat = tokio::spawn(heartbeat(Arc::clone(&session), beat_stopped));

    let mut lease_loop = LeaseLoop {
        session: Arc::clone(&session),
        executor: Arc::clone(&executor),
        results: results_tx,
        capacity: templates,
        in_flight: BTreeMap::new(),
        running: HashMap::new(),
        jobs: JoinSet::new(),
        leased: 0,
    };
    let fatal = lease_loop.serve().await;
    if fatal.is_some() {
        // Whatever went wrong, the jobs in hand still finish and report.
        stop.drain();
    }
    lease_loop.finish().await;
    report.leased = lease_loop.leased;
    drop(lease_loop);

    let (sent, dropped) = uploader.await.unwrap_or_else(|err| {
        tracing::error!(error = %err, "the result uploader failed");
        (0, 0)
    });
    report.sent = sent;
    report.dropped = dropped;
    let _ = beat_stop.send(());
    let _ = heartbeat.await;
    let id = session.id();
    match session.client.leave(&id).await {
        Ok(()) => tracing::info!(worker = %id, "left the scheduler"),
        Err(err) => tracing::warn!(worker = %id, error = %err, "cannot leave the scheduler"),
    }
    executor.shutdown().await;
    report.registrations = session.registrations.load(Ordering::Relaxed);
    match fatal {
        Some(err) => Err(err),
        None => Ok(report),
    }
}

/// What a job task is running, to give it a result should the task panic.
struct Running {
    template: String,
    batch: u64,
    line: u64,
    id: String,
}

/// The lease loop and the jobs it started.
struct LeaseLoop<E: Executor> {
    session: Arc<Session>,
    executor: Arc<E>,
    results: mpsc::UnboundedSender<FinishedJob>,
    capacity: BTreeMap<String, u32>,
    in_flight: BTreeMap<String, u32>,
    running: HashMap<tokio::task::Id, Running>,
    jobs: JoinSet<()>,
    leased: u64,
}

impl<E: Executor> LeaseLoop<E> {
    /// Leases and starts jobs until a stop; returns the error that ended it otherwise.
    async fn serve(&mut self) -> Option<AgentError> {
        let session = Arc::clone(&self.session);
        let stop = &session.stop;
        let mut backoff = Backoff::new(&session.options);
        loop {
            while let Some(done) = self.jobs.try_join_next_with_id() {
                self.reap(done);
            }
            if stop.reached(StopLevel::Drain) {
                return None;
            }
            let want: BTreeMap<String, u32> = self
                .capacity
                .iter()
                .filter_map(|(template, capacity)| {
                    let busy = self.in_flight.get(template).copied().unwrap_or(0);
                    let free = capacity.saturating_sub(busy);
                    (free > 0).then(|| (template.clone(), free))
                })
                .collect();
            if want.is_empty() {
                // Every template is full: wait for a job to end (or, serving no template at
                // all, for the stop).
                if self.jobs.is_empty() {
                    stop.wait_for(StopLevel::Drain).await;
                    return None;
                }
                tokio::select! {
                    biased;
                    () = stop.wait_for(StopLevel::Drain) => return None,
                    done = self.jobs.join_next_with_id() => {
                        if let Some(done) = done {
                            self.reap(done);
                        }
                    }
                }
                continue;
            }
            let id = session.id();
            let request = LeaseRequest {
                want,
                wait_ms: millis(session.options.lease_wait),
            };
            let answer = tokio::select! {
                biased;
                () = stop.wait_for(StopLevel::Drain) => return None,
                answer = session.client.lease(&id, &request) => answer,
            };
            match answer {
                Ok(leased) => {
                    backoff.reset();
                    tracing::debug!(worker = %id, jobs = leased.jobs.len(), "leased");
                    for job in leased.jobs {
                        self.start(job);
                    }
                }
                Err(err) if err.is_not_found() => {
                    tracing::warn!(worker = %id, "the scheduler does not know this worker; \
                        registering again");
                    match session.register(Some(&id)).await {
                        Ok(true) => {}
                        Ok(false) => return None,
                        Err(err) => return Some(err),
                    }
                }
                Err(err) if err.is_retryable() || is_transient(&err) => {
                    tracing::warn!(worker = %id, error = %err, "cannot lease jobs; retrying");
                    if !backoff.sleep(stop, StopLevel::Drain, &err).await {
                        return None;
                    }
                }
                Err(source) => {
                    tracing::error!(worker = %id, error = %source, "the scheduler refused a lease");
                    return Some(AgentError::Lease { worker: id, source });
                }
            }
        }
    }

    /// Starts a task running `job`; its result goes to the uploader. A job beyond what was
    /// asked for (a scheduler's mistake) still runs: a leased job is never dropped.
    fn start(&mut self, job: LeasedJob) {
        if !self.session.in_hand.lock().insert((job.batch, job.line)) {
            // Its first run's result, on its way, also ends this lease.
            tracing::debug!(
                batch = job.batch,
                line = job.line,
                "leased again while in hand (the scheduler restarted); not running it twice"
            );
            return;
        }
        self.leased += 1;
        *self.in_flight.entry(job.template.clone()).or_default() += 1;
        let running = Running {
            template: job.template.clone(),
            batch: job.batch,
            line: job.line,
            id: job_id(&job.job, job.line),
        };
        let executor = Arc::clone(&self.executor);
        let results = self.results.clone();
        let (batch, line) = (job.batch, job.line);
        let span = tracing::debug_span!("job", batch, line, job_id = %running.id);
        let task = self.jobs.spawn(tracing::Instrument::instrument(
            async move {
                let result = executor.execute(job).await;
                let _ = results.send(finished(batch, line, &result));
            },
            span,
        ));
        self.running.insert(task.id(), running);
    }

    /// Accounts for a job task that ended; a panicked one still gets a result.
    fn reap(&mut self, done: Result<(tokio::task::Id, ()), tokio::task::JoinError>) {
        let (task, failure) = match done {
            Ok((task, ())) => (task, None),
            Err(err) => (err.id(), Some(err)),
        };
        let Some(running) = self.running.remove(&task) else {
            return;
        };
        if let Some(busy) = self.in_flight.get_mut(&running.template) {
            *busy = busy.saturating_sub(1);
        }
        if let Some(err) = failure {
            if err.is_cancelled() {
                // An abort: leaving hands the job back to the queue.
                self.session
                    .in_hand
                    .lock()
                    .remove(&(running.batch, running.line));
                return;
            }
            tracing::error!(job_id = %running.id, batch = running.batch, line = running.line,
                error = %err, "job task panicked");
            let mut result = JobResult::without_run(
                running.id,
                Status::SandboxError,
                format!("the worker failed while running the job: {err}"),
            );
            result.worker = self.executor.name().to_owned();
            result.attempts = 1;
            let _ = self
                .results
                .send(finished(running.batch, running.line, &result));
        }
    }

    /// Waits for the jobs in hand to end (or gives them up at an abort).
    async fn finish(&mut self) {
        let stop = self.session.stop.clone();
        loop {
            let done = tokio::select! {
                biased;
                () = stop.wait_for(StopLevel::Abort) => {
                    tracing::warn!(jobs = self.jobs.len(), "giving up the running jobs");
                    self.jobs.abort_all();
                    while let Some(done) = self.jobs.join_next_with_id().await {
                        self.reap(done);
                    }
                    return;
                }
                done = self.jobs.join_next_with_id() => done,
            };
            match done {
                Some(done) => self.reap(done),
                None => return,
            }
        }
    }
}

/// Whether an error status is worth retrying for the lease loop beyond the generic ones:
/// a timeout of the request or a server-side failure.
fn is_transient(err: &ClientError) -> bool {
    err.status()
        .is_some_and(|s| s.is_server_error() || s.as_u16() == 408 || s.as_u16() == 429)
}

/// A finished job as the scheduler wants it.
fn finished(batch: u64, line: u64, result: &JobResult) -> FinishedJob {
    let text = serde_json::to_string(result).expect("a result serializes");
    FinishedJob {
        batch,
        line,
        status: Some(result.status),
        result: RawValue::from_string(text).expect("a serialized result is valid JSON"),
    }
}

/// The id of a leased job, read leniently (the job may not parse); `line-N` without one.
fn job_id(job: &RawValue, line: u64) -> String {
    #[derive(serde::Deserialize)]
    struct IdOnly {
        id: String,
    }
    serde_json::from_str::<IdOnly>(job.get())
        .map(|j| j.id)
        .unwrap_or_else(|_| format!("line-{line}"))
}

/// Sends results in batches as they come, holding on to them while the scheduler cannot take
/// them. Returns how many were sent and how many were given up at an abort.
async fn upload(session: Arc<Session>, mut rx: mpsc::UnboundedReceiver<FinishedJob>) -> (u64, u64) {
    let options = &session.options;
    let mut pending: Vec<FinishedJob> = Vec::new();
    let mut open = true;
    let mut sent = 0;
    let mut backoff = Backoff::new(options);
    // Most results per request; halved when the scheduler finds a request too large.
    let mut limit = options.flush_max.max(1);
    while open || !pending.is_empty() {
        // Gather: wait for a first result, then up to `flush_interval` for more.
        if open && pending.is_empty() {
            match rx.recv().await {
                Some(job) => pending.push(job),
                None => open = false,
            }
        }
        let deadline = tokio::time::Instant::now() + options.flush_interval;
        while open && pending.len() < options.flush_max {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(job)) => pending.push(job),
                Ok(None) => open = false,
                Err(_) => break,
            }
        }
        if pending.is_empty() {
            continue;
        }
        let count = pending.len().min(limit);
        let request = ResultsRequest {
            results: pending[..count].to_vec(),
        };
        let id = session.id();
        match session.client.send_results(&id, &request).await {
            Ok(accepted) => {
                backoff.reset();
                tracing::debug!(worker = %id, sent = count, recorded = accepted.recorded,
                    duplicates = accepted.duplicates, unknown = accepted.unknown, "results sent");
                let mut in_hand = session.in_hand.lock();
                for job in pending.drain(..count) {
                    in_hand.remove(&(job.batch, job.line));
                }
                drop(in_hand);
                sent += count as u64;
            }
            Err(err)
                if err.status() == Some(reqwest::StatusCode::PAYLOAD_TOO_LARGE) && count > 1 =>
            {
                limit = count / 2;
                tracing::warn!(worker = %id, limit, "results request too large; sending fewer");
            }
            Err(err) => {
                tracing::warn!(worker = %id, results = pending.len(), error = %err,
                    "cannot send results; keeping them and retrying");
                if !backoff.sleep(&session.stop, StopLevel::Abort, &err).await {
                    // Drain what is still coming so it is counted.
                    rx.close();
                    while let Some(job) = rx.recv().await {
                        pending.push(job);
                    }
                    tracing::error!(
                        results = pending.len(),
                        "stopped before the scheduler took these results"
                    );
                    return (sent, pending.len() as u64);
                }
            }
        }
    }
    (sent, 0)
}

/// Sends a heartbeat every `heartbeat_ms` until told to stop; registers again on a 404.
async fn heartbeat(session: Arc<Session>, mut stopped: tokio::sync::oneshot::Receiver<()>) {
    loop {
        let every = Duration::from_millis(session.heartbeat_ms.load(Ordering::Relaxed));
        tokio::select! {
            _ = &mut stopped => return,
            () = tokio::time::sleep(every) => {}
        }
        let id = session.id();
        let beat = tokio::select! {
            _ = &mut stopped => return,
            beat = session.client.heartbeat(&id) => beat,
        };
        match beat {
            Ok(beat) => tracing::trace!(worker = %id, leased = beat.leased, "heartbeat"),
            Err(err) if err.is_not_found() => {
                tracing::warn!(worker = %id, "the scheduler does not know this worker; \
                    registering again");
                let register = tokio::select! {
                    _ = &mut stopped => return,
                    register = session.register(Some(&id)) => register,
                };
                if let Err(err) = register {
                    tracing::error!(error = %err, "cannot register again");
                }
            }
            Err(err) => tracing::warn!(worker = %id, error = %err, "heartbeat failed"),
        }
    }
}

/// Exponential backoff with jitter.
struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
    seed: u64,
}

impl Backoff {
    fn new(options: &AgentOptions) -> Self {
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
            | 1;
        Backoff {
            next: options.backoff_min,
            min: options.backoff_min,
            max: options.backoff_max.max(options.backoff_min),
            seed,
        }
    }

    fn reset(&mut self) {
        self.next = self.min;
    }

    /// The next wait: between half and all of the current step (or what the scheduler asked
    /// for, when it said), after which the step doubles.
    fn delay(&mut self, err: &ClientError) -> Duration {
        // xorshift64: enough randomness to keep workers from retrying in step.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        if let Some(asked) = err.retry_after() {
            return asked;
        }
        let half = step / 2;
        let spread = u64::try_from(half.as_micros()).unwrap_or(u64::MAX).max(1);
        half + Duration::from_micros(self.seed % spread)
    }

    /// Sleeps the next wait; returns false when `stop` reached `level` first.
    async fn sleep(&mut self, stop: &Stop, level: StopLevel, err: &ClientError) -> bool {
        let delay = self.delay(err);
        tokio::select! {
            biased;
            () = stop.wait_for(level) => false,
            () = tokio::time::sleep(delay) => true,
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// How many jobs of a template a real worker takes at once by default: every slot of the
/// sandboxes one trust domain may hold (process isolation), or as many as the pool keeps idle
/// (sandbox isolation), and at least one.
pub fn default_capacity(config: &TemplateConfig) -> u32 {
    let n = match config.isolation {
        Isolation::Process => config.process.slots * config.process.sandboxes_per_domain,
        Isolation::Sandbox => config.pool.max_idle,
    };
    u32::try_from(n.max(1)).unwrap_or(u32::MAX)
}

/// Runs leased jobs in the sandboxes of a real [`Worker`]. Each batch is its own trust domain,
/// so that process-isolation sandboxes serve one batch only.
#[derive(Debug)]
pub struct RuntimeExecutor {
    worker: Arc<Worker>,
    templates: BTreeMap<String, u32>,
}

impl RuntimeExecutor {
    /// An executor over `worker`, serving `templates` (template to capacity).
    pub fn new(worker: Arc<Worker>, templates: BTreeMap<String, u32>) -> Self {
        RuntimeExecutor { worker, templates }
    }

    /// The templates of `worker`, each with its [`default_capacity`].
    pub fn default_templates(worker: &Worker) -> BTreeMap<String, u32> {
        worker
            .pools()
            .iter()
            .map(|(name, pool)| (name.clone(), default_capacity(&pool.template().config)))
            .collect()
    }

    /// The result of a leased job that did not run.
    fn not_run(&self, leased: &LeasedJob, mut result: JobResult) -> JobResult {
        result.worker = self.worker.name().to_owned();
        result.attempts = leased.attempt;
        result.line = Some(leased.line);
        result.timing.queue_ms = leased.queued_ms;
        result.timing.total_ms = leased.queued_ms;
        result
    }
}

impl Executor for RuntimeExecutor {
    fn name(&self) -> &str {
        self.worker.name()
    }

    fn templates(&self) -> BTreeMap<String, u32> {
        self.templates.clone()
    }

    async fn execute(&self, leased: LeasedJob) -> JobResult {
        let taken = Instant::now();
        let mut job = match parse_job_line(leased.job.get(), leased.line) {
            Ok(job) => job,
            Err(invalid) => return self.not_run(&leased, invalid.to_result()),
        };
        // The scheduler filled in its default template; run on the one it leased for.
        job.template.get_or_insert_with(|| leased.template.clone());
        let (id, labels) = (job.id.clone(), job.labels.clone());
        let prepared = match self.worker.prepare(job) {
            Ok(prepared) => prepared,
            Err(reason) => {
                let mut result = JobResult::without_run(
                    id,
                    Status::Invalid,
                    format!("line {}: {reason}", leased.line),
                );
                result.labels = labels;
                return self.not_run(&leased, result);
            }
        };
        let domain = leased.batch.to_string();
        let mut result = match self.worker.acquire_in(&prepared.template, &domain).await {
            Ok(slot) => self.worker.run(slot, &prepared, taken).await,
            Err(err) => {
                tracing::warn!(template = %prepared.template, error = %err, "no sandbox for a job");
                let mut result = JobResult::without_run(id, Status::SandboxError, err.to_string());
                result.labels = labels;
                result
            }
        };
        result.worker = self.worker.name().to_owned();
        result.attempts = leased.attempt;
        result.line = Some(leased.line);
        result.timing.queue_ms = leased.queued_ms;
        result.timing.total_ms = leased.queued_ms.saturating_add(millis(taken.elapsed()));
        result
    }

    async fn shutdown(&self) {
        self.worker.shutdown().await;
    }
}

/// The simulated executor: runs no code at all. Every job gets an `ok` result after a fixed
/// delay, so a scheduler can be loaded and measured without sandboxes.
#[derive(Debug, Clone)]
pub struct SimulatedExecutor {
    name: String,
    templates: BTreeMap<String, u32>,
    delay: Duration,
}

impl SimulatedExecutor {
    /// A simulated executor named `name`, serving `templates` (template to capacity), whose
    /// jobs take `delay` each.
    pub fn new(name: impl Into<String>, templates: BTreeMap<String, u32>, delay: Duration) -> Self {
        SimulatedExecutor {
            name: name.into(),
            templates,
            delay,
        }
    }
}

impl Executor for SimulatedExecutor {
    fn name(&self) -> &str {
        &self.name
    }

    fn templates(&self) -> BTreeMap<String, u32> {
        self.templates.clone()
    }

    async fn execute(&self, leased: LeasedJob) -> JobResult {
        let started = Instant::now();
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        #[derive(serde::Deserialize)]
        struct Parts {
            id: String,
            #[serde(default)]
            labels: serde_json::Map<String, serde_json::Value>,
        }
        let parts = serde_json::from_str::<Parts>(leased.job.get()).ok();
        let (id, labels) = match parts {
            Some(parts) => (parts.id, parts.labels),
            None => (format!("line-{}", leased.line), serde_json::Map::new()),
        };
        let run_ms = millis(started.elapsed());
        let mut result = JobResult::without_run(id, Status::Ok, "");
        result.error = None;
        result.exit_code = Some(0);
        result.labels = labels;
        result.worker = self.name.clone();
        result.attempts = leased.attempt;
        result.line = Some(leased.line);
        result.timing.queue_ms = leased.queued_ms;
        result.timing.run_ms = run_ms;
        result.timing.total_ms = leased.queued_ms.saturating_add(run_ms);
        result
    }

    async fn shutdown(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leased(line: u64, job: &str) -> LeasedJob {
        LeasedJob {
            batch: 7,
            line,
            template: "python".into(),
            attempt: 2,
            queued_ms: 40,
            job: RawValue::from_string(job.into()).unwrap(),
        }
    }

    #[tokio::test]
    async fn the_simulated_executor_answers_ok_with_the_lease_filled_in() {
        let templates = BTreeMap::from([("python".to_owned(), 3)]);
        let sim = SimulatedExecutor::new("simulated-1", templates.clone(), Duration::ZERO);
        assert_eq!(sim.templates(), templates);
        let result = sim
            .execute(leased(5, r#"{"id":"a","code":"x","labels":{"k":1}}"#))
            .await;
        assert_eq!(result.id, "a");
        assert_eq!(result.status, Status::Ok);
        assert_eq!(result.error, None);
        assert_eq!(result.worker, "simulated-1");
        assert_eq!(result.attempts, 2);
        assert_eq!(result.line, Some(5));
        assert_eq!(result.timing.queue_ms, 40);
        assert_eq!(result.labels["k"], 1);
        let result = sim.execute(leased(6, "[]")).await;
        assert_eq!(result.id, "line-6");
    }

    #[test]
    fn backoff_doubles_with_jitter_and_honours_retry_after() {
        let options = AgentOptions {
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_millis(400),
            ..AgentOptions::default()
        };
        let mut backoff = Backoff::new(&options);
        let refused = ClientError::Url {
            url: String::new(),
            reason: String::new(),
        };
        let mut steps = Vec::new();
        for _ in 0..5 {
            steps.push(backoff.delay(&refused));
        }
        let bounds = [100, 200, 400, 400, 400];
        for (delay, max) in steps.iter().zip(bounds) {
            let max = Duration::from_millis(max);
            assert!(*delay >= max / 2 && *delay <= max, "{steps:?}");
        }
        backoff.reset();
        assert!(backoff.delay(&refused) <= Duration::from_millis(100));
    }

    #[test]
    fn job_ids_are_read_leniently() {
        let raw = RawValue::from_string(r#"{"id":"x","bogus":1}"#.into()).unwrap();
        assert_eq!(job_id(&raw, 3), "x");
        let raw = RawValue::from_string("1".into()).unwrap();
        assert_eq!(job_id(&raw, 3), "line-3");
    }
}
