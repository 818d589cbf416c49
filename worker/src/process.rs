//! Process isolation: many jobs in one warm sandbox, each a process of its own.
//!
//! A sandbox of a `process` template runs the entry script as a supervisor (see
//! `worker/entry/entry.py`). The worker binds each such sandbox to one trust domain (one batch,
//! or one tenant) when it first takes it from the pool, sends it `job <seq> <n>` frames and reads
//! back `done <seq> <n>` reports of what the supervisor observed. A sandbox runs up to `slots`
//! jobs at once and is recycled after `jobs_per_sandbox` jobs, after any job that ran out of
//! memory, and as soon as its supervisor stops answering; jobs in flight on a sandbox that dies
//! end `sandbox_error`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{ChildStdin, ChildStdout};
use tokio::sync::oneshot;

use crate::config::ProcessConfig;
use crate::pool::{Pool, PoolError};
use crate::sandbox::{Sandbox, Shell};

/// Why a supervised sandbox is closed when the worker stops: no loss, logged at debug level.
const SHUTTING_DOWN: &str = "worker shutting down";

/// What the supervisor reports of one job.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Report {
    /// Set when the job could not be started at all.
    pub error: Option<String>,
    /// Exit status, when the job exited.
    pub exit_code: Option<i32>,
    /// Signal that ended it, when one did.
    pub signal: Option<i32>,
    /// Whether its deadline struck.
    pub timed_out: bool,
    /// Whether it was ended for starting more processes than its limit.
    pub too_many_processes: bool,
    /// Whether it ran out of memory under its limit.
    pub memory_exhausted: bool,
    /// Kept stdout, base64.
    pub stdout: String,
    /// Kept stderr, base64.
    pub stderr: String,
    /// Bytes written to stdout in all.
    pub stdout_bytes: u64,
    /// Bytes written to stderr in all.
    pub stderr_bytes: u64,
    /// Microseconds from start to end.
    pub run_us: u64,
    /// CPU microseconds of the job's process.
    pub cpu_us: u64,
}

/// Why a job on a supervised sandbox got no report.
#[derive(Debug, thiserror::Error)]
pub enum SupervisedError {
    /// The supervisor stopped answering, or its sandbox died.
    #[error("sandbox {sandbox} stopped answering: {why}")]
    Lost {
        /// The sandbox.
        sandbox: String,
        /// What was seen.
        why: String,
    },
}

/// One warm sandbox serving jobs of one trust domain.
#[derive(Debug)]
pub struct Supervised {
    id: String,
    writer: tokio::sync::Mutex<ChildStdin>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Report>>>,
    next_seq: AtomicU64,
    active: AtomicUsize,
    served: AtomicUsize,
    retiring: AtomicBool,
    dead: AtomicBool,
    shell: Mutex<Option<Shell>>,
    config: ProcessConfig,
}

