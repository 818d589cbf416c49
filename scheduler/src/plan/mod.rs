//! `shardbox plan`: capacity planning by simulation.
//!
//! - [`fleet`]: the `--fleet FILE` settings: simulated nodes, workload, target.
//! - [`durations`]: job durations from a seeded distribution or a real results file.
//! - [`sim`]: the discrete-event simulation over the real [`TemplateQueue`].
//!
//! [`plan`] simulates one fleet; [`size`] finds the smallest node count meeting the target, by
//! doubling and then bisection.
//!
//! [`TemplateQueue`]: crate::service::queue::TemplateQueue

pub mod durations;
pub mod fleet;
pub mod sim;

use std::fmt;

use serde::Serialize;

pub use self::durations::{Durations, DurationsError};
pub use self::fleet::{Fleet, FleetError, Target};
pub use self::sim::{simulate, Outcome};

/// Simulates `fleet` with `nodes` simulated nodes.
///
/// # Errors
/// [`DurationsError`] when the job durations cannot be set up.
pub fn plan(fleet: &Fleet, nodes: u32) -> Result<Outcome, DurationsError> {
    let durations = durations_of(fleet)?;
    Ok(simulate(&fleet.nodes, nodes, &fleet.workload, durations))
}

fn durations_of(fleet: &Fleet) -> Result<Durations, DurationsError> {
    match (&fleet.workload.duration, &fleet.workload.results) {
        (Some(duration), _) => Durations::from_distribution(*duration, fleet.workload.seed),
        (None, Some(path)) => Durations::from_results(path),
        (None, None) => unreachable!("Fleet::parse requires one source of durations"),
    }
}

/// Which bounds of a target an outcome misses, as short phrases; empty when it meets them all.
pub fn misses(target: &Target, outcome: &Outcome) -> Vec<String> {
    let mut missed = Vec::new();
    if let Some(want) = target.jobs_per_hour {
        // One percent of slack: the sustained rate is measured over a finite window.
        if outcome.jobs_per_hour < want * 0.99 {
            missed.push(format!("{:.0} jobs/h < {want:.0}", outcome.jobs_per_hour));
        }
    }
    if let Some(want) = target.start_us_p99 {
        if outcome.start_us.p99 > want {
            missed.push(format!("p99 start {} us > {want}", outcome.start_us.p99));
        }
    }
    if let Some(want) = target.queue_ms_p99 {
        if outcome.queue_ms.p99 > want {
            missed.push(format!(
                "p99 queue wait {} ms > {want}",
                outcome.queue_ms.p99
            ));
        }
    }
    missed
}

/// The answer of a `--size` search.
#[derive(Debug, Clone, Serialize)]
pub struct Sizing {
    /// The smallest node count found to meet the target, if any up to the limit did.
    pub nodes: Option<u32>,
    /// Its outcome.
    pub outcome: Option<Outcome>,
    /// Every count tried, in order, with what it missed.
    pub tried: Vec<Tried>,
}

/// One step of a search.
#[derive(Debug, Clone, Serialize)]
pub struct Tried {
    /// Node count.
    pub nodes: u32,
    /// What it missed; empty when it met the target.
    pub missed: Vec<String>,
    /// Sustained jobs per hour.
    pub jobs_per_hour: f64,
    /// p99 of `start_us`.
    pub start_us_p99: u64,
    /// p99 of queue wait, in milliseconds.
    pub queue_ms_p99: u64,
}

/// Finds the smallest node count, up to `limit`, whose outcome meets `target`: doubling from
/// one node until a count meets it, then bisecting between the last miss and the first hit.
/// Assumes more nodes never do worse.
///
/// # Errors
/// [`DurationsError`] when the job durations cannot be set up.
pub fn size(fleet: &Fleet, target: &Target, limit: u32) -> Result<Sizing, DurationsError> {
    let mut tried = Vec::new();
    let mut attempt = |nodes: u32| -> Result<(bool, Outcome), DurationsError> {
        let outcome = plan(fleet, nodes)?;
        let missed = misses(target, &outcome);
        let met = missed.is_empty();
        tried.push(Tried {
            nodes,
            missed,
            jobs_per_hour: outcome.jobs_per_hour,
            start_us_p99: outcome.start_us.p99,
            queue_ms_p99: outcome.queue_ms.p99,
        });
        Ok((met, outcome))
    };
    let mut low = 0; // the largest count known to miss (0: none tried)
    let mut n = 1;
    let mut best = loop {
        let (met, outcome) = attempt(n)?;
        if met {
            break (n, outcome);
        }
        low = n;
        if n >= limit {
            return Ok(Sizing {
                nodes: None,
                outcome: None,
                tried,
            });
        }
        n = n.saturating_mul(2).min(limit);
    };
    while best.0 - low > 1 {
        let mid = low + (best.0 - low) / 2;
        let (met, outcome) = attempt(mid)?;
        if met {
            best = (mid, outcome);
        } else {
            low = mid;
        }
    }
    Ok(Sizing {
        nodes: Some(best.0),
        outcome: Some(best.1),
        tried,
    })
}

/// A short table of an outcome.
pub struct Table<'a>(pub &'a Outcome);

