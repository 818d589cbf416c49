//! Host cgroups (version 1) that shardbox makes for each sandbox before runsc starts it.
//!
//! runsc joins a cgroup that already exists without taking it over, so the worker keeps control:
//! it sets the memory and pids limits, lowers the memory limit per job at handoff, reads the
//! out-of-memory kill counter and the CPU time after the job, kills every host process of the
//! sandbox at a deadline, and removes the cgroup when the sandbox is gone. gVisor reads the
//! memory limit from it and reports it as the sandbox's `MemTotal`.

use std::path::{Path, PathBuf};
use std::time::Duration;

const ROOT: &str = "/sys/fs/cgroup";
const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpuacct"];

/// Why a cgroup could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// This host has no cgroup v1 hierarchy for a controller shardbox needs.
    #[error(
        "cgroup v1 controller {controller} is not mounted at {ROOT}/{controller} \
         (shardbox needs the memory, pids and cpuacct controllers of cgroup v1)"
    )]
    Unsupported {
        /// The missing controller.
        controller: &'static str,
    },
    /// A cgroup file could not be read or written.
    #[error("cgroup file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Checks that the host has the controllers shardbox needs.
///
/// # Errors
/// [`CgroupError::Unsupported`] naming the first one missing.
pub fn check_host() -> Result<(), CgroupError> {
    for controller in CONTROLLERS {
        if !Path::new(ROOT)
            .join(controller)
            .join("cgroup.procs")
            .exists()
        {
            return Err(CgroupError::Unsupported { controller });
        }
    }
    Ok(())
}

/// The cgroups of one sandbox, one per controller, all at the same relative path.
#[derive(Debug)]
pub struct SandboxCgroup {
    relative: String,
}

impl SandboxCgroup {
    /// Makes the cgroups at `relative` (such as `shardbox/w1/sb-42`) with the given limits.
    ///
    /// # Errors
    /// [`CgroupError`] when a directory or limit file cannot be written.
    pub fn create(relative: &str, memory_bytes: u64, pids: u64) -> Result<Self, CgroupError> {
        let cgroup = SandboxCgroup {
            relative: relative.trim_matches('/').to_owned(),
        };
        for controller in CONTROLLERS {
            let dir = cgroup.dir(controller);
            std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        cgroup.set_memory_limit(memory_bytes)?;
        cgroup.write("pids", "pids.max", &pids.to_string())?;
        Ok(cgroup)
    }

    /// The path runsc is given as `cgroupsPath`.
    pub fn oci_path(&self) -> String {
        format!("/{}", self.relative)
    }

    fn dir(&self, controller: &str) -> PathBuf {
        Path::new(ROOT).join(controller).join(&self.relative)
    }

    fn write(&self, controller: &str, file: &str, value: &str) -> Result<(), CgroupError> {
        let path = self.dir(controller).join(file);
        std::fs::write(&path, value).map_err(io_err(&path))
    }

    fn read(&self, controller: &str, file: &str) -> Result<String, CgroupError> {
        let path = self.dir(controller).join(file);
        std::fs::read_to_string(&path).map_err(io_err(&path))
    }

    /// Sets the memory limit of the whole sandbox.
    ///
    /// # Errors
    /// [`CgroupError::Io`], for instance when the sandbox already uses more than `bytes`.
    pub fn set_memory_limit(&self, bytes: u64) -> Result<(), CgroupError> {
        self.write("memory", "memory.limit_in_bytes", &bytes.to_string())
    }

    /// Moves process `pid` (and so all it starts later) into every cgroup of the sandbox.
    ///
    /// # Errors
    /// [`CgroupError::Io`].
    pub fn add_process(&self, pid: u32) -> Result<(), CgroupError> {
        for controller in CONTROLLERS {
            self.write(controller, "cgroup.procs", &pid.to_string())?;
        }
        Ok(())
    }

    /// The paths of the `cgroup.procs` files, for a child to join between fork and exec.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        CONTROLLERS
            .iter()
            .map(|c| self.dir(c).join("cgroup.procs"))
            .collect()
    }

