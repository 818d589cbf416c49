//! One batch through one worker: read and check each line, queue jobs per template, hand them to
//! sandboxes as they become free, write each result as it comes.
//!
//! ```text
//!  batch ──reader──▶ queue per template ──dispatcher──▶ run task per job ─┐
//!             │          (bounded)         (one per template)             │
//!             └── invalid / cancelled ─────────────────────────────────▶ results ──writer──▶ out
//!                                                                        (bounded)
//! ```
//!
//! Every non-blank batch line yields exactly one result line, unless the run is aborted (a
//! second interrupt) or the results cannot be written. Bounded channels carry the backpressure
//! from the sandboxes back to the reader, so a batch of any size is read only as fast as it
//! runs.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use shardbox_proto::{parse_job_line, InvalidJob, JobResult, Status};
use tokio::io::{AsyncBufRead, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use crate::backend::Backend;
use crate::batch::{BatchLine, BatchReader, LineText, DEFAULT_MAX_LINE_BYTES};
use crate::progress::Progress;
use crate::stop::{Stop, StopLevel};
use crate::summary::Summary;

/// How a run is shaped.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Jobs waiting per template before the reader waits too.
    pub queue_capacity: usize,
    /// Results waiting for the writer before the jobs that made them wait too.
    pub result_capacity: usize,
    /// Jobs running at once, over all templates.
    pub max_running: usize,
    /// Longest batch line accepted, in bytes; longer lines get `invalid` results.
    pub max_line_bytes: usize,
    /// Progress display.
    pub progress: Progress,
    /// How the run is asked to stop.
    pub stop: Stop,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            queue_capacity: 64,
            result_capacity: 256,
            max_running: default_max_running(),
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            progress: Progress::hidden(),
            stop: Stop::new(),
        }
    }
}

/// Twice the CPUs this process may use: jobs spend part of their time waiting on the sandbox
/// boundary, so a little more than one per CPU keeps the CPUs busy without starving restores.
pub fn default_max_running() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get() * 2)
}

/// Why a run failed. Jobs failing is not a run failing: they get results.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The batch could not be read to its end.
    #[error("cannot read the batch at line {line}")]
    Read {
        /// The 1-based line being read.
        line: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A result could not be written.
    #[error("cannot write results")]
    Write {
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A task of the scheduler itself failed (a bug).
    #[error("scheduler {task} task failed: {message}")]
    Task {
        /// Which task.
        task: &'static str,
        /// Its panic message.
        message: String,
    },
}

/// Jobs put into a template's queue (label `template`); with [`QUEUE_POPPED`], the queue depth.
pub const QUEUE_PUSHED: &str = "shardbox_scheduler_queue_pushed_total";
/// Jobs taken out of a template's queue by its dispatcher (label `template`).
pub const QUEUE_POPPED: &str = "shardbox_scheduler_queue_popped_total";

/// The sending end of a template's queue.
struct Queue<B: Backend> {
    tx: mpsc::Sender<Queued<B>>,
    pushed: metrics::Counter,
}

/// A job accepted from the batch, waiting in its template's queue.
struct Queued<B: Backend> {
    prepared: B::Prepared,
    accepted: Instant,
    /// Its line in the batch, given on its result.
    line: u64,
}

/// Runs every job of the batch in `reader` on `backend`, writing one JSON result per line to
/// `writer` in completion order, and returns what happened. Does not shut the backend down.
///
/// # Errors
/// [`RunError`] when the batch cannot be read, results cannot be written, or a task of the
/// scheduler panics; results written before the failure stay written.
pub async fn run_batch<B, R, W>(
    backend: Arc<B>,
    reader: R,
    writer: W,
    options: RunOptions,
) -> Result<Summary, RunError>
where
    B: Backend,
    R: AsyncBufRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let started = Instant::now();
    options.progress.start();
    let (results_tx, results_rx) = mpsc::channel(options.result_capacity.max(1));
    let writer_task = tokio::spawn(write_results(
        writer,
        results_rx,
        options.progress.clone(),
        options.stop.clone(),
    ));
    let running = Arc::new(Semaphore::new(options.max_running.max(1)));
    let mut queues = HashMap::new();
    let mut dispatchers = Vec::new();
    for template in backend.templates() {
        let (tx, rx) = mpsc::channel(options.queue_capacity.max(1));
        let pushed = metrics::counter!(QUEUE_PUSHED, "template" => template.clone());
        queues.insert(template.clone(), Queue { tx, pushed });
        let dispatcher = Dispatcher {
            backend: Arc::clone(&backend),
            popped: metrics::counter!(QUEUE_POPPED, "template" => template.clone()),
            template,
            results: results_tx.clone(),
            running: Arc::clone(&running),
            stop: options.stop.clone(),
        };
        dispatchers.push(tokio::spawn(dispatcher.serve(rx)));
    }

    let read = read_batch(&*backend, reader, queues, results_tx, &options).await;
    let mut failure = None;
    for dispatcher in dispatchers {
        if let Err(err) = dispatcher.await {
            failure.get_or_insert(task_error("dispatcher", err));
        }
    }
    let written = writer_task.await;
    options.progress.finish();
    let mut summary = match written {
        Ok(Ok(summary)) => summary,
        Ok(Err(err)) => return Err(err),
        Err(err) => return Err(task_error("writer", err)),
    };
    read?;
    if let Some(err) = failure {
        return Err(err);
    }
    summary.wall = started.elapsed();
    Ok(summary)
}

