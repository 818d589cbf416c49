//! The `runsc` driver: every call shardbox makes to gVisor's runtime goes through [`Runsc`].
//!
//! All calls share one dedicated `--root` state directory, so a worker never sees or touches
//! containers that are not its own. Sandboxes are started in the foreground (`run`, `restore`
//! without `-detach`): the runsc process stays the worker's child, its stdin, stdout and stderr
//! are the sandbox's, and its exit status is the sandbox's. Every host process of a sandbox,
//! runsc's own included, lives in the sandbox's cgroups from its first instruction.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::cgroup::SandboxCgroup;
use crate::config::RunscConfig;

/// Why a runsc call failed.
#[derive(Debug, thiserror::Error)]
pub enum RunscError {
    /// runsc could not be started at all.
    #[error("cannot start {binary} (install gVisor's runsc, e.g. `apt-get install runsc`)")]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// runsc ran and reported failure.
    #[error("runsc {command} {id} failed ({status}): {stderr}")]
    Failed {
        /// The subcommand.
        command: &'static str,
        /// The container.
        id: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr, trimmed.
        stderr: String,
    },
    /// runsc did not finish in time and was killed.
    #[error("runsc {command} {id} did not finish within {seconds} s")]
    TimedOut {
        /// The subcommand.
        command: &'static str,
        /// The container.
        id: String,
        /// The time allowed.
        seconds: u64,
    },
}

/// A configured runsc with its own state directory.
#[derive(Debug, Clone)]
pub struct Runsc {
    binary: PathBuf,
    root: PathBuf,
    global: Vec<String>,
}

/// How long a control call (checkpoint, kill, delete, list) may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);

impl Runsc {
    /// A driver for `config`, keeping container state under `root`.
    pub fn new(config: &RunscConfig, root: PathBuf) -> Self {
        let mut global = vec![
            format!("--root={}", root.display()),
            format!("--network={}", config.network),
            format!("--platform={}", config.platform),
            // The root filesystem stays read-only on the host; writes land in sandbox memory.
            "--overlay2=root:memory".to_owned(),
        ];
        global.extend(config.extra_flags.iter().cloned());
        Runsc {
            binary: config.binary.clone(),
            root,
            global,
        }
    }

