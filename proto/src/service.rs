//! Wire types of the scheduler's HTTP API (`scheduler/openapi.yaml` documents the routes).
//!
//! Clients submit batches and read results; workers register, lease jobs, send results and
//! heartbeats. A job inside a batch is named by `(batch, line)`: its batch id and its 1-based
//! line number in the submitted body, blank lines included in the count (as `shardbox run`
//! numbers them; blank lines themselves are skipped).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Header carrying the bearer token: `Authorization: Bearer <token>`.
pub const AUTHORIZATION: &str = "authorization";

/// What `POST /v1/batches` answers once every line of the body is on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchAccepted {
    /// The new batch's id.
    pub batch: u64,
    /// Non-blank lines read.
    pub lines: u64,
    /// Lines accepted as jobs (stored before this answer).
    pub accepted: u64,
    /// Lines that got an `invalid` result instead.
    pub invalid: u64,
}

/// Where a batch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchState {
    /// Its body is still being received; jobs already received may run.
    Receiving,
    /// Every line is received; some jobs have no result yet.
    Running,
    /// Every line has its result.
    Done,
}

/// `GET /v1/batches/{id}`: a batch's progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchStatus {
    /// The batch id.
    pub batch: u64,
    /// The name given at submission, if any.
    #[serde(default)]
    pub name: String,
    /// Higher runs first; batches of equal priority share workers fairly.
    pub priority: i32,
    /// Where it stands.
    pub state: BatchState,
    /// Whether it was cancelled (its jobs without results got `cancelled` ones).
    pub cancelled: bool,
    /// Whether its body ended early (a broken upload or a size limit); the lines received were
    /// kept.
    pub truncated: bool,
    /// Non-blank lines received.
    pub lines: u64,
    /// Lines accepted as jobs.
    pub accepted: u64,
    /// Lines that got `invalid` results.
    pub invalid: u64,
    /// Results written, `invalid` ones included; the results stream holds this many lines.
    pub results: u64,
    /// Jobs waiting for a worker.
    pub queued: u64,
    /// Jobs leased to a worker and not finished.
    pub leased: u64,
    /// Results by status name.
    pub statuses: BTreeMap<String, u64>,
    /// When the batch was created, in milliseconds since the Unix epoch.
    pub created_ms: u64,
}

/// `POST /v1/workers`: a worker announces the templates it serves.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterWorker {
    /// The worker's name, reported in results and logs.
    pub name: String,
    /// Template name to how many jobs the worker runs at once on it.
    pub templates: BTreeMap<String, u32>,
}

/// The answer to [`RegisterWorker`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Registered {
    /// Id to use in the worker's further requests.
    pub worker: String,
    /// A worker silent for this long loses its leased jobs to other workers.
    pub lease_ms: u64,
    /// How often the worker should send a heartbeat.
    pub heartbeat_ms: u64,
}

/// `POST /v1/workers/{id}/lease`: asks for jobs, waiting up to `wait_ms` when none are queued.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    /// Template name to the most jobs wanted of it.
    pub want: BTreeMap<String, u32>,
    /// Longest wait for a first job, in milliseconds (long polling); 0 answers at once.
    #[serde(default)]
    pub wait_ms: u64,
}

/// One leased job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeasedJob {
    /// Its batch.
    pub batch: u64,
    /// Its 1-based line in the batch.
    pub line: u64,
    /// The template it runs on (the scheduler's default filled in).
    pub template: String,
    /// Which attempt this is, from 1.
    pub attempt: u32,
    /// How long it waited in the scheduler's queue, in milliseconds.
    pub queued_ms: u64,
    /// The job as submitted (a [`crate::Job`]).
    pub job: Box<RawValue>,
}

/// The answer to [`LeaseRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Leased {
    /// The jobs now leased to the worker, possibly none.
    pub jobs: Vec<LeasedJob>,
}

/// One finished job, sent by the worker that ran it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinishedJob {
    /// Its batch.
    pub batch: u64,
    /// Its 1-based line in the batch.
    pub line: u64,
    /// The result's status, repeated here so the scheduler need not read the whole result;
    /// read from `result` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<crate::Status>,
    /// Its result (a [`crate::JobResult`]).
    pub result: Box<RawValue>,
}

/// `POST /v1/workers/{id}/results`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResultsRequest {
    /// Finished jobs, in any order.
    pub results: Vec<FinishedJob>,
}

/// The answer to [`ResultsRequest`], sent once the new results are on disk.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ResultsAccepted {
    /// Results recorded.
    pub recorded: u64,
    /// Results for jobs that already had one (counted once, the later one dropped).
    pub duplicates: u64,
    /// Results naming no known job.
    pub unknown: u64,
}

/// The answer to `POST /v1/workers/{id}/heartbeat`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Jobs the scheduler holds as leased to this worker.
    pub leased: u64,
}

/// The body of every error answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong, in words meant for the user.
    pub error: String,
    /// For a batch cut short: its id; the lines accepted before the error are kept and run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<u64>,
    /// For a batch cut short: how many lines were accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted: Option<u64>,
    /// When to try again, for refusals under load, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}
