//! Wire types of shardbox: the job a user submits and the result it gets back.
//!
//! - [`Job`]: one line of a JSONL batch, parsed strictly by [`parse_job_line`].
//! - [`JobResult`], [`Status`], [`Timing`]: one line of a results file.
//! - [`Limits`]: the wall-time, memory and output limits a job runs under.
//! - [`service`]: requests and answers of the scheduler's HTTP API.
//!
//! These types are the contract shared by `shardbox run`, the scheduler and the worker; field
//! names here are what users see in their JSON.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub mod service;

/// Longest accepted job id, in bytes.
pub const MAX_ID_BYTES: usize = 256;

/// One rollout job: a program to run in a sandbox and what to give it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Job {
    /// Caller-chosen id, unique within a batch.
    pub id: String,
    /// Template name; the configuration's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Program text, for templates that run code (`python`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Command line, for templates that run a command (`exec`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    /// Bytes given to the job on its standard input.
    #[serde(default)]
    pub stdin: String,
    /// Files written into the job's work directory before it runs: relative path to text.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Wall-time limit in milliseconds, at most the template's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Memory limit in MiB, at most the template's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    /// Cap on each of stdout and stderr, in bytes, at most the template's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_bytes: Option<u64>,
    /// Caller data passed through to the result untouched.
    #[serde(default)]
    pub labels: serde_json::Map<String, serde_json::Value>,
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The program exited with status 0.
    Ok,
    /// The program exited with a non-zero status or was killed by a signal of its own making.
    Failed,
    /// The program ran past its wall-time limit and was killed.
    Timeout,
    /// The program went over its memory limit.
    MemoryLimit,
    /// The program wrote more than its output cap (output past the cap was discarded).
    OutputLimit,
    /// A fault of shardbox or the sandbox rather than of the job.
    SandboxError,
    /// The job was cancelled before it finished.
    Cancelled,
    /// The job was rejected before it ran; `error` says why.
    Invalid,
}

impl Status {
    /// Every status, in a fixed order (for summaries and metrics labels).
    pub const ALL: [Status; 8] = [
        Status::Ok,
        Status::Failed,
        Status::Timeout,
        Status::MemoryLimit,
        Status::OutputLimit,
        Status::SandboxError,
        Status::Cancelled,
        Status::Invalid,
    ];

    /// The name used on the wire, such as `memory_limit`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Failed => "failed",
            Status::Timeout => "timeout",
            Status::MemoryLimit => "memory_limit",
            Status::OutputLimit => "output_limit",
            Status::SandboxError => "sandbox_error",
            Status::Cancelled => "cancelled",
            Status::Invalid => "invalid",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a job's time went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Timing {
    /// From the job being accepted to a worker taking it.
    pub queue_ms: u64,
    /// From the worker taking the job to its input being fully written into a running sandbox.
    pub start_us: u64,
    /// From the handoff to the job's exit and end of output.
    pub run_ms: u64,
    /// From acceptance to the result.
    pub total_ms: u64,
    /// CPU time the sandbox used while running the job, in milliseconds.
    pub cpu_ms: u64,
}

/// The outcome of one job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    /// The job's id.
    pub id: String,
    /// How it ended.
    pub status: Status,
    /// The program's exit status, when it exited by itself.
    pub exit_code: Option<i32>,
    /// The signal that ended the program, when one did.
    pub signal: Option<i32>,
    /// Standard output, up to the cap; bytes that are not UTF-8 are replaced.
    pub stdout: String,
    /// Standard error, up to the cap; bytes that are not UTF-8 are replaced.
    pub stderr: String,
    /// Whether stdout went over the cap.
    pub stdout_truncated: bool,
    /// Whether stderr went over the cap.
    pub stderr_truncated: bool,
    /// How many bytes the program wrote to stdout in all.
    pub stdout_bytes: u64,
    /// How many bytes the program wrote to stderr in all.
    pub stderr_bytes: u64,
    /// Where the time went.
    pub timing: Timing,
    /// The worker that ran the job.
    pub worker: String,
    /// How many times the job was handed to a worker.
    pub attempts: u32,
    /// The job's labels, untouched.
    pub labels: serde_json::Map<String, serde_json::Value>,
    /// Why the job is `invalid`, `sandbox_error` or `cancelled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The job's line number in its batch (1-based).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
}