fn task_error(task: &'static str, err: tokio::task::JoinError) -> RunError {
    let message = match err.try_into_panic() {
        Ok(panic) => panic_message(panic.as_ref()),
        Err(err) => err.to_string(),
    };
    RunError::Task { task, message }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "panic".into()
    }
}

/// Reads the batch, turning each line into a queued job or a result.
async fn read_batch<B: Backend, R: AsyncBufRead + Unpin>(
    backend: &B,
    reader: R,
    queues: HashMap<String, Queue<B>>,
    results: mpsc::Sender<JobResult>,
    options: &RunOptions,
) -> Result<(), RunError> {
    let stop = &options.stop;
    let mut lines = BatchReader::new(reader, options.max_line_bytes);
    let mut seen = HashSet::new();
    loop {
        let next = tokio::select! {
            biased;
            () = stop.wait_for(StopLevel::Abort) => {
                tracing::debug!(lines = lines.lines_read(), "stopped reading the batch");
                return Ok(());
            }
            next = lines.next_line() => next,
        };
        let line = match next {
            Ok(Some(line)) => line,
            Ok(None) => return Ok(()),
            Err(source) => {
                return Err(RunError::Read {
                    line: lines.lines_read() + 1,
                    source,
                })
            }
        };
        options.progress.add_known();
        let number = line.number;
        let result = match accept(backend, line, &mut seen, options.max_line_bytes) {
            Err(result) => *result,
            Ok(prepared) if stop.reached(StopLevel::Drain) => never_started::<B>(
                backend,
                &prepared,
                Instant::now(),
                number,
                Status::Cancelled,
            ),
            Ok(prepared) => {
                let accepted = Instant::now();
                match queues.get(B::template(&prepared)) {
                    None => {
                        let mut result = never_started::<B>(
                            backend,
                            &prepared,
                            accepted,
                            number,
                            Status::SandboxError,
                        );
                        result.error = Some(format!(
                            "template {:?} has no dispatcher",
                            B::template(&prepared)
                        ));
                        result
                    }
                    Some(queue) => match queue
                        .tx
                        .send(Queued {
                            prepared,
                            accepted,
                            line: number,
                        })
                        .await
                    {
                        Ok(()) => {
                            queue.pushed.increment(1);
                            continue;
                        }
                        Err(mpsc::error::SendError(queued)) => {
                            // Its dispatcher is gone (run_batch reports why); the job still
                            // gets its result.
                            let mut result = never_started::<B>(
                                backend,
                                &queued.prepared,
                                accepted,
                                number,
                                Status::SandboxError,
                            );
                            result.error = Some("the job's dispatcher stopped".into());
                            result
                        }
                    },
                }
            }
        };
        if results.send(result).await.is_err() {
            // The writer is gone; run_batch reports why.
            return Ok(());
        }
    }
}