impl Supervised {
    fn new(sandbox: Sandbox, config: ProcessConfig) -> Arc<Supervised> {
        let id = sandbox.id().to_owned();
        let (shell, stdin, stdout, mut stderr) = sandbox.into_parts();
        let supervised = Arc::new(Supervised {
            id,
            writer: tokio::sync::Mutex::new(stdin),
            pending: Mutex::new(HashMap::new()),
            next_seq: AtomicU64::new(1),
            active: AtomicUsize::new(0),
            served: AtomicUsize::new(0),
            retiring: AtomicBool::new(false),
            dead: AtomicBool::new(false),
            shell: Mutex::new(Some(shell)),
            config,
        });
        tokio::spawn(Arc::clone(&supervised).read_reports(stdout));
        let id = supervised.id.clone();
        tokio::spawn(async move {
            // The supervisor's own stderr: nothing is expected there; keep it from blocking.
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = stderr.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                tracing::debug!(sandbox_id = %id, text = %String::from_utf8_lossy(&buf[..n]),
                    "supervisor stderr");
            }
        });
        supervised
    }

    /// The sandbox id.
    pub fn id(&self) -> &str {
        &self.id
    }

    async fn read_reports(self: Arc<Self>, mut stdout: BufReader<ChildStdout>) {
        let why = loop {
            let mut header = String::new();
            match (&mut stdout).take(256).read_line(&mut header).await {
                Ok(0) => break "its output closed".to_owned(),
                Err(err) => break format!("unreadable output: {err}"),
                Ok(_) => {}
            }
            let parts: Vec<&str> = header.split_whitespace().collect();
            let (seq, len) = match parts.as_slice() {
                ["done", seq, len] => match (seq.parse::<u64>(), len.parse::<usize>()) {
                    (Ok(seq), Ok(len)) => (seq, len),
                    _ => break format!("bad report header {header:?}"),
                },
                _ => break format!("bad report header {header:?}"),
            };
            let mut body = vec![0u8; len];
            if let Err(err) = stdout.read_exact(&mut body).await {
                break format!("report cut short: {err}");
            }
            let report = match serde_json::from_slice::<Report>(&body) {
                Ok(report) => report,
                Err(err) => break format!("bad report: {err}"),
            };
            if let Some(tx) = self.pending.lock().remove(&seq) {
                let _ = tx.send(report);
            }
        };
        self.fail(&why);
    }

    /// Marks the sandbox dead: every job waiting on it gets no report.
    fn fail(&self, why: &str) {
        if !self.dead.swap(true, Ordering::SeqCst) {
            if why == SHUTTING_DOWN {
                tracing::debug!(sandbox_id = %self.id, why, "supervised sandbox closed");
            } else {
                tracing::warn!(sandbox_id = %self.id, why, "supervised sandbox lost");
            }
        }
        self.pending.lock().clear();
    }

    fn usable(&self) -> bool {
        !self.dead.load(Ordering::SeqCst) && !self.retiring.load(Ordering::SeqCst)
    }

    /// Sends one job and waits for its report, at most `patience`.
    ///
    /// # Errors
    /// [`SupervisedError::Lost`] when the supervisor does not report in time or its sandbox
    /// dies; the sandbox is then recycled.
    pub async fn run(
        &self,
        envelope: &[u8],
        patience: Duration,
    ) -> Result<(Report, Instant), SupervisedError> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().insert(seq, tx);
        let mut frame = format!("job {seq} {}\n", envelope.len()).into_bytes();
        frame.extend_from_slice(envelope);
        let lost = |why: String| SupervisedError::Lost {
            sandbox: self.id.clone(),
            why,
        };
        {
            let mut writer = self.writer.lock().await;
            if let Err(err) = writer.write_all(&frame).await {
                self.fail("cannot write to the supervisor");
                return Err(lost(format!("cannot write the job: {err}")));
            }
        }
        let handed = Instant::now();
        match tokio::time::timeout(patience, rx).await {
            Ok(Ok(report)) => Ok((report, handed)),
            Ok(Err(_)) => Err(lost("the sandbox died".into())),
            Err(_) => {
                self.fail("no report by the deadline");
                Err(lost(format!(
                    "no report within {} ms",
                    patience.as_millis()
                )))
            }
        }
    }

    async fn teardown(&self) {
        let shell = self.shell.lock().take();
        if let Some(shell) = shell {
            shell.teardown().await;
        }
    }
}

/// A claim on one slot of a supervised sandbox, for one job.
#[derive(Debug)]
pub struct ProcessSlot {
    sandbox: Arc<Supervised>,
    domains: Arc<Domains>,
}

impl ProcessSlot {
    /// The sandbox the slot belongs to.
    pub fn sandbox(&self) -> &Arc<Supervised> {
        &self.sandbox
    }

    /// Gives the slot back after a job; `recycle` retires the sandbox (memory exhausted).
    pub async fn release(self, recycle: bool) {
        let sandbox = Arc::clone(&self.sandbox);
        let served = sandbox.served.fetch_add(1, Ordering::SeqCst) + 1;
        if recycle || served >= sandbox.config.jobs_per_sandbox {
            sandbox.retiring.store(true, Ordering::SeqCst);
        }
        let left = sandbox.active.fetch_sub(1, Ordering::SeqCst) - 1;
        if left == 0 && !sandbox.usable() {
            self.domains.remove(&sandbox);
            sandbox.teardown().await;
        }
        self.domains.freed.notify_waiters();
    }
}

/// The supervised sandboxes of one template, by trust domain.
#[derive(Debug, Default)]
pub struct Domains {
    bound: Mutex<HashMap<String, Vec<Arc<Supervised>>>>,
    /// Fresh sandboxes being taken from the pool, by domain. They count against
    /// `sandboxes_per_domain`, so that a burst of jobs binds that many sandboxes, not one per
    /// job. Locked after `bound`, never before.
    binding: Mutex<HashMap<String, usize>>,
    freed: tokio::sync::Notify,
}

