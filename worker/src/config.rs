//! Worker configuration, read from TOML: where state lives, how `runsc` is called, and the
//! environment templates this worker serves.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The configuration file shipped with shardbox and embedded in the binary.
pub const EMBEDDED_CONFIG: &str = include_str!("../../configs/shardbox.toml");

/// Everything a worker needs to know.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// This worker's own settings.
    #[serde(default)]
    pub worker: WorkerSection,
    /// How `runsc` is invoked.
    #[serde(default)]
    pub runsc: RunscConfig,
    /// Environment templates by name.
    pub templates: BTreeMap<String, TemplateConfig>,
}

/// Settings of the worker process itself.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSection {
    /// Name reported in results; the host name when empty.
    #[serde(default)]
    pub name: String,
    /// Directory for runsc state, bundles and checkpoint images. Everything under it belongs
    /// to this worker; containers left there by an earlier run are deleted at start.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Template used by jobs that name none.
    #[serde(default = "default_template")]
    pub default_template: String,
}

impl Default for WorkerSection {
    fn default() -> Self {
        WorkerSection {
            name: String::new(),
            state_dir: default_state_dir(),
            default_template: default_template(),
        }
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/shardbox")
}

fn default_template() -> String {
    "python".into()
}

/// How `runsc` is called.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunscConfig {
    /// The runsc binary, a path or a name looked up in `PATH`.
    #[serde(default = "default_runsc")]
    pub binary: PathBuf,
    /// gVisor platform; `ptrace` works everywhere, `kvm` needs /dev/kvm and a kernel that allows
    /// it (it hangs on the machines shardbox was first built on).
    #[serde(default = "default_platform")]
    pub platform: String,
    /// Network mode; `none` gives each sandbox only a loopback device.
    #[serde(default = "default_network")]
    pub network: String,
    /// Further global flags passed to every runsc call, such as `--debug`.
    #[serde(default)]
    pub extra_flags: Vec<String>,
}

impl Default for RunscConfig {
    fn default() -> Self {
        RunscConfig {
            binary: default_runsc(),
            platform: default_platform(),
            network: default_network(),
            extra_flags: Vec::new(),
        }
    }
}

fn default_runsc() -> PathBuf {
    PathBuf::from("runsc")
}

fn default_platform() -> String {
    "ptrace".into()
}

fn default_network() -> String {
    "none".into()
}

/// What a template's entrypoint expects from a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TemplateKind {
    /// Jobs carry `code`, run by the warm Python interpreter.
    Python,
    /// Jobs carry `argv`, executed as given.
    Exec,
}

/// One environment template: a root filesystem, an entrypoint that warms up and then waits for a
/// job, a pool size and limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateConfig {
    /// What jobs of this template carry.
    pub kind: TemplateKind,
    /// Root filesystem directory, mounted read-only with an in-memory overlay for writes. May be
    /// overridden by the `SHARDBOX_ROOTFS` environment variable.
    pub rootfs: PathBuf,
    /// Entrypoint argv; empty for shardbox's own entry script for the template's kind.
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// Python modules the entry script imports during warm-up, beside its standard set.
    #[serde(default)]
    pub preload: Vec<String>,
    /// Environment of the entrypoint (and so of every job).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory of jobs, an in-memory directory inside the sandbox.
    #[serde(default = "default_workdir")]
    pub workdir: String,
    /// User id and group id inside the sandbox.
    #[serde(default)]
    pub user: UserConfig,
    /// How long booting may take before the template counts as broken, in milliseconds.
    #[serde(default = "default_ready_timeout_ms")]
    pub ready_timeout_ms: u64,
    /// Warm pool sizing.
    #[serde(default)]
    pub pool: PoolConfig,
    /// Limits: each is the default for jobs of this template and the most a job may ask for.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// How jobs are kept apart: a sandbox each (`sandbox`, the default) or a process each
    /// inside warm sandboxes that serve one trust domain (`process`).
    #[serde(default)]
    pub isolation: Isolation,
    /// Settings of process isolation.
    #[serde(default)]
    pub process: ProcessConfig,
}

impl TemplateConfig {
    /// Memory limit of one whole sandbox of this template, in MiB: the job limit in sandbox
    /// mode; room for every slot plus the supervisor in process mode.
    pub fn sandbox_memory_mb(&self) -> u64 {
        match self.isolation {
            Isolation::Sandbox => self.limits.memory_mb,
            Isolation::Process => self.limits.memory_mb * self.process.slots as u64 + 256,
        }
    }

