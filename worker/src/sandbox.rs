//! One live sandbox: started by a restore or a cold boot, woken, handed exactly one job, then
//! torn down.
//!
//! The worker talks to the entry script through the sandbox's own stdin and stdout (see
//! `worker/entry/entry.py`): `wake` after start, answered by `awake`, proves the sandbox runs and
//! reseeds its randomness; `job <n>` plus an n-byte JSON envelope hands the job over, and the rest
//! of stdin is the job's. From then on everything observed about the job (exit status, output,
//! memory kills, CPU time) comes from outside the sandbox.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout};

use crate::cgroup::{CgroupError, SandboxCgroup};
use crate::runsc::{Runsc, RunscError};

/// How a sandbox came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FillMethod {
    /// Restored from the template's checkpoint.
    Restore,
    /// Booted from scratch.
    Cold,
}

impl FillMethod {
    /// The method's name.
    pub fn as_str(self) -> &'static str {
        match self {
            FillMethod::Restore => "restore",
            FillMethod::Cold => "cold",
        }
    }
}

/// What a sandbox is started from.
#[derive(Debug)]
pub struct SandboxPlan<'a> {
    /// The runsc driver.
    pub runsc: &'a Runsc,
    /// Sandbox id, unique within the worker.
    pub id: String,
    /// Relative cgroup path.
    pub cgroup: String,
    /// The sandbox's bundle directory (written already).
    pub bundle: PathBuf,
    /// Checkpoint image, for a restore.
    pub image: Option<PathBuf>,
    /// Memory limit of the sandbox in bytes.
    pub memory_bytes: u64,
    /// Host task limit.
    pub pids: u64,
    /// How long starting may take.
    pub timeout: Duration,
}