/// One fresh sandbox being bound to a domain; dropped (bound, failed or given up), it is no
/// longer counted. It wakes no one when dropped: waking every claimer each time one of them
/// looped made them wake each other without end. A sandbox bound (its other slots are free) or
/// a failed start wakes the waiters explicitly.
struct Binding<'a> {
    domains: &'a Domains,
    domain: &'a str,
}

impl Drop for Binding<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.domains.binding.lock().get_mut(self.domain) {
            *n = n.saturating_sub(1);
        }
    }
}

impl Domains {
    fn remove(&self, sandbox: &Arc<Supervised>) {
        for list in self.bound.lock().values_mut() {
            list.retain(|s| !Arc::ptr_eq(s, sandbox));
        }
    }

    /// Claims a free slot for a job of `domain`: on a sandbox already bound to it, or on a fresh
    /// sandbox taken from `pool` and bound to it.
    ///
    /// # Errors
    /// [`PoolError`] when no fresh sandbox can be had.
    pub async fn claim(
        self: &Arc<Self>,
        domain: &str,
        pool: &Pool,
        config: ProcessConfig,
    ) -> Result<ProcessSlot, PoolError> {
        loop {
            let freed = self.freed.notified();
            let mut retired = Vec::new();
            let full = {
                let mut bound = self.bound.lock();
                let list = bound.entry(domain.to_owned()).or_default();
                for sandbox in list.iter() {
                    if !sandbox.usable() {
                        continue;
                    }
                    let active = sandbox.active.load(Ordering::SeqCst);
                    if active < config.slots
                        && sandbox
                            .active
                            .compare_exchange(
                                active,
                                active + 1,
                                Ordering::SeqCst,
                                Ordering::SeqCst,
                            )
                            .is_ok()
                    {
                        return Ok(ProcessSlot {
                            sandbox: Arc::clone(sandbox),
                            domains: Arc::clone(self),
                        });
                    }
                }
                list.retain(|s| {
                    let keep = s.usable() || s.active.load(Ordering::SeqCst) > 0;
                    if !keep {
                        retired.push(Arc::clone(s));
                    }
                    keep
                });
                let usable = list.iter().filter(|s| s.usable()).count();
                let mut binding = self.binding.lock();
                let pending = binding.entry(domain.to_owned()).or_default();
                let full = usable + *pending >= config.sandboxes_per_domain;
                if !full {
                    *pending += 1;
                }
                full
            };
            let _binding = (!full).then_some(Binding {
                domains: self,
                domain,
            });
            for sandbox in retired {
                sandbox.teardown().await;
            }
            if full {
                // The domain holds all the sandboxes it may: wait for a slot to be freed.
                freed.await;
                continue;
            }
            // Every bound sandbox is busy: bind a fresh one, or take the first slot freed.
            tokio::select! {
                fresh = pool.acquire() => {
                    let fresh = match fresh {
                        Ok(fresh) => fresh,
                        Err(err) => {
                            drop(_binding);
                            self.freed.notify_waiters();
                            return Err(err);
                        }
                    };
                    let sandbox = Supervised::new(fresh, config);
                    sandbox.active.store(1, Ordering::SeqCst);
                    self.bound
                        .lock()
                        .entry(domain.to_owned())
                        .or_default()
                        .push(Arc::clone(&sandbox));
                    // Its other slots are free: wake the jobs waiting on a full domain.
                    drop(_binding);
                    self.freed.notify_waiters();
                    return Ok(ProcessSlot { sandbox, domains: Arc::clone(self) });
                }
                _ = freed => {}
            }
        }
    }

    /// Tears down every bound sandbox.
    pub async fn close(&self) {
        let all: Vec<Arc<Supervised>> = self
            .bound
            .lock()
            .drain()
            .flat_map(|(_, list)| list)
            .collect();
        let mut teardowns = tokio::task::JoinSet::new();
        for sandbox in all {
            sandbox.fail(SHUTTING_DOWN);
            teardowns.spawn(async move { sandbox.teardown().await });
        }
        teardowns.join_all().await;
    }
}