    /// Host task limit of one whole sandbox.
    pub fn sandbox_pids(&self) -> u64 {
        match self.isolation {
            Isolation::Sandbox => self.limits.pids,
            // Inside, a pids cgroup per job holds each job to `pids`. Under the ptrace platform
            // each process inside is backed by host threads, about 7 measured at rest, and a
            // fork bomb held at its limit adds about 220 a second until it is ended (half a second
            // at the limit): room for both.
            Isolation::Process => self.limits.pids * self.process.slots as u64 * 8 + 1024,
        }
    }
}

/// How the jobs of a template are kept apart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// One restored sandbox per job, destroyed after it.
    #[default]
    Sandbox,
    /// One process per job, under a user id of its own, inside a warm sandbox that serves only
    /// jobs of one trust domain.
    Process,
}

/// Settings of process isolation.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessConfig {
    /// Jobs one sandbox runs at once.
    #[serde(default = "default_slots")]
    pub slots: usize,
    /// Jobs after which a sandbox is recycled.
    #[serde(default = "default_jobs_per_sandbox")]
    pub jobs_per_sandbox: usize,
    /// Sandboxes one trust domain may hold at once; past that its jobs wait for a free slot.
    /// Each sandbox costs a restore and memory; each adds a supervisor working in parallel.
    #[serde(default = "default_sandboxes_per_domain")]
    pub sandboxes_per_domain: usize,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        ProcessConfig {
            slots: default_slots(),
            jobs_per_sandbox: default_jobs_per_sandbox(),
            sandboxes_per_domain: default_sandboxes_per_domain(),
        }
    }
}

fn default_slots() -> usize {
    4
}

fn default_jobs_per_sandbox() -> usize {
    500
}

fn default_sandboxes_per_domain() -> usize {
    2
}

fn default_workdir() -> String {
    "/work".into()
}

fn default_ready_timeout_ms() -> u64 {
    60_000
}

/// User and group inside the sandbox.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// User id.
    #[serde(default)]
    pub uid: u32,
    /// Group id.
    #[serde(default)]
    pub gid: u32,
}

/// How many restored sandboxes a template keeps waiting.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// The pool refills whenever fewer than this many sandboxes are idle.
    #[serde(default = "default_min_idle")]
    pub min_idle: usize,
    /// The pool never holds more idle sandboxes than this.
    #[serde(default = "default_max_idle")]
    pub max_idle: usize,
    /// How many restores (or cold boots) may run at once while refilling.
    #[serde(default = "default_in_flight")]
    pub max_in_flight: usize,
    /// How to fill the pool: `auto` measures both ways at build and takes the cheaper one.
    #[serde(default)]
    pub fill: FillPolicy,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            min_idle: default_min_idle(),
            max_idle: default_max_idle(),
            max_in_flight: default_in_flight(),
            fill: FillPolicy::Auto,
        }
    }
}

fn default_min_idle() -> usize {
    2
}

fn default_max_idle() -> usize {
    4
}

fn default_in_flight() -> usize {
    2
}

/// How a pool makes fresh sandboxes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FillPolicy {
    /// Measure both at build, use whichever costs less CPU.
    #[default]
    Auto,
    /// Always restore from the checkpoint.
    Restore,
    /// Always boot the template cold.
    Cold,
}

/// Limits of a template's jobs.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Wall-time limit in milliseconds, from the handoff.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Memory of the whole sandbox in MiB (the interpreter and gVisor's own use included).
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
    /// Host tasks the sandbox may hold (gVisor's own threads included).
    #[serde(default = "default_pids")]
    pub pids: u64,
    /// Cap on each output stream, in bytes.
    #[serde(default = "default_max_output_bytes")]
    pub max_output_bytes: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            timeout_ms: default_timeout_ms(),
            memory_mb: default_memory_mb(),
            pids: default_pids(),
            max_output_bytes: default_max_output_bytes(),
        }
    }
}

fn default_timeout_ms() -> u64 {
    30_000
}

fn default_memory_mb() -> u64 {
    512
}

fn default_pids() -> u64 {
    256
}

