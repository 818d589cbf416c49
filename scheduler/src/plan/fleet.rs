//! The `--fleet FILE` of `shardbox plan`: simulated nodes, a workload and an optional target.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A fleet to simulate: identical nodes, the jobs they get, and what they should achieve.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fleet {
    /// The simulated nodes.
    pub nodes: NodeSpec,
    /// The jobs.
    pub workload: Workload,
    /// What the fleet must achieve; needed by `--size`.
    #[serde(default)]
    pub target: Option<Target>,
}

/// How jobs are kept apart on a simulated node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeIsolation {
    /// A warm pool of restored sandboxes, one per job, destroyed after it.
    Sandbox,
    /// `slots` jobs at once as processes in a warm sandbox.
    Process,
}

/// One kind of simulated node, and how many there are.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// How many simulated nodes; `--size` searches over this.
    pub count: u32,
    /// The template the nodes serve (the queue's name; jobs go to it).
    #[serde(default = "default_template")]
    pub template: String,
    /// `sandbox` (the default) or `process`.
    #[serde(default = "default_isolation")]
    pub isolation: NodeIsolation,
    /// Sandbox isolation: idle sandboxes the pool keeps while there is demand (`max_idle`).
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    /// Sandbox isolation: idle sandboxes kept without demand (`min_idle`).
    #[serde(default)]
    pub min_idle: Option<u32>,
    /// Sandbox isolation: fresh sandboxes a node restores per second with every restore slot
    /// busy (each restore takes `max_in_flight / restore_per_s` seconds).
    #[serde(default = "default_restore_per_s")]
    pub restore_per_s: f64,
    /// Sandbox isolation: restores a node runs at once.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u32,
    /// Whether each node's pool is full when the run starts (it is empty and starts restoring
    /// otherwise, like a worker that has just started).
    #[serde(default = "default_true")]
    pub warm_at_start: bool,
    /// Cost of handing a job to a ready sandbox or slot, in microseconds: about a millisecond
    /// for a restored sandbox here; for process isolation the fork of the job's process (tens
    /// of milliseconds under gVisor's ptrace platform).
    #[serde(default = "default_handoff_us")]
    pub handoff_us: u64,
    /// Process isolation: jobs a node runs at once.
    #[serde(default = "default_slots")]
    pub slots: u32,
    /// Jobs a node leases at once [default: `pool_size` for sandbox isolation, `slots` for
    /// process isolation, like `shardbox worker`].
    #[serde(default)]
    pub capacity: Option<u32>,
    /// Round trip of one lease request to the scheduler, in microseconds.
    #[serde(default = "default_lease_us")]
    pub lease_us: u64,
}

impl NodeSpec {
    /// Jobs one node holds at once.
    pub fn capacity(&self) -> u32 {
        self.capacity
            .unwrap_or(match self.isolation {
                NodeIsolation::Sandbox => self.pool_size,
                NodeIsolation::Process => self.slots,
            })
            .max(1)
    }

    /// Idle sandboxes kept without demand.
    pub fn min_idle(&self) -> u32 {
        self.min_idle.unwrap_or(self.pool_size.min(2))
    }

    /// How long one restore takes, in microseconds.
    pub fn restore_us(&self) -> u64 {
        (f64::from(self.max_in_flight.max(1)) / self.restore_per_s * 1e6).round() as u64
    }
}

/// The jobs of a simulated run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// How many jobs.
    pub jobs: u64,
    /// Jobs arriving per second, evenly; all at once at the start when absent.
    #[serde(default)]
    pub arrival_per_s: Option<f64>,
    /// Batches the jobs are split over, all of one priority, shared fairly by the queue.
    #[serde(default = "default_batches")]
    pub batches: u32,
    /// Job durations from a distribution; give this or `results`.
    #[serde(default)]
    pub duration: Option<Duration>,
    /// Job durations from a results file of a real run: `timing.run_ms` of its `ok`, `failed`
    /// and `timeout` lines, taken in the file's order and repeated. A relative path is taken
    /// from the fleet file's folder.
    #[serde(default)]
    pub results: Option<PathBuf>,
    /// Seed of the random durations.
    #[serde(default = "default_seed")]
    pub seed: u64,
}

/// A distribution of job durations, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Duration {
    /// Every job takes `ms`.
    Constant {
        /// Duration.
        ms: f64,
    },
    /// Exponentially distributed.
    Exponential {
        /// Mean.
        mean_ms: f64,
    },
    /// Log-normal with the given mean and 99th percentile (`p99_ms` above `mean_ms`).
    Lognormal {
        /// Mean.
        mean_ms: f64,
        /// 99th percentile.
        p99_ms: f64,
    },
}

/// What a fleet must achieve; every given bound must hold.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// Sustained jobs per hour (`Outcome::jobs_per_hour`), at least; 1 % short still counts,
    /// since the rate is measured over a finite window. With arrivals at a rate, the fleet can
    /// only reach it when the rate is as high; `queue_ms_p99` is what tells whether it keeps up.
    #[serde(default)]
    pub jobs_per_hour: Option<f64>,
    /// 99th percentile of `start_us`, at most.
    #[serde(default)]
    pub start_us_p99: Option<u64>,
    /// 99th percentile of queue wait (`queue_ms`), at most.
    #[serde(default)]
    pub queue_ms_p99: Option<u64>,
}