    /// How many times the kernel's out-of-memory killer struck in this sandbox.
    ///
    /// # Errors
    /// [`CgroupError::Io`].
    pub fn oom_kills(&self) -> Result<u64, CgroupError> {
        let text = self.read("memory", "memory.oom_control")?;
        Ok(field(&text, "oom_kill").unwrap_or(0))
    }

    /// How many times memory use reached the limit.
    ///
    /// # Errors
    /// [`CgroupError::Io`].
    pub fn memory_failcnt(&self) -> Result<u64, CgroupError> {
        Ok(self
            .read("memory", "memory.failcnt")?
            .trim()
            .parse()
            .unwrap_or(0))
    }

    /// How many times the pids limit refused the sandbox a new host process or thread.
    ///
    /// # Errors
    /// [`CgroupError::Io`].
    pub fn pids_refused(&self) -> Result<u64, CgroupError> {
        let text = self.read("pids", "pids.events")?;
        Ok(field(&text, "max").unwrap_or(0))
    }

    /// CPU time used by every process of the sandbox so far.
    ///
    /// # Errors
    /// [`CgroupError::Io`].
    pub fn cpu_time(&self) -> Result<Duration, CgroupError> {
        let nanos: u64 = self
            .read("cpuacct", "cpuacct.usage")?
            .trim()
            .parse()
            .unwrap_or(0);
        Ok(Duration::from_nanos(nanos))
    }

    /// Host processes now in the sandbox.
    pub fn pids(&self) -> Vec<i32> {
        self.read("pids", "cgroup.procs")
            .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Sends SIGKILL to every host process of the sandbox, again and again until none is left
    /// or `patience` runs out. Returns how many processes remained.
    pub async fn kill_all(&self, patience: Duration) -> usize {
        let until = tokio::time::Instant::now() + patience;
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                return 0;
            }
            for pid in &pids {
                // Only pids read from this sandbox's own cgroup are signalled.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            if tokio::time::Instant::now() >= until {
                return pids.len();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Removes the cgroups, in every hierarchy (runsc adds its own beside shardbox's when it
    /// is killed before it can clean up). They must hold no process any more.
    ///
    /// # Errors
    /// [`CgroupError::Io`] for the first directory that could not be removed.
    pub fn remove(&self) -> Result<(), CgroupError> {
        let mut first = Ok(());
        for hierarchy in hierarchies() {
            let dir = hierarchy.join(&self.relative);
            if let Err(source) = std::fs::remove_dir(&dir) {
                if source.kind() != std::io::ErrorKind::NotFound && first.is_ok() {
                    first = Err(CgroupError::Io { path: dir, source });
                }
            }
        }
        first
    }
}

/// Removes the cgroups left below `relative` by an earlier run: kills their processes and
/// removes the directories, deepest first. Returns how many sandbox cgroups were removed.
pub async fn remove_stale(relative: &str) -> usize {
    let mut names = std::collections::BTreeSet::new();
    for hierarchy in hierarchies() {
        let Ok(entries) = std::fs::read_dir(hierarchy.join(relative.trim_matches('/'))) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.path().is_dir() {
                names.insert(entry.file_name().to_string_lossy().into_owned());
            }
        }
    }
    let mut removed = 0;
    for name in names {
        let cgroup = SandboxCgroup {
            relative: format!("{}/{name}", relative.trim_matches('/')),
        };
        cgroup.kill_all(Duration::from_secs(2)).await;
        if cgroup.remove().is_ok() {
            removed += 1;
        }
    }
    removed
}

fn hierarchies() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(ROOT) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("cgroup.procs").exists() && !p.is_symlink())
        .collect()
}

fn field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(' ')?;
        (key == name).then(|| value.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_oom_kill_field() {
        let text = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(field(text, "oom_kill"), Some(3));
        assert_eq!(field(text, "missing"), None);
    }
}