/// Turns a batch line into a prepared job, or into the `invalid` result it gets instead.
fn accept<B: Backend>(
    backend: &B,
    line: BatchLine,
    seen: &mut HashSet<[u8; 16]>,
    max_line_bytes: usize,
) -> Result<B::Prepared, Box<JobResult>> {
    let number = line.number;
    let invalid = |id: Option<String>, reason: String| InvalidJob {
        line: number,
        id,
        reason,
    };
    let text = match line.text {
        LineText::Text(text) => text,
        LineText::NotUtf8 => {
            return Err(Box::new(
                invalid(None, "line is not valid UTF-8".into()).to_result(),
            ));
        }
        LineText::TooLong { bytes } => {
            let reason = format!("line is {bytes} bytes long, above the limit of {max_line_bytes}");
            return Err(Box::new(invalid(None, reason).to_result()));
        }
    };
    let job = parse_job_line(&text, number).map_err(|err| Box::new(err.to_result()))?;
    drop(text);
    // Ids are remembered by a 128-bit digest, so a batch of millions of jobs costs little
    // memory; a collision between distinct ids is not a practical concern.
    let digest: [u8; 16] = Sha256::digest(job.id.as_bytes())[..16]
        .try_into()
        .expect("a SHA-256 digest has 32 bytes");
    if !seen.insert(digest) {
        let mut result = invalid(Some(job.id), "duplicate job id".into()).to_result();
        result.labels = job.labels;
        return Err(Box::new(result));
    }
    let id = job.id.clone();
    let labels = job.labels.clone();
    backend.prepare(job).map_err(|reason| {
        let mut result = invalid(Some(id), reason).to_result();
        result.labels = labels;
        Box::new(result)
    })
}

