//! The worker: builds its templates, keeps their pools warm, turns jobs into envelopes and
//! sandbox outcomes into results.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use shardbox_proto::{Job, JobResult, Limits, Status, Timing};

use crate::cgroup::{self, CgroupError};
use crate::config::{Isolation, TemplateKind, WorkerConfig};
use crate::pool::{Pool, PoolError};
use crate::process::{Domains, ProcessSlot, Report};
use crate::runsc::{Runsc, RunscError};
use crate::sandbox::{RunOutcome, Sandbox};
use crate::template::{BuildContext, BuildError, Template, ENTRY_SCRIPT};

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The host lacks the cgroups shardbox needs.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// runsc is missing or broken.
    #[error(transparent)]
    Runsc(#[from] RunscError),
    /// The state directory cannot be written.
    #[error("cannot prepare state directory {path}")]
    StateDir {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A template failed to build.
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// A job checked against its template, ready to hand to a sandbox.
#[derive(Debug, Clone)]
pub struct PreparedJob {
    /// The job as submitted.
    pub job: Job,
    /// Its template.
    pub template: String,
    /// Its limits.
    pub limits: Limits,
    envelope: Vec<u8>,
}

/// What a job runs in: a sandbox of its own, or a slot of a warm sandbox of its trust domain.
#[derive(Debug)]
pub enum Slot {
    /// Sandbox isolation: a restored sandbox for this job alone.
    Sandbox(Box<Sandbox>),
    /// Process isolation: a process in a sandbox shared with jobs of the same domain.
    Process(ProcessSlot),
}

impl Slot {
    /// The id of the sandbox the job runs in.
    pub fn sandbox_id(&self) -> &str {
        match self {
            Slot::Sandbox(sandbox) => sandbox.id(),
            Slot::Process(slot) => slot.sandbox().id(),
        }
    }
}

/// The trust domain of callers that name none (`shardbox run` serves one batch).
pub const DEFAULT_DOMAIN: &str = "default";

/// A running worker.
#[derive(Debug)]
pub struct Worker {
    name: String,
    ctx: Arc<BuildContext>,
    pools: BTreeMap<String, Arc<Pool>>,
    domains: BTreeMap<String, Arc<Domains>>,
    default_template: String,
    teardowns: Arc<AtomicUsize>,
}

impl Worker {
    /// Cleans up what an earlier run left under the state directory, builds every template (or
    /// takes it from the cache) and starts filling the pools.
    ///
    /// # Errors
    /// [`WorkerError`].
    pub async fn start(config: &WorkerConfig) -> Result<Worker, WorkerError> {
        cgroup::check_host()?;
        let state_dir = config.worker.state_dir.clone();
        let mkdir = |path: PathBuf| {
            std::fs::create_dir_all(&path)
                .map_err(|source| WorkerError::StateDir {
                    path: path.clone(),
                    source,
                })
                .map(|()| path)
        };
        let state_dir = mkdir(state_dir)?;
        let state_dir =
            std::fs::canonicalize(&state_dir).map_err(|source| WorkerError::StateDir {
                path: state_dir.clone(),
                source,
            })?;
        let root = mkdir(state_dir.join("runsc"))?;
        let entry_dir = mkdir(state_dir.join("entry"))?;
        let entry = entry_dir.join("entry.py");
        if std::fs::read_to_string(&entry).ok().as_deref() != Some(ENTRY_SCRIPT) {
            std::fs::write(&entry, ENTRY_SCRIPT).map_err(|source| WorkerError::StateDir {
                path: entry.clone(),
                source,
            })?;
        }

        let runsc = Runsc::new(&config.runsc, root);
        let version = runsc.version().await?;
        let flags = format!("{:?}", config.runsc);
        tracing::info!(runsc_version = %version, platform = %config.runsc.platform,
            state_dir = %state_dir.display(), "worker starting");

        let dir_hash: String = Sha256::digest(state_dir.as_os_str().as_encoded_bytes())
            .iter()
            .take(6)
            .map(|b| format!("{b:02x}"))
            .collect();
        let cgroup_prefix = format!("shardbox/{dir_hash}");
        remove_leftovers(&runsc, &cgroup_prefix, &state_dir).await;
        let _ = mkdir(state_dir.join("sandboxes"))?;

        let ctx = Arc::new(BuildContext::new(
            runsc,
            version,
            state_dir,
            cgroup_prefix,
            format!("sb{}", std::process::id()),
            flags,
        ));
        let mut pools = BTreeMap::new();
        let mut domains = BTreeMap::new();
        for (name, template_config) in &config.templates {
            let template = Template::build(name, template_config, Arc::clone(&ctx)).await?;
            pools.insert(name.clone(), Pool::start(Arc::new(template)));
            if template_config.isolation == Isolation::Process {
                domains.insert(name.clone(), Arc::new(Domains::default()));
            }
        }
        Ok(Worker {
            name: config.worker_name(),
            ctx,
            pools,
            domains,
            default_template: config.worker.default_template.clone(),
            teardowns: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The worker's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// runsc's version line.
    pub fn runsc_version(&self) -> &str {
        &self.ctx.runsc_version
    }

    /// The runsc driver.
    pub fn runsc(&self) -> &Runsc {
        &self.ctx.runsc
    }

    /// The pools by template name.
    pub fn pools(&self) -> &BTreeMap<String, Arc<Pool>> {
        &self.pools
    }

    /// Checks `job` against its template and applies the template's limits.
    ///
    /// # Errors
    /// Why the job cannot run here, in words meant for the user.
    pub fn prepare(&self, job: Job) -> Result<PreparedJob, String> {
        let template = job
            .template
            .clone()
            .unwrap_or_else(|| self.default_template.clone());
        let Some(pool) = self.pools.get(&template) else {
            let known: Vec<&str> = self.pools.keys().map(String::as_str).collect();
            return Err(format!(
                "unknown template {template:?} (known: {})",
                known.join(", ")
            ));
        };
        let config = &pool.template().config;
        match config.kind {
            TemplateKind::Python if job.code.is_none() || job.argv.is_some() => {
                return Err(format!(
                    "template {template:?} runs `code`; give code, not argv"
                ));
            }
            TemplateKind::Exec if job.argv.is_none() || job.code.is_some() => {
                return Err(format!(
                    "template {template:?} runs `argv`; give argv, not code"
                ));
            }
            _ => {}
        }
        let max = &config.limits;
        let pick = |name: &str, asked: Option<u64>, max: u64| match asked {
            Some(v) if v > max => Err(format!(
                "{name} {v} is above template {template:?}'s maximum of {max}"
            )),
            Some(v) => Ok(v),
            None => Ok(max),
        };
        let limits = Limits {
            timeout_ms: pick("timeout_ms", job.timeout_ms, max.timeout_ms)?,
            memory_mb: pick("memory_mb", job.memory_mb, max.memory_mb)?,
            max_output_bytes: pick(
                "max_output_bytes",
                job.max_output_bytes,
                max.max_output_bytes,
            )?,
        };
        let mut envelope = serde_json::json!({
            "code": job.code,
            "argv": job.argv,
            "files": job.files,
            "env": job.env,
            "workdir": config.workdir,
        });
        if let Some(map) = envelope.as_object_mut() {
            map.retain(|_, v| !v.is_null());
            if config.isolation == Isolation::Process {
                // The supervisor enforces these itself and feeds stdin from the envelope.
                map.insert("stdin".into(), job.stdin.clone().into());
                map.insert("timeout_ms".into(), limits.timeout_ms.into());
                map.insert("memory_mb".into(), limits.memory_mb.into());
                map.insert("max_output_bytes".into(), limits.max_output_bytes.into());
                map.insert("pids".into(), config.limits.pids.into());
            }
        }
        let envelope = serde_json::to_vec(&envelope).expect("envelope serializes");
        Ok(PreparedJob {
            job,
            template,
            limits,
            envelope,
        })
    }

    /// Takes a slot for a job of `template` in the default trust domain, waiting for one if
    /// needed.
    ///
    /// # Errors
    /// [`PoolError`] when the template is unknown to this worker, broken, or shutting down.
    pub async fn acquire(&self, template: &str) -> Result<Slot, PoolError> {
        self.acquire_in(template, DEFAULT_DOMAIN).await
    }

    /// Takes a slot for a job of `template` in trust domain `domain`: an idle sandbox of its
    /// own (sandbox isolation), or a free slot of a warm sandbox that serves only `domain`
    /// (process isolation). Waits for one if needed.
    ///
    /// # Errors
    /// [`PoolError`] when the template is unknown to this worker, broken, or shutting down.
    pub async fn acquire_in(&self, template: &str, domain: &str) -> Result<Slot, PoolError> {
        let Some(pool) = self.pools.get(template) else {
            return Err(PoolError::Broken {
                template: template.into(),
                last_error: "not served by this worker".into(),
            });
        };
        match self.domains.get(template) {
            Some(domains) => {
                let config = pool.template().config.process;
                Ok(Slot::Process(domains.claim(domain, pool, config).await?))
            }
            None => Ok(Slot::Sandbox(Box::new(pool.acquire().await?))),
        }
    }

    /// Gives back a slot that was taken but will not be used.
    pub async fn discard(&self, slot: Slot) {
        match slot {
            Slot::Sandbox(sandbox) => sandbox.discard().await,
            Slot::Process(slot) => slot.release(false).await,
        }
    }

    /// Runs `job` in `slot` (taken at `taken`) and returns its result; `queue_ms`, `total_ms`
    /// and `attempts` are the caller's to fill in. A sandbox of its own is torn down in the
    /// background afterwards.
    pub async fn run(&self, slot: Slot, job: &PreparedJob, taken: Instant) -> JobResult {
        let result = match slot {
            Slot::Sandbox(sandbox) => self.run_in_sandbox(*sandbox, job, taken).await,
            Slot::Process(slot) => self.run_in_process(slot, job, taken).await,
        };
        metrics::counter!("shardbox_jobs_total", "status" => result.status.as_str()).increment(1);
        metrics::histogram!("shardbox_handoff_seconds", "template" => job.template.clone())
            .record(result.timing.start_us as f64 / 1e6);
        result
    }

    async fn run_in_process(
        &self,
        slot: ProcessSlot,
        job: &PreparedJob,
        taken: Instant,
    ) -> JobResult {
        // The supervisor enforces the deadline; past this much more, it counts as lost.
        let patience = Duration::from_millis(job.limits.timeout_ms * 3 / 2 + 5_000);
        let outcome = slot.sandbox().run(&job.envelope, patience).await;
        let result = match outcome {
            Ok((report, _)) if report.error.is_some() => {
                slot.release(true).await;
                let error = report.error.unwrap_or_default();
                let mut result = JobResult::without_run(&job.job.id, Status::SandboxError, error);
                result.worker = self.name.clone();
                result.attempts = 1;
                result.labels = job.job.labels.clone();
                result
            }
            Ok((report, handed)) => {
                let recycle = report.memory_exhausted;
                let result = self.result_of_report(job, report, handed.duration_since(taken));
                slot.release(recycle).await;
                result
            }
            Err(err) => {
                slot.release(true).await;
                let mut result =
                    JobResult::without_run(&job.job.id, Status::SandboxError, err.to_string());
                result.worker = self.name.clone();
                result.attempts = 1;
                result.labels = job.job.labels.clone();
                result
            }
        };
        tracing::debug!(job_id = %job.job.id, status = result.status.as_str(), "job finished");
        result
    }

    fn result_of_report(&self, job: &PreparedJob, report: Report, start: Duration) -> JobResult {
        use base64::Engine as _;
        let decode = |text: &str| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(text)
                .unwrap_or_default();
            String::from_utf8_lossy(&bytes).into_owned()
        };
        let stdout = decode(&report.stdout);
        let stderr = decode(&report.stderr);
        let cap = job.limits.max_output_bytes;
        let truncated = report.stdout_bytes > cap || report.stderr_bytes > cap;
        let status = if report.timed_out {
            Status::Timeout
        } else if report.memory_exhausted {
            Status::MemoryLimit
        } else if truncated && report.signal.is_none() {
            Status::OutputLimit
        } else if report.exit_code == Some(0) {
            Status::Ok
        } else {
            Status::Failed
        };
        let error = report.too_many_processes.then(|| {
            let pids = self.pids_limit(job);
            format!("killed for holding its limit of {pids} processes")
        });
        JobResult {
            id: job.job.id.clone(),
            status,
            exit_code: if report.timed_out {
                None
            } else {
                report.exit_code
            },
            signal: report.signal,
            stdout,
            stderr,
            stdout_truncated: report.stdout_bytes > cap,
            stderr_truncated: report.stderr_bytes > cap,
            stdout_bytes: report.stdout_bytes,
            stderr_bytes: report.stderr_bytes,
            timing: Timing {
                queue_ms: 0,
                start_us: start.as_micros() as u64,
                run_ms: report.run_us / 1000,
                total_ms: 0,
                cpu_ms: report.cpu_us / 1000,
            },
            worker: self.name.clone(),
            attempts: 1,
            labels: job.job.labels.clone(),
            error,
            line: None,
        }
    }

    async fn run_in_sandbox(
        &self,
        sandbox: Sandbox,
        job: &PreparedJob,
        taken: Instant,
    ) -> JobResult {
        let sandbox_id = sandbox.id().to_owned();
        let limits = job.limits;
        let template_memory = self.pools[&job.template].template().config.limits.memory_mb;
        let memory = (limits.memory_mb < template_memory).then_some(limits.memory_mb << 20);
        let (outcome, shell) = sandbox
            .run(
                &job.envelope,
                job.job.stdin.as_bytes().to_vec(),
                memory,
                Duration::from_millis(limits.timeout_ms),
                limits.max_output_bytes,
                taken,
            )
            .await;
        let teardowns = Arc::clone(&self.teardowns);
        teardowns.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            shell.teardown().await;
            teardowns.fetch_sub(1, Ordering::SeqCst);
        });
        let result = self.result_of(job, outcome);
        metrics::counter!("shardbox_jobs_total", "status" => result.status.as_str()).increment(1);
        metrics::histogram!("shardbox_handoff_seconds", "template" => job.template.clone())
            .record(result.timing.start_us as f64 / 1e6);
        tracing::debug!(job_id = %job.job.id, sandbox_id = %sandbox_id,
            status = result.status.as_str(), "job finished");
        result
    }

    /// The `pids` limit of the job's template.
    fn pids_limit(&self, job: &PreparedJob) -> u64 {
        self.pools[&job.template].template().config.limits.pids
    }

    fn result_of(&self, job: &PreparedJob, outcome: RunOutcome) -> JobResult {
        let mut exit_code = None;
        let mut signal = None;
        let mut error = outcome.fault.clone();
        let truncated = outcome.stdout.truncated() || outcome.stderr.truncated();
        let status = if outcome.timed_out {
            signal = Some(libc::SIGKILL);
            Status::Timeout
        } else if outcome.oom_killed {
            Status::MemoryLimit
        } else if let Some(fault) = &outcome.fault {
            error = Some(fault.clone());
            Status::SandboxError
        } else {
            match outcome.exit.and_then(|s| s.code()) {
                None => {
                    error = Some("runsc ended without an exit status".into());
                    Status::SandboxError
                }
                Some(0) if truncated => {
                    exit_code = Some(0);
                    Status::OutputLimit
                }
                Some(0) => Status::Ok,
                Some(code) => {
                    // runsc reports a container killed by signal N as 128 + N.
                    if (129..=128 + 64).contains(&code) {
                        signal = Some(code - 128);
                    } else {
                        exit_code = Some(code);
                    }
                    if outcome.memory_hit_limit {
                        Status::MemoryLimit
                    } else if truncated {
                        Status::OutputLimit
                    } else {
                        if outcome.pids_hit_limit {
                            // Under the ptrace platform gVisor's own kernel needs host threads
                            // too: a job at the limit may end it rather than see its fork fail.
                            let pids = self.pids_limit(job);
                            error = Some(format!(
                                "the sandbox reached its limit of {pids} host processes and \
                                 threads"
                            ));
                        }
                        Status::Failed
                    }
                }
            }
        };
        if status == Status::Ok {
            exit_code = Some(0);
        }
        JobResult {
            id: job.job.id.clone(),
            status,
            exit_code,
            signal,
            stdout: String::from_utf8_lossy(&outcome.stdout.bytes).into_owned(),
            stderr: String::from_utf8_lossy(&outcome.stderr.bytes).into_owned(),
            stdout_truncated: outcome.stdout.truncated(),
            stderr_truncated: outcome.stderr.truncated(),
            stdout_bytes: outcome.stdout.total,
            stderr_bytes: outcome.stderr.total,
            timing: Timing {
                queue_ms: 0,
                start_us: outcome.start.as_micros() as u64,
                run_ms: outcome.run.as_millis() as u64,
                total_ms: 0,
                cpu_ms: outcome.cpu.as_millis() as u64,
            },
            worker: self.name.clone(),
            attempts: 1,
            labels: job.job.labels.clone(),
            error,
            line: None,
        }
    }

    /// Stops the pools, destroys idle sandboxes and waits for every teardown to finish.
    pub async fn shutdown(&self) {
        let mut closing = tokio::task::JoinSet::new();
        for domains in self.domains.values() {
            let domains = Arc::clone(domains);
            closing.spawn(async move { domains.close().await });
        }
        for pool in self.pools.values() {
            let pool = Arc::clone(pool);
            closing.spawn(async move { pool.close().await });
        }
        closing.join_all().await;
        while self.teardowns.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Deletes the containers, cgroups and bundles an earlier run left behind.
async fn remove_leftovers(runsc: &Runsc, cgroup_prefix: &str, state_dir: &std::path::Path) {
    let stale = cgroup::remove_stale(cgroup_prefix).await;
    let ids = runsc.list().await.unwrap_or_default();
    for id in &ids {
        let _ = runsc.kill(id).await;
        if let Err(err) = runsc.delete(id).await {
            tracing::warn!(sandbox_id = %id, error = %err, "cannot delete leftover container");
        }
    }
    let _ = std::fs::remove_dir_all(state_dir.join("sandboxes"));
    if stale + ids.len() > 0 {
        tracing::info!(
            cgroups = stale,
            containers = ids.len(),
            "removed leftovers of an earlier run"
        );
    }
}
