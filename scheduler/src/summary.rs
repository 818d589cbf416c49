//! The summary of a run: counts per status, throughput, start latency and pass@1.

use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;
use shardbox_proto::{JobResult, Status};

/// The label that marks a job as one sample of a problem (HumanEval batches carry it); pass@1
/// is reported over the jobs that have it.
pub const PROBLEM_LABEL: &str = "problem";

/// Highest start latency the histogram tells apart, in microseconds (one hour).
const MAX_START_US: u64 = 3_600_000_000;

/// What a run produced, built up one result at a time.
#[derive(Debug, Clone)]
pub struct Summary {
    counts: [u64; Status::ALL.len()],
    start_us: Histogram<u64>,
    labelled: u64,
    labelled_ok: u64,
    /// Wall time of the run, set when it ends.
    pub wall: Duration,
}

impl Default for Summary {
    fn default() -> Self {
        Self::new()
    }
}

impl Summary {
    /// An empty summary.
    pub fn new() -> Self {
        Summary {
            counts: [0; Status::ALL.len()],
            start_us: Histogram::new_with_bounds(1, MAX_START_US, 3)
                .expect("histogram bounds are valid"),
            labelled: 0,
            labelled_ok: 0,
            wall: Duration::ZERO,
        }
    }

    /// Counts one result.
    pub fn record(&mut self, result: &JobResult) {
        self.counts[index(result.status)] += 1;
        if ran(result) {
            self.start_us
                .saturating_record(result.timing.start_us.max(1));
        }
        if result.labels.contains_key(PROBLEM_LABEL) {
            self.labelled += 1;
            if result.status == Status::Ok {
                self.labelled_ok += 1;
            }
        }
    }

    /// How many results had `status`.
    pub fn count(&self, status: Status) -> u64 {
        self.counts[index(status)]
    }

    /// How many results there were.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// How many jobs ran in a sandbox to the end (the jobs the start latency is taken over).
    pub fn ran(&self) -> u64 {
        self.start_us.len()
    }

    /// The start latency at quantile `q` (0 to 1) in microseconds, when any job ran.
    pub fn start_us_at(&self, q: f64) -> Option<u64> {
        (self.ran() > 0).then(|| self.start_us.value_at_quantile(q))
    }

    /// Jobs with a `problem` label that passed, and jobs with that label, when there are any.
    pub fn pass_at_1(&self) -> Option<(u64, u64)> {
        (self.labelled > 0).then_some((self.labelled_ok, self.labelled))
    }

    /// Results per second of wall time.
    pub fn jobs_per_second(&self) -> f64 {
        let secs = self.wall.as_secs_f64();
        if secs > 0.0 {
            self.total() as f64 / secs
        } else {
            0.0
        }
    }

    /// The non-zero counts in [`Status::ALL`] order, such as `ok 12, failed 1`.
    pub fn status_counts(&self) -> String {
        let parts: Vec<String> = Status::ALL
            .iter()
            .filter(|s| self.count(**s) > 0)
            .map(|s| format!("{s} {}", self.count(*s)))
            .collect();
        if parts.is_empty() {
            "no results".into()
        } else {
            parts.join(", ")
        }
    }
}

/// Whether a result comes from a job that was handed to a sandbox and ran to its end.
fn ran(result: &JobResult) -> bool {
    result.attempts > 0 && !matches!(result.status, Status::Cancelled | Status::Invalid)
}

fn index(status: Status) -> usize {
    Status::ALL
        .iter()
        .position(|s| *s == status)
        .expect("Status::ALL lists every status")
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "shardbox: {} jobs in {:.1} s ({:.2} jobs/s)",
            self.total(),
            self.wall.as_secs_f64(),
            self.jobs_per_second()
        )?;
        writeln!(f, "  status: {}", self.status_counts())?;
        match (self.start_us_at(0.5), self.start_us_at(0.99)) {
            (Some(p50), Some(p99)) => writeln!(
                f,
                "  start_us: p50 {p50}, p99 {p99} (over {} jobs that ran)",
                self.ran()
            )?,
            _ => writeln!(f, "  start_us: no job ran")?,
        }
        if let Some((ok, all)) = self.pass_at_1() {
            writeln!(f, "  pass@1: {ok}/{all} = {:.3}", ok as f64 / all as f64)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(status: Status, attempts: u32, start_us: u64, problem: Option<&str>) -> JobResult {
        let mut r = JobResult::without_run("j", status, "");
        r.attempts = attempts;
        r.timing.start_us = start_us;
        if let Some(p) = problem {
            r.labels.insert(PROBLEM_LABEL.into(), p.into());
        }
        r
    }

    #[test]
    fn counts_latency_and_pass_at_1() {
        let mut s = Summary::new();
        for i in 1..=99 {
            s.record(&result(Status::Ok, 1, i * 100, Some("p")));
        }
        s.record(&result(Status::Failed, 1, 50_000, Some("p")));
        s.record(&result(Status::Invalid, 0, 0, Some("p")));
        s.record(&result(Status::Cancelled, 0, 0, None));
        s.wall = Duration::from_secs(2);
        assert_eq!(s.total(), 102);
        assert_eq!(s.ran(), 100);
        assert_eq!(s.pass_at_1(), Some((99, 101)));
        let p50 = s.start_us_at(0.5).unwrap();
        assert!((4_990..=5_010).contains(&p50), "{p50}");
        let p99 = s.start_us_at(0.99).unwrap();
        assert!((9_890..=9_910).contains(&p99), "{p99}");
        let text = s.to_string();
        assert!(
            text.starts_with("shardbox: 102 jobs in 2.0 s (51.00 jobs/s)\n"),
            "{text}"
        );
        assert!(
            text.contains("  status: ok 99, failed 1, cancelled 1, invalid 1\n"),
            "{text}"
        );
        assert!(text.contains("  pass@1: 99/101 = 0.980\n"), "{text}");
    }

    #[test]
    fn an_empty_run_says_so() {
        let s = Summary::new();
        let text = s.to_string();
        assert!(text.contains("status: no results"), "{text}");
        assert!(text.contains("start_us: no job ran"), "{text}");
        assert!(!text.contains("pass@1"), "{text}");
        assert_eq!(s.jobs_per_second(), 0.0);
    }
}
