//! Job durations of a simulated run: from a seeded distribution, or replayed from the timings
//! of a real results file.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use rand::rngs::SmallRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Exp, LogNormal};
use shardbox_proto::{JobResult, Status};

use super::fleet::Duration;

/// The standard normal quantile of 0.99.
const Z99: f64 = 2.326_347_874_040_841;

/// Draws job durations in microseconds; the same seed gives the same sequence.
#[derive(Debug, Clone)]
pub enum Durations {
    /// Every job the same.
    Constant(u64),
    /// Exponential, seeded.
    Exponential(Exp<f64>, SmallRng),
    /// Log-normal, seeded; in milliseconds.
    Lognormal(LogNormal<f64>, SmallRng),
    /// Replayed in order, repeating.
    Replay {
        /// The durations.
        values: Vec<u64>,
        /// The next one.
        next: usize,
    },
}

/// Why durations could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DurationsError {
    /// The results file could not be read.
    #[error("cannot read results file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It held no line with a run time.
    #[error(
        "results file {path} has no `ok`, `failed` or `timeout` result to take durations from"
    )]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// No log-normal has that mean and 99th percentile.
    #[error(
        "no log-normal has mean {mean_ms} ms and p99 {p99_ms} ms: the p99 may be at most about \
         15 times the mean"
    )]
    Lognormal {
        /// The mean.
        mean_ms: f64,
        /// The 99th percentile.
        p99_ms: f64,
    },
}

impl Durations {
    /// Durations from a distribution, seeded with `seed`.
    ///
    /// # Errors
    /// [`DurationsError::Lognormal`] for a log-normal whose p99 is too far above its mean.
    pub fn from_distribution(duration: Duration, seed: u64) -> Result<Durations, DurationsError> {
        let rng = SmallRng::seed_from_u64(seed);
        Ok(match duration {
            Duration::Constant { ms } => Durations::Constant((ms * 1e3).round() as u64),
            Duration::Exponential { mean_ms } => {
                Durations::Exponential(Exp::new(1.0 / mean_ms).expect("checked above 0"), rng)
            }
            Duration::Lognormal { mean_ms, p99_ms } => {
                // mean = exp(mu + s^2/2) and p99 = exp(mu + Z99 s) give
                // s^2/2 - Z99 s + ln(p99/mean) = 0; the smaller root is the spread.
                let gap = (p99_ms / mean_ms).ln();
                let disc = Z99 * Z99 - 2.0 * gap;
                if disc < 0.0 {
                    return Err(DurationsError::Lognormal { mean_ms, p99_ms });
                }
                let sigma = Z99 - disc.sqrt();
                let mu = mean_ms.ln() - sigma * sigma / 2.0;
                Durations::Lognormal(LogNormal::new(mu, sigma).expect("sigma is finite"), rng)
            }
        })
    }

    /// Durations of the `ok`, `failed` and `timeout` results of a results file, in its order.
    ///
    /// # Errors
    /// [`DurationsError`] when the file cannot be read or has no such result. Lines that are
    /// not results are skipped.
    pub fn from_results(path: &Path) -> Result<Durations, DurationsError> {
        let read = |source| DurationsError::Read {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read)?;
        let mut values = Vec::new();
        for line in std::io::BufReader::new(file).lines() {
            let line = line.map_err(read)?;
            let Ok(result) = serde_json::from_str::<JobResult>(&line) else {
                continue;
            };
            if matches!(result.status, Status::Ok | Status::Failed | Status::Timeout) {
                values.push(result.timing.run_ms * 1_000);
            }
        }
        if values.is_empty() {
            return Err(DurationsError::Empty {
                path: path.to_owned(),
            });
        }
        Ok(Durations::Replay { values, next: 0 })
    }

    /// The next duration, in microseconds.
    pub fn next_us(&mut self) -> u64 {
        match self {
            Durations::Constant(us) => *us,
            Durations::Exponential(dist, rng) => (dist.sample(rng) * 1e3) as u64,
            Durations::Lognormal(dist, rng) => (dist.sample(rng) * 1e3) as u64,
            Durations::Replay { values, next } => {
                let value = values[*next];
                *next = (*next + 1) % values.len();
                value
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(d: &mut Durations, n: usize) -> (f64, f64) {
        let mut v: Vec<u64> = (0..n).map(|_| d.next_us()).collect();
        v.sort_unstable();
        let mean = v.iter().sum::<u64>() as f64 / n as f64 / 1e3;
        (mean, v[n * 99 / 100] as f64 / 1e3)
    }

    #[test]
    fn a_lognormal_has_the_mean_and_p99_asked_for() {
        let spec = Duration::Lognormal {
            mean_ms: 2_000.0,
            p99_ms: 10_000.0,
        };
        let (mean, p99) = stats(&mut Durations::from_distribution(spec, 7).unwrap(), 200_000);
        assert!((mean / 2_000.0 - 1.0).abs() < 0.02, "mean {mean}");
        assert!((p99 / 10_000.0 - 1.0).abs() < 0.03, "p99 {p99}");
    }

    #[test]
    fn an_exponential_has_its_mean_and_the_same_seed_repeats() {
        let spec = Duration::Exponential { mean_ms: 50.0 };
        let (mean, _) = stats(&mut Durations::from_distribution(spec, 1).unwrap(), 100_000);
        assert!((mean / 50.0 - 1.0).abs() < 0.02, "mean {mean}");
        let mut a = Durations::from_distribution(spec, 3).unwrap();
        let mut b = Durations::from_distribution(spec, 3).unwrap();
        assert!((0..100).all(|_| a.next_us() == b.next_us()));
    }

    #[test]
    fn an_impossible_lognormal_is_refused() {
        let spec = Duration::Lognormal {
            mean_ms: 1.0,
            p99_ms: 100.0,
        };
        assert!(matches!(
            Durations::from_distribution(spec, 1),
            Err(DurationsError::Lognormal { .. })
        ));
    }

    #[test]
    fn results_are_replayed_in_order_skipping_jobs_that_did_not_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.jsonl");
        let mut lines = String::new();
        for (i, (status, ms)) in [(Status::Ok, 5), (Status::Invalid, 0), (Status::Failed, 7)]
            .into_iter()
            .enumerate()
        {
            let mut r = JobResult::without_run(format!("j{i}"), status, "");
            r.timing.run_ms = ms;
            lines.push_str(&serde_json::to_string(&r).unwrap());
            lines.push('\n');
        }
        lines.push_str("not json\n");
        std::fs::write(&path, lines).unwrap();
        let mut d = Durations::from_results(&path).unwrap();
        let got: Vec<u64> = (0..3).map(|_| d.next_us()).collect();
        assert_eq!(got, vec![5_000, 7_000, 5_000]);
    }
}