fn default_max_output_bytes() -> u64 {
    1 << 20
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The text is not a valid configuration.
    #[error("invalid config {origin}: {message}")]
    Parse {
        /// File name or `embedded`.
        origin: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// The text parses but makes no sense.
    #[error("invalid config {origin}: {message}")]
    Invalid {
        /// File name or `embedded`.
        origin: String,
        /// What is wrong.
        message: String,
    },
}

impl WorkerConfig {
    /// The configuration embedded in the binary.
    ///
    /// # Errors
    /// Only if the embedded file is broken, which the tests rule out.
    pub fn embedded() -> Result<Self, ConfigError> {
        Self::parse(EMBEDDED_CONFIG, "embedded")
    }

    /// Reads a configuration file.
    ///
    /// # Errors
    /// [`ConfigError`] when the file cannot be read or is not valid.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and checks configuration text; `origin` names it in errors. Applies the
    /// `SHARDBOX_ROOTFS` override to every template.
    ///
    /// # Errors
    /// [`ConfigError::Parse`] or [`ConfigError::Invalid`].
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let mut config: WorkerConfig = toml::from_str(text).map_err(|err| ConfigError::Parse {
            origin: origin.into(),
            message: err.to_string().trim_end().to_owned(),
        })?;
        if let Some(rootfs) = std::env::var_os("SHARDBOX_ROOTFS") {
            for template in config.templates.values_mut() {
                template.rootfs = PathBuf::from(&rootfs);
            }
        }
        config.check().map_err(|message| ConfigError::Invalid {
            origin: origin.into(),
            message,
        })?;
        Ok(config)
    }

    fn check(&self) -> Result<(), String> {
        if self.templates.is_empty() {
            return Err("no templates are declared".into());
        }
        if !self.templates.contains_key(&self.worker.default_template) {
            return Err(format!(
                "default template {:?} is not declared",
                self.worker.default_template
            ));
        }
        for (name, t) in &self.templates {
            let bad = |what: &str| Err(format!("template {name:?}: {what}"));
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                return bad("names may hold only letters, digits and '-'");
            }
            if t.pool.max_idle == 0 || t.pool.min_idle > t.pool.max_idle {
                return bad("pool needs 0 <= min_idle <= max_idle and max_idle >= 1");
            }
            if t.pool.max_in_flight == 0 {
                return bad("pool.max_in_flight must be at least 1");
            }
            if t.limits.timeout_ms == 0 || t.limits.max_output_bytes == 0 || t.limits.pids == 0 {
                return bad("limits must be above 0");
            }
            if t.limits.memory_mb < 64 {
                return bad("limits.memory_mb must be at least 64 (gVisor itself needs some)");
            }
            if t.process.slots == 0
                || t.process.jobs_per_sandbox == 0
                || t.process.sandboxes_per_domain == 0
            {
                return bad(
                    "process.slots, jobs_per_sandbox and sandboxes_per_domain must be at \
                            least 1",
                );
            }
            if t.isolation == Isolation::Process && t.workdir != "/work" {
                return bad("process isolation keeps job directories under /work");
            }
            if !t.workdir.starts_with('/') || t.workdir == "/" {
                return bad("workdir must be an absolute path other than /");
            }
        }
        Ok(())
    }

    /// The worker's name: the configured one or the host name.
    pub fn worker_name(&self) -> String {
        if !self.worker.name.is_empty() {
            return self.worker.name.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "worker".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_config_is_valid() {
        let config = WorkerConfig::embedded().unwrap();
        assert!(config.templates.contains_key("python"));
        assert!(config.templates.contains_key("exec"));
        assert_eq!(config.templates["exec"].kind, TemplateKind::Exec);
    }

    #[test]
    fn unknown_field_error_names_the_field_and_line() {
        let text = "[templates.python]\nkind = \"python\"\nrootfs = \"/r\"\nmemroy_mb = 5\n";
        let err = WorkerConfig::parse(text, "t.toml").unwrap_err().to_string();
        assert!(err.starts_with("invalid config t.toml: "), "{err}");
        assert!(err.contains("unknown field `memroy_mb`"), "{err}");
        assert!(err.contains("line 4"), "{err}");
    }

    #[test]
    fn bad_pool_and_missing_default_are_reported() {
        let text = "[templates.python]\nkind = \"python\"\nrootfs = \"/r\"\n\
                    [templates.python.pool]\nmin_idle = 5\nmax_idle = 2\n";
        let err = WorkerConfig::parse(text, "t").unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid config t: template \"python\": pool needs 0 <= min_idle <= max_idle and \
             max_idle >= 1"
        );
        let text = "[templates.other]\nkind = \"exec\"\nrootfs = \"/r\"\n";
        let err = WorkerConfig::parse(text, "t").unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid config t: default template \"python\" is not declared"
        );
    }
}