    /// The state directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The binary.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// A runsc command with this driver's global flags (state root, network, platform, overlay
    /// and extra flags), for callers that need a call the driver does not wrap.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.args(&self.global);
        cmd
    }

    /// The first line of `runsc --version`, such as `runsc version 0.0~20221219.0`.
    ///
    /// # Errors
    /// [`RunscError`] when runsc cannot be run.
    pub async fn version(&self) -> Result<String, RunscError> {
        let out = self.control("--version", "", &["--version"]).await?;
        Ok(out.lines().next().unwrap_or_default().trim().to_owned())
    }

    /// Boots a container from `bundle` in the foreground, with piped stdio, inside `cgroup`.
    ///
    /// # Errors
    /// [`RunscError::Spawn`].
    pub fn spawn_run(
        &self,
        bundle: &Path,
        id: &str,
        cgroup: &SandboxCgroup,
    ) -> Result<Child, RunscError> {
        let mut cmd = self.command();
        cmd.arg("run")
            .arg(format!("--bundle={}", bundle.display()))
            .arg(id);
        self.spawn_sandbox(cmd, cgroup)
    }

    /// Restores a container from the checkpoint in `image` in the foreground, with fresh piped
    /// stdio, inside `cgroup`.
    ///
    /// # Errors
    /// [`RunscError::Spawn`].
    pub fn spawn_restore(
        &self,
        bundle: &Path,
        image: &Path,
        id: &str,
        cgroup: &SandboxCgroup,
    ) -> Result<Child, RunscError> {
        let mut cmd = self.command();
        cmd.arg("restore")
            .arg(format!("--bundle={}", bundle.display()))
            .arg(format!("--image-path={}", image.display()))
            .arg(id);
        self.spawn_sandbox(cmd, cgroup)
    }

    fn spawn_sandbox(&self, mut cmd: Command, cgroup: &SandboxCgroup) -> Result<Child, RunscError> {
        let procs: Vec<CString> = cgroup
            .procs_files()
            .iter()
            .filter_map(|p| CString::new(p.as_os_str().as_bytes()).ok())
            .collect();
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(false);
        // SAFETY: the closure runs in the child between fork and exec and calls only
        // async-signal-safe functions (open, write, close, prctl) on memory prepared before the
        // fork; it allocates nothing and takes no lock.
        unsafe {
            cmd.pre_exec(move || crate::sys::join_cgroups_and_die_with_parent(&procs));
        }
        cmd.spawn().map_err(|source| RunscError::Spawn {
            binary: self.binary.clone(),
            source,
        })
    }

    /// Checkpoints container `id` into `image` (which must exist); the container then exits.
    ///
    /// # Errors
    /// [`RunscError`].
    pub async fn checkpoint(&self, id: &str, image: &Path) -> Result<(), RunscError> {
        let image_flag = format!("--image-path={}", image.display());
        self.control("checkpoint", id, &["checkpoint", &image_flag, id])
            .await
            .map(drop)
    }

    /// Sends SIGKILL to every process of container `id`.
    ///
    /// # Errors
    /// [`RunscError`], also when the container is already gone.
    pub async fn kill(&self, id: &str) -> Result<(), RunscError> {
        self.control("kill", id, &["kill", "--all", id, "KILL"])
            .await
            .map(drop)
    }

    /// Deletes container `id`'s state, stopping it if needed. Call [`Runsc::kill`] first: on a
    /// running container delete alone waits seconds.
    ///
    /// # Errors
    /// [`RunscError`].
    pub async fn delete(&self, id: &str) -> Result<(), RunscError> {
        match self.control("delete", id, &["delete", "--force", id]).await {
            Ok(_) => Ok(()),
            Err(err) if self.state_is_unreadable(id) => {
                // A `create` or `restore` cut off before runsc wrote the container's metadata
                // leaves an empty state file that every later `kill` and `delete` refuses to
                // read; nothing of the container runs (its cgroup is killed before this), so
                // its files are all that is left of it.
                tracing::warn!(sandbox_id = %id, error = %err, "removing unreadable runsc state");
                for ext in ["state", "lock"] {
                    if let Err(source) = std::fs::remove_file(self.state_file(id, ext)) {
                        if source.kind() != std::io::ErrorKind::NotFound {
                            return Err(err);
                        }
                    }
                }
                Ok(())
            }
            Err(err) => Err(err),
        }
    }

    /// Whether runsc still keeps state for container `id`.
    pub fn has_state(&self, id: &str) -> bool {
        self.state_file(id, "state").exists()
    }

    /// One of the files runsc keeps for container `id`: `state` or `lock`.
    fn state_file(&self, id: &str, ext: &str) -> PathBuf {
        self.root.join(format!("{id}_sandbox:{id}.{ext}"))
    }

    /// Whether container `id`'s state file exists but holds no JSON that runsc could read.
    fn state_is_unreadable(&self, id: &str) -> bool {
        std::fs::read(self.state_file(id, "state"))
            .is_ok_and(|bytes| serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_err())
    }

    /// The ids of all containers under this state directory.
    ///
    /// # Errors
    /// [`RunscError`].
    pub async fn list(&self) -> Result<Vec<String>, RunscError> {
        let out = self.control("list", "", &["list", "--quiet"]).await?;
        Ok(out
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect())
    }

    async fn control(
        &self,
        command: &'static str,
        id: &str,
        args: &[&str],
    ) -> Result<String, RunscError> {
        let mut cmd = if command == "--version" {
            Command::new(&self.binary)
        } else {
            self.command()
        };
        cmd.args(args).stdin(Stdio::null()).kill_on_drop(true);
        let run = cmd.output();
        let out = match tokio::time::timeout(CONTROL_TIMEOUT, run).await {
            Ok(out) => out.map_err(|source| RunscError::Spawn {
                binary: self.binary.clone(),
                source,
            })?,
            Err(_) => {
                return Err(RunscError::TimedOut {
                    command,
                    id: id.to_owned(),
                    seconds: CONTROL_TIMEOUT.as_secs(),
                })
            }
        };
        if !out.status.success() {
            return Err(RunscError::Failed {
                command,
                id: id.to_owned(),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
