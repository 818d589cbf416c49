//! The capacity planner against a real run on this machine (needs root and real runsc).
//!
//! Two real `shardbox run` batches on the `python` template: a calibration batch of trivial
//! jobs, which is bound by how fast this machine restores sandboxes, and a validation batch of
//! jobs that sleep for different times, where both restores and job durations matter (which of
//! the two bounds the run depends on how busy the machine is). The
//! restore rate is the one at which the model reproduces the calibration run's wall time; the
//! validation run is then predicted by `shardbox plan` for a one-node fleet with this machine's
//! pool settings, that restore rate and the durations of the validation run's own results. The
//! prediction must come within 10 % of the measured wall time.

mod common;

use std::path::Path;

use shardbox_proto::{JobResult, Status};
use shardbox_scheduler::plan::{self, Fleet};

const NAME: &str = "plan-agreement";

/// Jobs a real run takes at once here (`--max-running`); the simulated node's capacity.
const RUNNING: u32 = 4;

/// The embedded configuration with only the `python` template, so the worker builds one.
fn python_only(text: String) -> String {
    let cut = text
        .find("# Command jobs")
        .expect("the embedded config has the exec template after python");
    text[..cut].to_owned()
}

fn write_batch(path: &Path, jobs: usize, code: impl Fn(usize) -> String) {
    let mut text = String::new();
    for i in 0..jobs {
        let line = serde_json::json!({"id": format!("j{i}"), "code": code(i)});
        text.push_str(&line.to_string());
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

/// Runs a batch for real; returns its results and its wall time in seconds, as its summary
/// gives it (the batch's start to its last result; not the largest `total_ms`, since the run
/// accepts a job only when its template's queue has room).
fn run_real(
    dir: &Path,
    name: &str,
    jobs: usize,
    code: impl Fn(usize) -> String,
) -> (f64, Vec<JobResult>) {
    let config = common::config_file(dir, NAME, python_only);
    let batch = dir.join(format!("{name}.jsonl"));
    let out = dir.join(format!("{name}-results.jsonl"));
    write_batch(&batch, jobs, code);
    let running = RUNNING.to_string();
    let run = common::spawn(common::run_command(
        &batch,
        &out,
        &config,
        &["--max-running", &running],
    ))
    .wait();
    assert_eq!(run.code(), Some(0), "{name}: {run:?}");
    assert!(common::leftovers(NAME).is_empty(), "containers left behind");
    let results = common::results(&out);
    assert_eq!(results.len(), jobs);
    assert!(
        results.iter().all(|r| r.status == Status::Ok),
        "{name}: every job should succeed: {:?}",
        results.iter().find(|r| r.status != Status::Ok)
    );
    (summary_wall(&run.stdout), results)
}

/// The wall time of `shardbox: N jobs in W s (...)`.
fn summary_wall(stdout: &str) -> f64 {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("shardbox: ") && l.contains(" jobs in "))
        .unwrap_or_else(|| panic!("no summary line in {stdout}"));
    let after = &line[line.find(" jobs in ").unwrap() + " jobs in ".len()..];
    after
        .split(' ')
        .next()
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no wall time in {line}"))
}

/// A one-node fleet with this machine's settings for the `python` template.
fn fleet_text(restore_per_s: f64, handoff_us: u64, jobs: usize, results: &Path) -> String {
    let pool = &shardbox_worker::WorkerConfig::embedded().unwrap().templates["python"].pool;
    format!(
        "[nodes]\ncount = 1\nisolation = \"sandbox\"\npool_size = {}\nmin_idle = {}\n\
         max_in_flight = {}\nrestore_per_s = {restore_per_s}\ncapacity = {RUNNING}\n\
         handoff_us = {handoff_us}\nlease_us = 0\nwarm_at_start = false\n\
         [workload]\njobs = {jobs}\nresults = \"{}\"\n",
        pool.max_idle,
        pool.min_idle,
        pool.max_in_flight,
        results.display()
    )
}

fn median_start_us(results: &[JobResult]) -> u64 {
    let mut starts: Vec<u64> = results.iter().map(|r| r.timing.start_us).collect();
    starts.sort_unstable();
    starts[starts.len() / 2]
}

/// The restore rate at which the model's wall time for the calibration run is `wall_s`.
fn fit_restore_rate(wall_s: f64, handoff_us: u64, jobs: usize, results: &Path) -> f64 {
    let (mut low, mut high) = (0.05_f64, 200.0_f64);
    for _ in 0..50 {
        let mid = (low * high).sqrt();
        let fleet = Fleet::parse(&fleet_text(mid, handoff_us, jobs, results)).unwrap();
        let predicted = plan::plan(&fleet, 1).unwrap().makespan_s;
        // A faster restore rate gives a shorter run.
        if predicted > wall_s {
            low = mid;
        } else {
            high = mid;
        }
    }
    (low * high).sqrt()
}

#[test]
fn the_plan_predicts_a_real_run_within_ten_percent() {
    let _turn = common::exclusive();
    let dir = tempfile::tempdir().unwrap();

    // Calibration: trivial jobs, bound by restores.
    let calibration_jobs = 40;
    let (cal_wall, cal_results) = run_real(dir.path(), "calibrate", calibration_jobs, |_| {
        "pass".to_owned()
    });
    let cal_path = dir.path().join("calibrate-results.jsonl");
    let restore_per_s = fit_restore_rate(
        cal_wall,
        median_start_us(&cal_results),
        calibration_jobs,
        &cal_path,
    );
    eprintln!(
        "calibration: {calibration_jobs} jobs in {cal_wall:.2} s: {restore_per_s:.2} restores/s"
    );

    // Validation: sleeps of 0.5 to 3.5 s (2 s on average, so four at once need 2 fresh
    // sandboxes a second): job durations and restores both matter.
    let jobs = 80;
    let sleeps = [0.5, 1.5, 2.5, 3.5];
    let (wall, results) = run_real(dir.path(), "validate", jobs, |i| {
        format!("import time\ntime.sleep({})\n", sleeps[i % sleeps.len()])
    });
    let results_path = dir.path().join("validate-results.jsonl");
    let fleet_path = dir.path().join("fleet.toml");
    std::fs::write(
        &fleet_path,
        fleet_text(
            restore_per_s,
            median_start_us(&results),
            jobs,
            &results_path,
        ),
    )
    .unwrap();
    let run = common::run(&["plan", "--fleet", fleet_path.to_str().unwrap(), "--json"]);
    assert_eq!(run.code(), Some(0), "{run:?}");
    let outcome: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let predicted = outcome["makespan_s"].as_f64().unwrap();
    let measured_per_hour = jobs as f64 / wall * 3600.0;
    let predicted_per_hour = outcome["overall_jobs_per_hour"].as_f64().unwrap();
    let error = (predicted - wall) / wall;
    eprintln!(
        "validation: measured {wall:.2} s ({measured_per_hour:.0} jobs/h), predicted \
         {predicted:.2} s ({predicted_per_hour:.0} jobs/h), error {:+.1} %",
        error * 100.0
    );
    assert!(
        error.abs() <= 0.10,
        "the plan is off by {:+.1} %: measured {wall:.2} s ({measured_per_hour:.0} jobs/h), \
         predicted {predicted:.2} s ({predicted_per_hour:.0} jobs/h) at {restore_per_s:.2} \
         restores/s; plan output:\n{}",
        error * 100.0,
        run.stdout
    );
}