fn default_template() -> String {
    "python".to_owned()
}
fn default_isolation() -> NodeIsolation {
    NodeIsolation::Sandbox
}
fn default_pool_size() -> u32 {
    4
}
fn default_restore_per_s() -> f64 {
    4.0
}
fn default_max_in_flight() -> u32 {
    2
}
fn default_true() -> bool {
    true
}
fn default_handoff_us() -> u64 {
    1_000
}
fn default_slots() -> u32 {
    4
}
fn default_lease_us() -> u64 {
    1_000
}
fn default_batches() -> u32 {
    1
}
fn default_seed() -> u64 {
    1
}

/// Why a fleet file was refused.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// It could not be read.
    #[error("cannot read fleet file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It is not a valid fleet.
    #[error("fleet file {path} is not valid")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why, with the line.
        #[source]
        source: toml::de::Error,
    },
    /// A value is out of range.
    #[error("fleet file {path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl Fleet {
    /// Reads and checks a fleet file; a relative `results` path is made relative to its folder.
    ///
    /// # Errors
    /// [`FleetError`] naming the file, for an unreadable file, bad TOML, an unknown field or a
    /// value out of range.
    pub fn load(path: &Path) -> Result<Fleet, FleetError> {
        let text = std::fs::read_to_string(path).map_err(|source| FleetError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut fleet = Fleet::parse(&text).map_err(|err| match err {
            ParseError::Toml(source) => FleetError::Parse {
                path: path.to_owned(),
                source,
            },
            ParseError::Invalid(reason) => FleetError::Invalid {
                path: path.to_owned(),
                reason,
            },
        })?;
        if let Some(results) = &mut fleet.workload.results {
            if results.is_relative() {
                if let Some(dir) = path.parent() {
                    *results = dir.join(&*results);
                }
            }
        }
        Ok(fleet)
    }

    /// Parses and checks fleet text.
    ///
    /// # Errors
    /// [`ParseError`] for bad TOML, an unknown field or a value out of range.
    pub fn parse(text: &str) -> Result<Fleet, ParseError> {
        let fleet: Fleet = toml::from_str(text).map_err(ParseError::Toml)?;
        fleet.check().map_err(ParseError::Invalid)?;
        Ok(fleet)
    }

    fn check(&self) -> Result<(), String> {
        let n = &self.nodes;
        if n.count == 0 {
            return Err("nodes.count must be at least 1".into());
        }
        if n.isolation == NodeIsolation::Sandbox {
            if n.pool_size == 0 || n.max_in_flight == 0 {
                return Err("nodes.pool_size and nodes.max_in_flight must be at least 1".into());
            }
            if !(n.restore_per_s.is_finite() && n.restore_per_s > 0.0) {
                return Err("nodes.restore_per_s must be above 0".into());
            }
        }
        if n.isolation == NodeIsolation::Process && n.slots == 0 {
            return Err("nodes.slots must be at least 1".into());
        }
        let w = &self.workload;
        if w.jobs == 0 || w.batches == 0 {
            return Err("workload.jobs and workload.batches must be at least 1".into());
        }
        if let Some(rate) = w.arrival_per_s {
            if !(rate.is_finite() && rate > 0.0) {
                return Err("workload.arrival_per_s must be above 0".into());
            }
        }
        match (&w.duration, &w.results) {
            (None, None) | (Some(_), Some(_)) => {
                return Err("give exactly one of workload.duration and workload.results".into())
            }
            (Some(Duration::Constant { ms }), None) if !(*ms >= 0.0 && ms.is_finite()) => {
                return Err("duration ms must be 0 or more".into())
            }
            (Some(Duration::Exponential { mean_ms }), None)
                if !(*mean_ms > 0.0 && mean_ms.is_finite()) =>
            {
                return Err("duration mean_ms must be above 0".into())
            }
            (Some(Duration::Lognormal { mean_ms, p99_ms }), None)
                if !(*mean_ms > 0.0 && p99_ms > mean_ms && p99_ms.is_finite()) =>
            {
                return Err("lognormal duration needs 0 < mean_ms < p99_ms".into())
            }
            _ => {}
        }
        Ok(())
    }
}

/// Why fleet text was refused.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// Bad TOML or an unknown field.
    #[error(transparent)]
    Toml(toml::de::Error),
    /// A value out of range.
    #[error("{0}")]
    Invalid(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = r#"
        [nodes]
        count = 3
        [workload]
        jobs = 10
        duration = { kind = "constant", ms = 100 }
    "#;

    #[test]
    fn defaults_follow_the_embedded_pool() {
        let fleet = Fleet::parse(SMALL).unwrap();
        assert_eq!(fleet.nodes.capacity(), 4);
        assert_eq!(fleet.nodes.min_idle(), 2);
        assert_eq!(fleet.nodes.restore_us(), 500_000);
        assert!(fleet.target.is_none());
    }

    #[test]
    fn an_unknown_field_is_named_with_its_line() {
        let err = Fleet::parse(&SMALL.replace("count = 3", "count = 3\n        pool = 4"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `pool`"), "{err}");
        assert!(err.contains("line 4"), "{err}");
    }

    #[test]
    fn durations_need_exactly_one_source() {
        let text = SMALL.replace("duration = { kind = \"constant\", ms = 100 }", "");
        assert_eq!(
            Fleet::parse(&text).unwrap_err().to_string(),
            "give exactly one of workload.duration and workload.results"
        );
        let text = SMALL.replace(
            "kind = \"constant\", ms = 100",
            "kind = \"lognormal\", mean_ms = 100, p99_ms = 50",
        );
        assert_eq!(
            Fleet::parse(&text).unwrap_err().to_string(),
            "lognormal duration needs 0 < mean_ms < p99_ms"
        );
    }
}