impl JobResult {
    /// A result with no output, for jobs that never ran (`invalid`, `cancelled`,
    /// `sandbox_error`).
    pub fn without_run(id: impl Into<String>, status: Status, error: impl Into<String>) -> Self {
        JobResult {
            id: id.into(),
            status,
            exit_code: None,
            signal: None,
            stdout: String::new(),
            stderr: String::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            stdout_bytes: 0,
            stderr_bytes: 0,
            timing: Timing::default(),
            worker: String::new(),
            attempts: 0,
            labels: serde_json::Map::new(),
            error: Some(error.into()),
            line: None,
        }
    }
}

/// The limits one job runs under, after the template's defaults and maxima are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Wall-time limit, from the handoff.
    pub timeout_ms: u64,
    /// Memory limit of the whole sandbox, in MiB.
    pub memory_mb: u64,
    /// Cap on each output stream, in bytes.
    pub max_output_bytes: u64,
}

/// Why a batch line is not a job.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct InvalidJob {
    /// 1-based line number in the batch.
    pub line: u64,
    /// The job's id, when one could be read.
    pub id: Option<String>,
    /// What is wrong, in words meant for the user.
    pub reason: String,
}

impl InvalidJob {
    /// The `invalid` result this line gets. A line without a readable id gets `line-N`.
    pub fn to_result(&self) -> JobResult {
        let id = self
            .id
            .clone()
            .unwrap_or_else(|| format!("line-{}", self.line));
        let mut result = JobResult::without_run(id, Status::Invalid, self.to_string());
        result.line = Some(self.line);
        result
    }
}

/// Parses and checks one batch line (1-based `line`). Template-specific checks (whether the
/// template exists, `code` against `argv`, limits against its maxima) are the worker's.
///
/// # Errors
/// [`InvalidJob`] naming the line and what is wrong: malformed JSON, an unknown field, a missing
/// or oversized id, a file path that is not a plain relative path, a bad environment name.
pub fn parse_job_line(text: &str, line: u64) -> Result<Job, InvalidJob> {
    let invalid = |id: Option<String>, reason: String| InvalidJob { line, id, reason };
    // serde would also take a JSON array, field by field in order, as a job.
    if !text.trim_start().starts_with('{') {
        return Err(invalid(
            None,
            "malformed job: a job is a JSON object".into(),
        ));
    }
    let job: Job = match serde_json::from_str(text) {
        Ok(job) => job,
        Err(err) => {
            // Recover the id, if the line is JSON at all, so the result can be matched up.
            let id = serde_json::from_str::<serde_json::Value>(text)
                .ok()
                .and_then(|v| v.get("id").and_then(|id| id.as_str()).map(str::to_owned))
                .filter(|id| valid_id(id).is_ok());
            return Err(invalid(id, format!("malformed job: {err}")));
        }
    };
    if let Err(reason) = valid_id(&job.id) {
        return Err(invalid(None, reason));
    }
    let with_id = |reason: String| invalid(Some(job.id.clone()), reason);
    for path in job.files.keys() {
        check_relative_path(path).map_err(|why| with_id(format!("file {path:?}: {why}")))?;
    }
    for name in job.env.keys() {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            return Err(with_id(format!(
                "environment variable name {name:?} is not valid"
            )));
        }
    }
    for (name, value) in &job.env {
        if value.contains('\0') {
            return Err(with_id(format!(
                "environment variable {name} contains a NUL byte"
            )));
        }
    }
    if let Some(argv) = &job.argv {
        if argv.is_empty() || argv[0].is_empty() {
            return Err(with_id("argv must name a program".into()));
        }
        if argv.iter().any(|a| a.contains('\0')) {
            return Err(with_id("argv contains a NUL byte".into()));
        }
    }
    for (name, value) in [
        ("timeout_ms", job.timeout_ms),
        ("memory_mb", job.memory_mb),
        ("max_output_bytes", job.max_output_bytes),
    ] {
        if value == Some(0) {
            return Err(with_id(format!("{name} must be above 0")));
        }
    }
    Ok(job)
}

