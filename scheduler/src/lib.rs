//! The shardbox scheduler: takes a batch of jobs, queues them per template, hands them to a
//! worker's warm sandboxes and writes their results. `shardbox run` is this crate with one local
//! worker in the same process.
//!
//! - [`client`]: [`ApiClient`], the typed HTTP client of the scheduler service.
//! - [`agent`]: [`run_agent`], the pull loop of `shardbox worker`, over an [`Executor`]
//!   (the real worker, or the simulated executor that runs no code).
//! - [`run`]: [`run_batch`], the reader, per-template dispatchers, run tasks and result writer.
//! - [`backend`]: [`Backend`], what the scheduler needs from a worker; implemented by
//!   [`shardbox_worker::Worker`].
//! - [`batch`]: reading a JSONL batch line by line, with line numbers and a length cap.
//! - [`stop`]: [`Stop`], the two-step stop (drain, then abort) driven by signals.
//! - [`summary`]: [`Summary`], counts per status, throughput, start latency, pass@1.
//! - [`progress`]: the progress bar on stderr.
//! - [`exit`]: the process exit codes of the `shardbox` binary.
//! - [`plan`]: `shardbox plan`, capacity planning: the real queue driven by simulated nodes
//!   under a virtual clock.
//! - [`service`]: `shardbox scheduler`, the scheduler as an HTTP service over a durable store,
//!   serving remote workers with leases.
//!
//! The binary (`src/main.rs`) only parses arguments, starts the worker, wires signals to
//! [`Stop`] and maps errors to [`exit`] codes.

pub mod agent;
pub mod backend;
pub mod batch;
pub mod client;
pub mod exit;
pub mod plan;
pub mod progress;
pub mod run;
pub mod service;
pub mod stop;
pub mod summary;

pub use agent::{run_agent, AgentError, AgentOptions, AgentReport, Executor};
pub use backend::Backend;
pub use client::{ApiClient, ClientError};
pub use run::{run_batch, RunError, RunOptions};
pub use stop::{Stop, StopLevel};
pub use summary::Summary;