/// The result of a job that was accepted but never ran: `cancelled` or `sandbox_error`.
fn never_started<B: Backend>(
    backend: &B,
    prepared: &B::Prepared,
    accepted: Instant,
    line: u64,
    status: Status,
) -> JobResult {
    let job = B::job(prepared);
    let error = match status {
        Status::Cancelled => "cancelled before it ran: shardbox was stopped",
        _ => "the job could not be given a sandbox",
    };
    let mut result = JobResult::without_run(job.id.clone(), status, error);
    result.labels = job.labels.clone();
    result.worker = backend.name().to_owned();
    let waited = millis(accepted.elapsed());
    result.timing.queue_ms = waited;
    result.timing.total_ms = waited;
    result.line = Some(line);
    result
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Hands the jobs of one template to sandboxes, in order.
struct Dispatcher<B: Backend> {
    backend: Arc<B>,
    template: String,
    results: mpsc::Sender<JobResult>,
    running: Arc<Semaphore>,
    stop: Stop,
    popped: metrics::Counter,
}

impl<B: Backend> Dispatcher<B> {
    async fn serve(self, mut queue: mpsc::Receiver<Queued<B>>) {
        while let Some(queued) = queue.recv().await {
            self.popped.increment(1);
            let result = match self.start(queued).await {
                Ok(()) => continue,
                Err(result) => result,
            };
            if self.results.send(result).await.is_err() {
                return;
            }
        }
    }

    /// Waits for a run slot and a sandbox, then starts the job's run task; or returns the
    /// result the job gets instead.
    async fn start(&self, queued: Queued<B>) -> Result<(), JobResult> {
        let cancelled = |queued: &Queued<B>| {
            never_started::<B>(
                &self.backend,
                &queued.prepared,
                queued.accepted,
                queued.line,
                Status::Cancelled,
            )
        };
        let permit = tokio::select! {
            biased;
            () = self.stop.wait_for(StopLevel::Drain) => None,
            permit = Arc::clone(&self.running).acquire_owned() => permit.ok(),
        };
        let Some(permit) = permit else {
            return Err(cancelled(&queued));
        };
        let sandbox = tokio::select! {
            biased;
            () = self.stop.wait_for(StopLevel::Drain) => return Err(cancelled(&queued)),
            sandbox = self.backend.acquire(&self.template) => sandbox,
        };
        let sandbox = match sandbox {
            Ok(sandbox) => sandbox,
            Err(err) => {
                tracing::warn!(template = %self.template, error = %err,
                    "no sandbox for a job");
                let mut result = never_started::<B>(
                    &self.backend,
                    &queued.prepared,
                    queued.accepted,
                    queued.line,
                    Status::SandboxError,
                );
                result.error = Some(err.to_string());
                return Err(result);
            }
        };
        let taken = Instant::now();
        if self.stop.reached(StopLevel::Drain) {
            self.backend.discard(sandbox).await;
            return Err(cancelled(&queued));
        }
        tokio::spawn(run_one(
            Arc::clone(&self.backend),
            queued,
            sandbox,
            taken,
            self.results.clone(),
            self.stop.clone(),
            permit,
        ));
        Ok(())
    }
}

/// Runs one job in its sandbox and sends its result. The run itself is a task of its own, so
/// that a panic in it still yields a result and an abort can cancel it.
async fn run_one<B: Backend>(
    backend: Arc<B>,
    queued: Queued<B>,
    sandbox: B::Sandbox,
    taken: Instant,
    results: mpsc::Sender<JobResult>,
    stop: Stop,
    permit: OwnedSemaphorePermit,
) {
    let Queued {
        prepared,
        accepted,
        line,
    } = queued;
    let id = B::job(&prepared).id.clone();
    let labels = B::job(&prepared).labels.clone();
    let span = tracing::debug_span!("job", job_id = %id, template = B::template(&prepared));
    let mut run = tokio::spawn(
        {
            let backend = Arc::clone(&backend);
            async move { backend.run(sandbox, &prepared, taken).await }
        }
        .instrument(span),
    );
    let outcome = tokio::select! {
        outcome = &mut run => outcome,
        () = stop.wait_for(StopLevel::Abort) => {
            run.abort();
            run.await
        }
    };
    drop(permit);
    let mut result = match outcome {
        Ok(result) => result,
        Err(err) => {
            let (status, error) = if err.is_cancelled() {
                (
                    Status::Cancelled,
                    "cancelled while running: shardbox was stopped".to_owned(),
                )
            } else {
                let message = task_error("run", err).to_string();
                tracing::error!(job_id = %id, error = %message, "job run panicked");
                (Status::SandboxError, message)
            };
            let mut result = JobResult::without_run(id, status, error);
            result.labels = labels;
            result.worker = backend.name().to_owned();
            result
        }
    };
    result.timing.queue_ms = millis(taken.saturating_duration_since(accepted));
    result.timing.total_ms = millis(accepted.elapsed());
    result.attempts = 1;
    result.line = Some(line);
    let _ = results.send(result).await;
}

/// Writes results as they come and counts them.
async fn write_results<W: AsyncWrite + Unpin>(
    writer: W,
    mut results: mpsc::Receiver<JobResult>,
    progress: Progress,
    stop: Stop,
) -> Result<Summary, RunError> {
    let mut out = BufWriter::with_capacity(64 << 10, writer);
    let mut summary = Summary::new();
    let mut line = Vec::new();
    let fail = |source| {
        // Nothing more can be recorded: stop everything now.
        stop.abort();
        RunError::Write { source }
    };
    while let Some(result) = results.recv().await {
        line.clear();
        serde_json::to_writer(&mut line, &result).expect("a result serializes");
        line.push(b'\n');
        out.write_all(&line).await.map_err(fail)?;
        summary.record(&result);
        progress.add_done(&summary);
        // Flush whenever nothing else is waiting, so that the file can be followed live.
        if results.is_empty() {
            out.flush().await.map_err(fail)?;
        }
    }
    out.shutdown().await.map_err(fail)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use shardbox_proto::Job;
    use shardbox_worker::pool::PoolError;

    use super::*;

    /// A backend whose `python` jobs print their code after `delay_ms` of their `timeout_ms`,
    /// whose `broken` template never has a sandbox and whose `stuck` template waits forever.
    #[derive(Default)]
    struct Fake {
        running: AtomicUsize,
        most_running: AtomicUsize,
        discarded: AtomicUsize,
        order: Mutex<Vec<String>>,
    }

    impl Backend for Fake {
        type Sandbox = u32;
        type Prepared = (Job, String);

        fn name(&self) -> &str {
            "fake"
        }

        fn templates(&self) -> Vec<String> {
            ["python", "broken", "stuck"].map(String::from).to_vec()
        }

        fn prepare(&self, job: Job) -> Result<(Job, String), String> {
            let template = job.template.clone().unwrap_or_else(|| "python".into());
            if !self.templates().contains(&template) {
                return Err(format!("unknown template {template:?}"));
            }
            if job.code.is_none() {
                return Err("give code".into());
            }
            Ok((job, template))
        }

        fn job(prepared: &(Job, String)) -> &Job {
            &prepared.0
        }

        fn template(prepared: &(Job, String)) -> &str {
            &prepared.1
        }

        async fn acquire(&self, template: &str) -> Result<u32, PoolError> {
            match template {
                "broken" => Err(PoolError::Broken {
                    template: template.into(),
                    last_error: "no rootfs".into(),
                }),
                "stuck" => std::future::pending().await,
                _ => Ok(7),
            }
        }

        async fn run(&self, sandbox: u32, prepared: &(Job, String), _taken: Instant) -> JobResult {
            assert_eq!(sandbox, 7);
            let job = &prepared.0;
            self.order.lock().unwrap().push(job.id.clone());
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_running.fetch_max(now, Ordering::SeqCst);
            let delay = job.timeout_ms.unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(delay)).await;
            self.running.fetch_sub(1, Ordering::SeqCst);
            let code = job.code.clone().unwrap_or_default();
            if code == "panic" {
                panic!("fake run panicked");
            }
            let mut result = JobResult::without_run(job.id.clone(), Status::Ok, "");
            result.error = None;
            result.stdout = code;
            result.exit_code = Some(0);
            result.timing.start_us = 100;
            result.labels = job.labels.clone();
            result.worker = "fake".into();
            result
        }

        async fn discard(&self, _sandbox: u32) {
            self.discarded.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn job(id: &str, extra: serde_json::Value) -> String {
        let mut value = serde_json::json!({"id": id, "code": format!("print({id:?})")});
        if let (Some(map), Some(extra)) = (value.as_object_mut(), extra.as_object()) {
            map.extend(extra.clone());
        }
        value.to_string()
    }

    async fn run(
        backend: Arc<Fake>,
        batch: Vec<u8>,
        options: RunOptions,
    ) -> (Result<Summary, RunError>, Vec<JobResult>) {
        let (writer, mut read_back) = tokio::io::duplex(1 << 20);
        let collect = tokio::spawn(async move {
            let mut text = String::new();
            tokio::io::AsyncReadExt::read_to_string(&mut read_back, &mut text)
                .await
                .unwrap();
            text
        });
        let reader = tokio::io::BufReader::new(std::io::Cursor::new(batch));
        let summary = run_batch(backend, reader, writer, options).await;
        let text = collect.await.unwrap();
        let results = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        (summary, results)
    }

    fn by_id(results: &[JobResult]) -> BTreeMap<String, JobResult> {
        results.iter().map(|r| (r.id.clone(), r.clone())).collect()
    }

    #[tokio::test]
    async fn every_line_gets_one_result() {
        let mut batch = String::new();
        batch += &job("a", serde_json::json!({"labels": {"problem": "p/0"}}));
        batch += "\n\n";
        batch += "{not json\n";
        batch += &job("b", serde_json::json!({"template": "nope"}));
        batch += "\n";
        batch += &job("a", serde_json::json!({}));
        batch += "\n";
        batch += r#"{"id":"argv","argv":["ls"]}"#;
        batch += "\n   \n";
        batch += &job("gone", serde_json::json!({"template": "broken"}));
        batch += "\n";
        let mut bytes = batch.into_bytes();
        bytes.extend_from_slice(b"\xff{\"id\":\"x\"}\n");
        bytes.extend_from_slice(job("last", serde_json::json!({})).as_bytes());

        let (summary, results) = run(Arc::new(Fake::default()), bytes, RunOptions::default()).await;
        let summary = summary.unwrap();
        assert_eq!(results.len(), 8, "{results:#?}");
        assert_eq!(summary.total(), 8);
        let invalid: Vec<(Option<u64>, &str)> = results
            .iter()
            .filter(|r| r.status == Status::Invalid)
            .map(|r| (r.line, r.id.as_str()))
            .collect();
        let mut invalid = invalid;
        invalid.sort();
        assert_eq!(
            invalid,
            vec![
                (Some(3), "line-3"),
                (Some(4), "b"),
                (Some(5), "a"),
                (Some(6), "argv"),
                (Some(9), "line-9")
            ]
        );
        for r in results.iter().filter(|r| r.status == Status::Invalid) {
            let error = r.error.as_deref().unwrap();
            let line = r.line.unwrap();
            assert!(error.starts_with(&format!("line {line}: ")), "{error}");
        }
        let dup = results.iter().find(|r| r.line == Some(5)).unwrap();
        assert_eq!(dup.error.as_deref(), Some("line 5: duplicate job id"));
        let not_utf8 = results.iter().find(|r| r.line == Some(9)).unwrap();
        assert!(not_utf8.error.as_deref().unwrap().contains("UTF-8"));

        let ok = results
            .iter()
            .find(|r| r.id == "a" && r.status == Status::Ok)
            .unwrap();
        assert_eq!(ok.stdout, "print(\"a\")");
        assert_eq!(ok.attempts, 1);
        assert_eq!(ok.line, Some(1), "every result names its line");
        assert_eq!(ok.labels["problem"], "p/0");
        assert!(ok.timing.total_ms >= ok.timing.queue_ms);

        let gone = by_id(&results)["gone"].clone();
        assert_eq!(gone.status, Status::SandboxError);
        assert!(gone.error.unwrap().contains("no rootfs"));
        assert_eq!(by_id(&results)["last"].status, Status::Ok);
        assert_eq!(summary.pass_at_1(), Some((1, 1)));
        assert_eq!(summary.ran(), 2);
    }

    #[tokio::test]
    async fn jobs_of_a_template_start_in_batch_order_within_the_running_limit() {
        let batch: String = (0..40)
            .map(|i| job(&format!("j{i:02}"), serde_json::json!({"timeout_ms": 5})) + "\n")
            .collect();
        let fake = Arc::new(Fake::default());
        let options = RunOptions {
            max_running: 3,
            queue_capacity: 2,
            result_capacity: 1,
            ..RunOptions::default()
        };
        let (summary, results) = run(Arc::clone(&fake), batch.into_bytes(), options).await;
        assert_eq!(summary.unwrap().count(Status::Ok), 40);
        assert_eq!(results.len(), 40);
        let order = fake.order.lock().unwrap().clone();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(order, sorted);
        assert!(fake.most_running.load(Ordering::SeqCst) <= 3);
        assert!(fake.most_running.load(Ordering::SeqCst) >= 2);
    }

    #[tokio::test]
    async fn a_panicking_run_still_gets_a_result() {
        let batch =
            r#"{"id":"p","code":"panic"}"#.to_string() + "\n" + &job("q", serde_json::json!({}));
        let (summary, results) = run(
            Arc::new(Fake::default()),
            batch.into_bytes(),
            RunOptions::default(),
        )
        .await;
        assert!(summary.is_ok());
        let results = by_id(&results);
        assert_eq!(results["p"].status, Status::SandboxError);
        assert!(results["p"]
            .error
            .as_deref()
            .unwrap()
            .contains("fake run panicked"));
        assert_eq!(results["q"].status, Status::Ok);
    }

    /// A reader that hands out numbered job lines forever and counts them.
    struct Endless {
        served: Arc<AtomicUsize>,
        pending: Vec<u8>,
    }

    impl tokio::io::AsyncRead for Endless {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            if self.pending.is_empty() {
                let n = self.served.fetch_add(1, Ordering::SeqCst);
                let template = serde_json::json!({"template": "stuck"});
                self.pending = (job(&format!("e{n}"), template) + "\n").into_bytes();
            }
            let n = self.pending.len().min(buf.remaining());
            buf.put_slice(&self.pending[..n]);
            self.pending.drain(..n);
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn the_reader_waits_for_the_queue_and_stops_on_abort() {
        let served = Arc::new(AtomicUsize::new(0));
        let reader = tokio::io::BufReader::with_capacity(
            64,
            Endless {
                served: Arc::clone(&served),
                pending: Vec::new(),
            },
        );
        let stop = Stop::new();
        let options = RunOptions {
            queue_capacity: 4,
            stop: stop.clone(),
            ..RunOptions::default()
        };
        let (writer, mut read_back) = tokio::io::duplex(1 << 20);
        let task = tokio::spawn(run_batch(
            Arc::new(Fake::default()),
            reader,
            writer,
            options,
        ));
        tokio::time::sleep(Duration::from_millis(200)).await;
        // One job waits for a sandbox, four sit in the queue, one waits to be queued.
        let read = served.load(Ordering::SeqCst);
        assert!(read <= 8, "the reader ran ahead: {read} lines");
        stop.drain();
        stop.abort();
        let summary = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the run ends after an abort")
            .unwrap()
            .unwrap();
        let mut text = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut read_back, &mut text)
            .await
            .unwrap();
        assert_eq!(summary.total(), summary.count(Status::Cancelled));
        assert!(summary.total() >= 5, "{summary}");
        assert_eq!(text.lines().count() as u64, summary.total());
    }

    #[tokio::test]
    async fn drain_cancels_waiting_jobs_and_lets_running_ones_finish() {
        let mut batch = job("slow", serde_json::json!({"timeout_ms": 300})) + "\n";
        for i in 0..5 {
            batch += &(job(&format!("w{i}"), serde_json::json!({"template": "stuck"})) + "\n");
        }
        for i in 0..5 {
            batch += &(job(&format!("q{i}"), serde_json::json!({"timeout_ms": 300})) + "\n");
        }
        let stop = Stop::new();
        let options = RunOptions {
            max_running: 1,
            stop: stop.clone(),
            ..RunOptions::default()
        };
        let fake = Arc::new(Fake::default());
        let trigger = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            stop.drain();
        });
        let (summary, results) = run(fake, batch.into_bytes(), options).await;
        trigger.await.unwrap();
        let summary = summary.unwrap();
        assert_eq!(results.len(), 11);
        let results = by_id(&results);
        assert_eq!(results["slow"].status, Status::Ok);
        for (id, r) in &results {
            if id != "slow" {
                assert_eq!(r.status, Status::Cancelled, "{r:?}");
                assert_eq!(r.attempts, 0);
            }
        }
        assert_eq!(summary.count(Status::Cancelled), 10);
    }

    #[tokio::test]
    async fn abort_cancels_running_jobs() {
        let batch = job("long", serde_json::json!({"timeout_ms": 60_000})) + "\n";
        let stop = Stop::new();
        let options = RunOptions {
            stop: stop.clone(),
            ..RunOptions::default()
        };
        let trigger = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            stop.drain();
            tokio::time::sleep(Duration::from_millis(100)).await;
            stop.abort();
        });
        let (summary, results) = run(Arc::new(Fake::default()), batch.into_bytes(), options).await;
        trigger.await.unwrap();
        assert_eq!(summary.unwrap().count(Status::Cancelled), 1);
        assert_eq!(results[0].status, Status::Cancelled);
        assert_eq!(results[0].attempts, 1);
        assert!(results[0]
            .error
            .as_deref()
            .unwrap()
            .contains("while running"));
    }

    /// A writer that fails every write.
    struct Broken;

    impl AsyncWrite for Broken {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            _buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::task::Poll::Ready(Err(std::io::Error::other("disk full")))
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Err(std::io::Error::other("disk full")))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            self.poll_flush(cx)
        }
    }

    #[tokio::test]
    async fn a_write_failure_fails_the_run() {
        let batch: String = (0..10)
            .map(|i| job(&format!("j{i}"), serde_json::json!({})) + "\n")
            .collect();
        let reader = tokio::io::BufReader::new(std::io::Cursor::new(batch.into_bytes()));
        let err = run_batch(
            Arc::new(Fake::default()),
            reader,
            Broken,
            RunOptions::default(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, RunError::Write { .. }), "{err:?}");
        assert_eq!(err.to_string(), "cannot write results");
    }
}
