//! The scheduler service's configuration: a TOML file with a `[scheduler]` table.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Environment variable adding a client token (comma-separated for several).
pub const CLIENT_TOKEN_ENV: &str = "SHARDBOX_CLIENT_TOKEN";
/// Environment variable adding a worker token (comma-separated for several).
pub const WORKER_TOKEN_ENV: &str = "SHARDBOX_WORKER_TOKEN";

/// The configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceFile {
    /// The service's settings.
    pub scheduler: ServiceConfig,
}

/// Settings of `shardbox scheduler`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Address the HTTP API listens on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Directory of the durable store.
    pub data_dir: PathBuf,
    /// Template of jobs that name none.
    #[serde(default = "default_template")]
    pub default_template: String,
    /// Templates jobs may name; any name when empty. Jobs naming another get `invalid`.
    #[serde(default)]
    pub templates: Vec<String>,
    /// Bearer tokens accepted from clients (batches, results); more come from
    /// `SHARDBOX_CLIENT_TOKEN`.
    #[serde(default)]
    pub client_tokens: Vec<String>,
    /// Bearer tokens accepted from workers; more come from `SHARDBOX_WORKER_TOKEN`.
    #[serde(default)]
    pub worker_tokens: Vec<String>,
    /// A worker silent this long loses its leased jobs to others.
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
    /// Times a job is handed to a worker before it ends `sandbox_error`.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Largest batch body, in bytes; the lines before the limit are kept.
    #[serde(default = "default_max_batch_bytes")]
    pub max_batch_bytes: u64,
    /// Longest batch line, in bytes; longer lines get `invalid` results.
    #[serde(default = "default_max_line_bytes")]
    pub max_line_bytes: usize,
    /// Largest request body of a worker (results), in bytes.
    #[serde(default = "default_max_request_bytes")]
    pub max_request_bytes: usize,
    /// Jobs stored per group commit of an upload.
    #[serde(default = "default_commit_jobs")]
    pub commit_jobs: usize,
    /// Shards per template queue.
    #[serde(default = "default_shards")]
    pub shards: usize,
    /// Longest a lease request waits for jobs, in milliseconds.
    #[serde(default = "default_max_wait_ms")]
    pub max_wait_ms: u64,
    /// Batch uploads served at once; more are refused at once with a retry hint (503).
    #[serde(default = "default_max_requests")]
    pub max_requests: usize,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7700))
}
fn default_template() -> String {
    "python".into()
}
fn default_lease_ms() -> u64 {
    10_000
}
fn default_max_attempts() -> u32 {
    3
}
fn default_max_batch_bytes() -> u64 {
    16 << 30
}
fn default_max_line_bytes() -> usize {
    crate::batch::DEFAULT_MAX_LINE_BYTES
}
fn default_max_request_bytes() -> usize {
    256 << 20
}
fn default_commit_jobs() -> usize {
    16_384
}
fn default_shards() -> usize {
    4
}
fn default_max_wait_ms() -> u64 {
    20_000
}
fn default_max_requests() -> usize {
    1024
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ServiceConfigError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid configuration.
    #[error("invalid scheduler configuration {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: toml::de::Error,
    },
    /// A setting is out of range.
    #[error("invalid scheduler configuration: {0}")]
    Invalid(String),
}

impl ServiceConfig {
    /// Reads `path`, then adds tokens from the environment and checks the settings.
    ///
    /// # Errors
    /// [`ServiceConfigError`] naming the file and the problem.
    pub fn load(path: &Path) -> Result<ServiceConfig, ServiceConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ServiceConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let file: ServiceFile =
            toml::from_str(&text).map_err(|source| ServiceConfigError::Parse {
                path: path.to_owned(),
                source,
            })?;
        let mut config = file.scheduler;
        config.add_env_tokens();
        config.check()?;
        Ok(config)
    }

    /// Adds the tokens of `SHARDBOX_CLIENT_TOKEN` and `SHARDBOX_WORKER_TOKEN`.
    pub fn add_env_tokens(&mut self) {
        for (var, list) in [
            (CLIENT_TOKEN_ENV, &mut self.client_tokens),
            (WORKER_TOKEN_ENV, &mut self.worker_tokens),
        ] {
            if let Ok(value) = std::env::var(var) {
                list.extend(
                    value
                        .split(',')
                        .map(str::trim)
                        .filter(|t| !t.is_empty())
                        .map(String::from),
                );
            }
        }
    }

    /// Checks the settings.
    ///
    /// # Errors
    /// [`ServiceConfigError::Invalid`] naming the setting.
    pub fn check(&self) -> Result<(), ServiceConfigError> {
        let invalid = |what: &str| Err(ServiceConfigError::Invalid(what.to_string()));
        if self.client_tokens.is_empty() {
            return invalid("no client token: set client_tokens or SHARDBOX_CLIENT_TOKEN");
        }
        if self.worker_tokens.is_empty() {
            return invalid("no worker token: set worker_tokens or SHARDBOX_WORKER_TOKEN");
        }
        if self
            .client_tokens
            .iter()
            .chain(&self.worker_tokens)
            .any(|t| t.len() < 16)
        {
            return invalid("tokens must be at least 16 characters long");
        }
        if self.lease_ms < 100 {
            return invalid("lease_ms must be at least 100");
        }
        if self.max_attempts == 0 {
            return invalid("max_attempts must be at least 1");
        }
        if self.commit_jobs == 0 || self.shards == 0 || self.max_requests == 0 {
            return invalid("commit_jobs, shards and max_requests must be at least 1");
        }
        Ok(())
    }

    /// A configuration for tests and benchmarks: store in `data_dir`, the given tokens.
    pub fn for_tests(data_dir: &Path, client_token: &str, worker_token: &str) -> Self {
        ServiceConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: data_dir.to_owned(),
            default_template: default_template(),
            templates: Vec::new(),
            client_tokens: vec![client_token.into()],
            worker_tokens: vec![worker_token.into()],
            lease_ms: default_lease_ms(),
            max_attempts: default_max_attempts(),
            max_batch_bytes: default_max_batch_bytes(),
            max_line_bytes: default_max_line_bytes(),
            max_request_bytes: default_max_request_bytes(),
            commit_jobs: default_commit_jobs(),
            shards: default_shards(),
            max_wait_ms: default_max_wait_ms(),
            max_requests: default_max_requests(),
        }
    }
}