fn valid_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("job id is empty".into());
    }
    if id.len() > MAX_ID_BYTES {
        return Err(format!("job id is longer than {MAX_ID_BYTES} bytes"));
    }
    if id.chars().any(char::is_control) {
        return Err("job id contains a control character".into());
    }
    Ok(())
}

/// Checks that `path` is a plain relative path that stays inside the work directory.
///
/// # Errors
/// Why the path is refused, in words meant for the user.
pub fn check_relative_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("path is empty");
    }
    if path.starts_with('/') {
        return Err("path must be relative");
    }
    if path.contains('\0') {
        return Err("path contains a NUL byte");
    }
    if path.len() > 4096 {
        return Err("path is too long");
    }
    for part in path.split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return Err("path must not contain empty, '.' or '..' parts");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_array_is_not_a_job() {
        for line in [r#"["a", null, "print(1)"]"#, "[]", " 7", "\"x\"", "null"] {
            let err = parse_job_line(line, 4).unwrap_err();
            assert_eq!(err.line, 4);
            assert!(
                err.reason.contains("a job is a JSON object"),
                "{line}: {err}"
            );
        }
    }

    #[test]
    fn parses_a_full_job() {
        let line = r#"{"id":"a1","template":"python","code":"print(1)","stdin":"x",
            "files":{"dir/f.txt":"hi"},"env":{"K":"V"},"timeout_ms":5,"memory_mb":64,
            "max_output_bytes":10,"labels":{"problem":"p/1"}}"#
            .replace('\n', "");
        let job = parse_job_line(&line, 1).unwrap();
        assert_eq!(job.id, "a1");
        assert_eq!(job.template.as_deref(), Some("python"));
        assert_eq!(job.files["dir/f.txt"], "hi");
        assert_eq!(job.labels["problem"], "p/1");
        assert_eq!(job.timeout_ms, Some(5));
    }

    #[test]
    fn malformed_json_keeps_line_and_id() {
        let err = parse_job_line(r#"{"id":"x","code":1}"#, 7).unwrap_err();
        assert_eq!(err.line, 7);
        assert_eq!(err.id.as_deref(), Some("x"));
        assert!(err.reason.starts_with("malformed job:"), "{}", err.reason);
        let err = parse_job_line("not json", 3).unwrap_err();
        assert_eq!(err.id, None);
        let result = err.to_result();
        assert_eq!(result.id, "line-3");
        assert_eq!(result.status, Status::Invalid);
        assert_eq!(result.line, Some(3));
        assert!(result.error.unwrap().starts_with("line 3: malformed job"));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = parse_job_line(r#"{"id":"x","timeout":5}"#, 1).unwrap_err();
        assert!(
            err.reason.contains("unknown field `timeout`"),
            "{}",
            err.reason
        );
    }

    #[test]
    fn bad_paths_are_refused() {
        for path in ["/etc/passwd", "../x", "a/../../b", "a//b", "./a", ""] {
            let line = serde_json::json!({"id": "p", "files": {path: "x"}}).to_string();
            let err = parse_job_line(&line, 1).unwrap_err();
            assert_eq!(err.id.as_deref(), Some("p"), "{path}");
        }
        assert!(check_relative_path("a/b/c.py").is_ok());
    }

    #[test]
    fn bad_ids_env_argv_and_zero_limits_are_refused() {
        let cases = [
            r#"{"id":""}"#.to_string(),
            serde_json::json!({"id": "x".repeat(300)}).to_string(),
            r#"{"id":"a","env":{"A=B":"c"}}"#.to_string(),
            r#"{"id":"a","argv":[]}"#.to_string(),
            r#"{"id":"a","timeout_ms":0}"#.to_string(),
        ];
        for line in cases {
            assert!(parse_job_line(&line, 1).is_err(), "{line}");
        }
    }

    #[test]
    fn result_round_trips_with_snake_case_status() {
        let mut result = JobResult::without_run("j", Status::MemoryLimit, "over");
        result.attempts = 2;
        let text = serde_json::to_string(&result).unwrap();
        assert!(text.contains(r#""status":"memory_limit""#), "{text}");
        assert!(!text.contains(r#""line""#));
        let back: JobResult = serde_json::from_str(&text).unwrap();
        assert_eq!(back, result);
    }
}