impl fmt::Display for Table<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = self.0;
        writeln!(f, "simulated nodes      {}", o.nodes)?;
        writeln!(f, "jobs                 {}", o.jobs)?;
        writeln!(f, "makespan             {:.1} s", o.makespan_s)?;
        writeln!(
            f,
            "jobs per hour        {:.0} sustained, {:.0} over the makespan",
            o.jobs_per_hour, o.overall_jobs_per_hour
        )?;
        writeln!(
            f,
            "queue wait ms        p50 {}  p90 {}  p99 {}  max {}",
            o.queue_ms.p50, o.queue_ms.p90, o.queue_ms.p99, o.queue_ms.max
        )?;
        writeln!(
            f,
            "start_us             p50 {}  p90 {}  p99 {}  max {}",
            o.start_us.p50, o.start_us.p90, o.start_us.p99, o.start_us.max
        )?;
        writeln!(
            f,
            "node utilisation     {:.1} % of job slots, {:.1} % of restore slots",
            o.node_utilisation * 100.0,
            o.restore_utilisation * 100.0
        )?;
        writeln!(
            f,
            "simulation           {} events in {:.2} s",
            o.events, o.sim_wall_s
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(extra_nodes: &str, workload: &str) -> Fleet {
        Fleet::parse(&format!(
            "[nodes]\ncount = 1\n{extra_nodes}\n[workload]\n{workload}\n"
        ))
        .unwrap()
    }

    #[test]
    fn a_slot_bound_node_runs_at_its_slots() {
        // 4 slots, 100 ms jobs, no restore limit to speak of: 40 jobs/s.
        let f = fleet(
            "isolation = \"process\"\nslots = 4\nhandoff_us = 0\nlease_us = 0",
            "jobs = 400\nduration = { kind = \"constant\", ms = 100 }",
        );
        let o = plan(&f, 1).unwrap();
        assert_eq!(o.jobs, 400);
        assert!((o.makespan_s - 10.0).abs() < 1e-6, "{}", o.makespan_s);
        assert!(
            (o.jobs_per_hour - 144_000.0).abs() < 1_500.0,
            "{}",
            o.jobs_per_hour
        );
        assert!(o.node_utilisation > 0.99, "{}", o.node_utilisation);
        assert_eq!(o.start_us.p99, 1);
    }

    #[test]
    fn a_restore_bound_node_runs_at_its_restore_rate() {
        // Instant jobs, 5 restores/s, pool starting full with 4: (100 - 4) / 5 s after the
        // first restores.
        let f = fleet(
            "restore_per_s = 5.0\nmax_in_flight = 1\nhandoff_us = 0\nlease_us = 0",
            "jobs = 100\nduration = { kind = \"constant\", ms = 0 }",
        );
        let o = plan(&f, 1).unwrap();
        assert_eq!(o.jobs, 100);
        assert!((o.makespan_s - 96.0 / 5.0).abs() < 1e-3, "{o:?}");
        assert!(o.restore_utilisation > 0.99, "{}", o.restore_utilisation);
        assert!(
            o.start_us.p50 > 100_000,
            "jobs wait for restores: {:?}",
            o.start_us
        );
    }

    #[test]
    fn more_nodes_share_the_work_and_arrivals_set_the_pace() {
        let f = fleet(
            "isolation = \"process\"\nslots = 2",
            "jobs = 20000\narrival_per_s = 1000.0\nduration = { kind = \"exponential\", mean_ms = 10 }",
        );
        let o = plan(&f, 20).unwrap();
        assert_eq!(o.jobs, 20_000);
        // Keeps up: finishes just after the last arrival, at the arrival rate.
        assert!(o.makespan_s < 20.1, "{}", o.makespan_s);
        assert!(
            (o.jobs_per_hour / 3_600_000.0 - 1.0).abs() < 0.01,
            "{}",
            o.jobs_per_hour
        );
        assert!(o.queue_ms.p99 < 50, "{:?}", o.queue_ms);
    }

    #[test]
    fn sizing_finds_the_smallest_fleet() {
        // 1000 jobs/s of 100 ms jobs need 100 busy slots: 25 nodes of 4, and a little more to
        // keep the queue short.
        let f = fleet(
            "isolation = \"process\"\nslots = 4\nhandoff_us = 0",
            "jobs = 20000\narrival_per_s = 1000.0\nduration = { kind = \"constant\", ms = 100 }",
        );
        let target = Target {
            queue_ms_p99: Some(100),
            ..Target::default()
        };
        let sizing = size(&f, &target, 1 << 16).unwrap();
        let nodes = sizing.nodes.unwrap();
        assert!((25..=27).contains(&nodes), "{nodes}: {:?}", sizing.tried);
        assert!(sizing
            .tried
            .iter()
            .all(|t| (t.nodes >= nodes) == t.missed.is_empty()));
    }

    #[test]
    fn batches_share_the_fleet() {
        let f = fleet(
            "isolation = \"process\"",
            "jobs = 1001\nbatches = 7\nduration = { kind = \"constant\", ms = 5 }",
        );
        assert_eq!(plan(&f, 3).unwrap().jobs, 1001);
    }
}