/// Why a sandbox could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Its cgroup could not be made.
    #[error("cannot set up the sandbox's cgroup")]
    Cgroup(#[from] CgroupError),
    /// runsc could not be started.
    #[error(transparent)]
    Runsc(#[from] RunscError),
    /// The entry script did not answer as expected.
    #[error("sandbox {id} did not start ({what}); its stderr: {stderr}")]
    NotReady {
        /// The sandbox.
        id: String,
        /// What went wrong.
        what: String,
        /// What the sandbox printed on stderr.
        stderr: String,
    },
}

/// The host side of a sandbox: its runsc process, cgroups, state and bundle. What is left of a
/// sandbox once its job is over, for [`Shell::teardown`].
#[derive(Debug)]
pub struct Shell {
    id: String,
    child: Child,
    cgroup: Arc<SandboxCgroup>,
    runsc: Runsc,
    bundle: PathBuf,
}

/// A started, woken sandbox waiting for its job.
#[derive(Debug)]
pub struct Sandbox {
    shell: Shell,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    stderr: ChildStderr,
    method: FillMethod,
    started_in: Duration,
    start_cpu: Duration,
}

/// What the worker saw of one job.
#[derive(Debug)]
pub struct RunOutcome {
    /// The sandbox's exit status, when it exited before the deadline.
    pub exit: Option<ExitStatus>,
    /// Whether the deadline struck.
    pub timed_out: bool,
    /// Whether the kernel's out-of-memory killer struck in the sandbox.
    pub oom_killed: bool,
    /// Whether memory use reached the limit at all.
    pub memory_hit_limit: bool,
    /// Whether the sandbox's host pids limit refused it a process or thread.
    pub pids_hit_limit: bool,
    /// Captured stdout.
    pub stdout: Captured,
    /// Captured stderr.
    pub stderr: Captured,
    /// From taking the job to its input being fully written.
    pub start: Duration,
    /// From handoff to the end of the job.
    pub run: Duration,
    /// CPU time of the whole sandbox during the job.
    pub cpu: Duration,
    /// Host processes of the sandbox that would not die (a fault of the host, not of the job).
    pub survivors: usize,
    /// A fault of the system seen while running the job.
    pub fault: Option<String>,
}

/// The first bytes of an output stream, up to a cap, and the count of all of them.
#[derive(Debug, Default)]
pub struct Captured {
    /// Kept bytes.
    pub bytes: Vec<u8>,
    /// Bytes written in all.
    pub total: u64,
}

impl Captured {
    /// Whether anything was dropped.
    pub fn truncated(&self) -> bool {
        self.total > self.bytes.len() as u64
    }
}

/// Reads `reader` to its end, keeping at most `cap` bytes.
async fn capture(mut reader: impl AsyncRead + Unpin, cap: u64) -> Captured {
    let mut out = Captured::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return out,
            Ok(n) => {
                out.total += n as u64;
                let room = (cap as usize).saturating_sub(out.bytes.len());
                out.bytes.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

impl Sandbox {
    /// Starts a sandbox by `plan` (a restore when it has an image, else a cold boot) and wakes it.
    ///
    /// # Errors
    /// [`StartError`]; nothing of the sandbox is left behind.
    pub async fn start(plan: SandboxPlan<'_>) -> Result<Sandbox, StartError> {
        let began = Instant::now();
        let cgroup = Arc::new(SandboxCgroup::create(
            &plan.cgroup,
            plan.memory_bytes,
            plan.pids,
        )?);
        let spawned = match &plan.image {
            Some(image) => plan
                .runsc
                .spawn_restore(&plan.bundle, image, &plan.id, &cgroup),
            None => plan.runsc.spawn_run(&plan.bundle, &plan.id, &cgroup),
        };
        let mut child = match spawned {
            Ok(child) => child,
            Err(err) => {
                let _ = cgroup.remove();
                return Err(err.into());
            }
        };
        let method = if plan.image.is_some() {
            FillMethod::Restore
        } else {
            FillMethod::Cold
        };
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            unreachable!("all three streams are piped by Runsc::spawn_sandbox");
        };
        let shell = Shell {
            id: plan.id,
            child,
            cgroup,
            runsc: plan.runsc.clone(),
            bundle: plan.bundle,
        };
        let mut sandbox = Sandbox {
            shell,
            stdin,
            stdout: BufReader::new(stdout),
            stderr,
            method,
            started_in: Duration::ZERO,
            start_cpu: Duration::ZERO,
        };
        let woke = tokio::time::timeout(plan.timeout, sandbox.wake(method)).await;
        let what = match woke {
            Ok(Ok(())) => {
                sandbox.started_in = began.elapsed();
                sandbox.start_cpu = sandbox.shell.cgroup.cpu_time().unwrap_or_default();
                return Ok(sandbox);
            }
            Ok(Err(what)) => what,
            Err(_) => format!("no answer within {} ms", plan.timeout.as_millis()),
        };
        let id = sandbox.shell.id.clone();
        let stderr = sandbox.destroy_and_read_stderr().await;
        Err(StartError::NotReady { id, what, stderr })
    }

    /// Reads the ready line of a cold boot, then sends `wake` and reads `awake`.
    async fn wake(&mut self, method: FillMethod) -> Result<(), String> {
        if method == FillMethod::Cold {
            self.expect_line(r#"{"shardbox":"ready"}"#).await?;
        }
        self.stdin
            .write_all(b"wake\n")
            .await
            .map_err(|e| format!("cannot write wake: {e}"))?;
        self.stdin
            .flush()
            .await
            .map_err(|e| format!("cannot write wake: {e}"))?;
        self.expect_line(r#"{"shardbox":"awake"}"#).await
    }

    async fn expect_line(&mut self, want: &str) -> Result<(), String> {
        let mut line = String::new();
        // The entry script's own lines are short; a longer one is the template's fault.
        let mut limited = (&mut self.stdout).take(4096);
        match limited.read_line(&mut line).await {
            Ok(0) => Err(format!("exited before saying {want}")),
            Ok(_) if line.trim_end() == want => Ok(()),
            Ok(_) => Err(format!(
                "said {:?} where {want} was expected",
                line.trim_end()
            )),
            Err(err) => Err(format!("unreadable stdout: {err}")),
        }
    }

    /// Kills everything of the sandbox and returns what it had written on stderr (at most
    /// 64 KiB).
    async fn destroy_and_read_stderr(mut self) -> String {
        self.shell.kill().await;
        let stderr =
            tokio::time::timeout(Duration::from_secs(2), capture(&mut self.stderr, 64 * 1024))
                .await
                .unwrap_or_default();
        self.shell.teardown().await;
        String::from_utf8_lossy(&stderr.bytes).trim().to_owned()
    }

    /// The sandbox id.
    pub fn id(&self) -> &str {
        &self.shell.id
    }

    /// How it was made.
    pub fn method(&self) -> FillMethod {
        self.method
    }

    /// How long starting and waking took.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// CPU time the whole sandbox used to start and wake.
    pub fn start_cpu(&self) -> Duration {
        self.start_cpu
    }

    /// Whether the sandbox is still running (an idle sandbox can be killed from outside).
    pub fn is_alive(&mut self) -> bool {
        matches!(self.shell.child.try_wait(), Ok(None))
    }

    /// The process id of the sandbox's runsc process, while it runs.
    pub fn runsc_pid(&self) -> Option<u32> {
        self.shell.child.id()
    }

    /// Splits the sandbox into its host side and its three streams, for a caller that speaks the
    /// entry script's protocol itself (process isolation).
    pub fn into_parts(self) -> (Shell, ChildStdin, BufReader<ChildStdout>, ChildStderr) {
        (self.shell, self.stdin, self.stdout, self.stderr)
    }

    /// Destroys an unused sandbox.
    pub async fn discard(self) {
        self.shell.teardown().await;
    }

    /// Hands the job over and watches it to the end.
    ///
    /// `envelope` is the JSON the entry script reads, `stdin` the job's own input. The job may
    /// use `memory_bytes` (at most the sandbox's limit), runs at most `timeout` from the
    /// handoff, and each output stream is kept up to `output_cap` bytes. `taken` is when the
    /// worker took the job, from which the start latency is measured.
    pub async fn run(
        self,
        envelope: &[u8],
        stdin: Vec<u8>,
        memory_bytes: Option<u64>,
        timeout: Duration,
        output_cap: u64,
        taken: Instant,
    ) -> (RunOutcome, Shell) {
        let Sandbox {
            mut shell,
            stdin: mut writer,
            stdout,
            stderr,
            ..
        } = self;
        let mut fault = None;
        if let Some(bytes) = memory_bytes {
            if let Err(err) = shell.cgroup.set_memory_limit(bytes) {
                fault = Some(format!("cannot set the job's memory limit: {err}"));
            }
        }
        let cpu_before = shell.cgroup.cpu_time().unwrap_or_default();
        let mut frame = format!("job {}\n", envelope.len()).into_bytes();
        frame.extend_from_slice(envelope);
        let handoff = Instant::now();
        let deadline = tokio::time::Instant::from_std(handoff) + timeout;

        // The envelope and stdin are written by a task of their own, so that a job that never
        // reads its stdin cannot stall the worker; the pipe closes when the task ends.
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let write_task = tokio::spawn(async move {
            let ok = writer.write_all(&frame).await.is_ok()
                && writer.write_all(&stdin).await.is_ok()
                && writer.flush().await.is_ok();
            let _ = started_tx.send((Instant::now(), ok));
            drop(writer);
        });
        let out_task = tokio::spawn(capture(stdout, output_cap));
        let err_task = tokio::spawn(capture(stderr, output_cap));

        let (exit, timed_out) = match tokio::time::timeout_at(deadline, shell.child.wait()).await {
            Ok(Ok(status)) => (Some(status), false),
            Ok(Err(err)) => {
                fault.get_or_insert(format!("cannot wait for the sandbox: {err}"));
                (None, false)
            }
            Err(_) => (None, true),
        };
        let run = handoff.elapsed();
        // Whatever still runs in the sandbox ends now: a grandchild holding a pipe, a process
        // the job left behind, or the whole sandbox at the deadline.
        let survivors = shell.cgroup.kill_all(Duration::from_secs(5)).await;
        if exit.is_none() {
            let _ = shell.child.kill().await;
        }
        write_task.abort();
        let grace = Duration::from_secs(2);
        let stdout = tokio::time::timeout(grace, out_task)
            .await
            .ok()
            .and_then(Result::ok);
        let stderr = tokio::time::timeout(grace, err_task)
            .await
            .ok()
            .and_then(Result::ok);
        if stdout.is_none() || stderr.is_none() {
            fault.get_or_insert("the sandbox's output did not close after it ended".into());
        }
        let start = match started_rx.await {
            Ok((at, true)) => at.saturating_duration_since(taken),
            _ => handoff.saturating_duration_since(taken),
        };
        let oom_killed = shell.cgroup.oom_kills().unwrap_or(0) > 0;
        let memory_hit_limit = shell.cgroup.memory_failcnt().unwrap_or(0) > 0;
        let pids_hit_limit = shell.cgroup.pids_refused().unwrap_or(0) > 0;
        let cpu = shell
            .cgroup
            .cpu_time()
            .unwrap_or_default()
            .saturating_sub(cpu_before);
        if survivors > 0 {
            fault.get_or_insert(format!(
                "{survivors} host processes of the sandbox survived"
            ));
        }
        let outcome = RunOutcome {
            exit,
            timed_out,
            oom_killed,
            memory_hit_limit,
            pids_hit_limit,
            stdout: stdout.unwrap_or_default(),
            stderr: stderr.unwrap_or_default(),
            start,
            run,
            cpu,
            survivors,
            fault,
        };
        (outcome, shell)
    }

    /// Sends `wake` again and waits for `awake`: a sandbox that answers can take a job.
    /// Used by template builds to prove a restore works end to end.
    ///
    /// # Errors
    /// What went wrong, in words.
    pub async fn ping(&mut self, timeout: Duration) -> Result<(), String> {
        match tokio::time::timeout(timeout, self.wake(FillMethod::Restore)).await {
            Ok(result) => result,
            Err(_) => Err("no answer to wake".into()),
        }
    }
}

impl Shell {
    /// The sandbox id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// CPU time of the whole sandbox so far.
    pub fn cpu_time(&self) -> Duration {
        self.cgroup.cpu_time().unwrap_or_default()
    }

    /// Whether the kernel's out-of-memory killer struck in the sandbox.
    pub fn oom_killed(&self) -> bool {
        self.cgroup.oom_kills().unwrap_or(0) > 0
    }

    /// Kills every host process of the sandbox.
    async fn kill(&mut self) {
        self.cgroup.kill_all(Duration::from_secs(5)).await;
        let _ = self.child.kill().await;
    }

    /// Removes every trace of the sandbox: host processes, runsc state, cgroups and bundle.
    pub async fn teardown(mut self) {
        self.kill().await;
        if self.runsc.has_state(&self.id) {
            if let Err(err) = self.runsc.delete(&self.id).await {
                tracing::warn!(sandbox_id = %self.id, error = %err, "runsc delete failed");
            }
        }
        if let Err(err) = self.cgroup.remove() {
            tracing::warn!(sandbox_id = %self.id, error = %err, "cannot remove sandbox cgroup");
        }
        let _ = std::fs::remove_dir_all(&self.bundle);
    }
}
