//! The shardbox worker: runs jobs in gVisor sandboxes restored from checkpoints of warmed-up
//! templates.
//!
//! - [`config`]: the TOML configuration (worker, runsc, templates).
//! - [`runsc`]: the driver for gVisor's `runsc`, with its own state directory.
//! - [`bundle`]: OCI bundles generated with `oci-spec`.
//! - [`cgroup`]: host cgroups per sandbox: limits, OOM and CPU accounting, killing.
//! - [`template`]: template builds, checkpoint cache, restore-versus-cold measurement.
//! - [`sandbox`]: one sandbox's life: start, wake, one job, teardown.
//! - [`pool`]: warm pools refilled in the background.
//! - [`process`]: process isolation: jobs as processes in warm sandboxes of one trust domain.
//! - [`worker`]: the [`Worker`] tying these together, from a job to its result.
//!
//! The in-sandbox side is `worker/entry/entry.py`, embedded in the binary.

pub mod bundle;
pub mod cgroup;
pub mod config;
pub mod pool;
pub mod process;
pub mod runsc;
pub mod sandbox;
mod sys;
pub mod template;
pub mod worker;

pub use config::WorkerConfig;
pub use worker::{PreparedJob, Slot, Worker, WorkerError, DEFAULT_DOMAIN};
