//! What every suite shares: the configuration it runs with, finding a template's pool, sampling
//! pool sizes, percentiles, ratios and the printed table.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use shardbox_worker::config::TemplateConfig;
use shardbox_worker::pool::Pool;
use shardbox_worker::{Worker, WorkerConfig};

/// The benchmarks' heavy template (`python-sci`), added to the configuration they run with.
pub const SCI_CONFIG: &str = include_str!("../../configs/python-sci.toml");

/// The name of the heavy template in [`SCI_CONFIG`].
pub const SCI_TEMPLATE: &str = "python-sci";

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplatesOnly {
    templates: BTreeMap<String, TemplateConfig>,
}

/// Adds the templates of [`SCI_CONFIG`] that `config` does not declare itself.
///
/// # Errors
/// When the embedded file does not parse (the tests rule it out).
pub fn add_sci_template(config: &mut WorkerConfig) -> anyhow::Result<()> {
    let extra: TemplatesOnly = toml::from_str(SCI_CONFIG)?;
    for (name, template) in extra.templates {
        config.templates.entry(name).or_insert(template);
    }
    Ok(())
}

/// `config` reduced to `templates` (the first becomes the default): a worker builds and keeps
/// filling every template it declares, and the ones a suite does not measure would take CPU
/// from the ones it does.
///
/// # Errors
/// When `config` does not declare one of `templates`.
pub fn only_templates(config: &WorkerConfig, templates: &[&str]) -> anyhow::Result<WorkerConfig> {
    let mut reduced = config.clone();
    for name in templates {
        anyhow::ensure!(
            config.templates.contains_key(*name),
            "the configuration declares no template {name:?}"
        );
    }
    reduced
        .templates
        .retain(|name, _| templates.contains(&name.as_str()));
    if let Some(first) = templates.first() {
        reduced.worker.default_template = (*first).to_owned();
    }
    Ok(reduced)
}

/// Samples the idle count of some pools at a fixed interval until [`PoolSampler::finish`].
pub struct PoolSampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<serde_json::Value>,
}

impl PoolSampler {
    /// Starts sampling `templates` of `worker` every `every`.
    pub fn start(worker: &Worker, templates: &[&str], every: Duration) -> PoolSampler {
        let pools: Vec<(String, Arc<Pool>)> = templates
            .iter()
            .filter_map(|t| {
                worker
                    .pools()
                    .get(*t)
                    .map(|p| ((*t).to_owned(), Arc::clone(p)))
            })
            .collect();
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let began = Instant::now();
            let mut t_s = Vec::new();
            let mut idle: BTreeMap<String, Vec<usize>> = BTreeMap::new();
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        t_s.push(round3(began.elapsed().as_secs_f64()));
                        for (name, pool) in &pools {
                            idle.entry(name.clone()).or_default().push(pool.idle());
                        }
                    }
                    _ = &mut stopped => break,
                }
            }
            json!({"interval_ms": every.as_millis() as u64, "t_s": t_s, "idle": idle})
        });
        PoolSampler { stop, task }
    }

    /// Stops sampling; the samples as `{interval_ms, t_s: [..], idle: {template: [..]}}`.
    pub async fn finish(self) -> serde_json::Value {
        let _ = self.stop.send(());
        self.task.await.unwrap_or(serde_json::Value::Null)
    }
}

/// `python3 -c CODE` on the host kernel with no sandbox, with the interpreter and packages of
/// `rootfs` (the template's own, entered with `chroot`): the baseline then differs from the
/// sandbox only by the sandbox, not by the interpreter (a host `python3` may be a slower shim,
/// such as pyenv's, or lack the template's packages).
pub fn host_python(rootfs: &Path, code: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("chroot");
    cmd.arg(rootfs)
        .args(["python3", "-c", code])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// A ratio for people: three decimals, or three significant digits when far from 1.
pub fn format_ratio(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else if x >= 0.01 || x == 0.0 {
        format!("{x:.3}")
    } else {
        format!("{x:.2e}")
    }
}

/// `x` rounded to three decimals, to keep sample lists in the JSON short.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Every value of `xs` rounded to three decimals.
pub fn rounded(xs: &[f64]) -> Vec<f64> {
    xs.iter().map(|x| round3(*x)).collect()
}

/// One ratio of a suite: `method` against `baseline` on `measure`; `value` is method divided by
/// baseline.
pub fn ratio(measure: &str, method: &str, baseline: &str, value: f64) -> serde_json::Value {
    json!({"measure": measure, "method": method, "baseline": baseline, "value": value})
}

/// The pool of `template`, once it holds `min_idle` (at least one) idle sandboxes.
///
/// # Errors
/// When the worker does not serve `template`.
pub async fn warm_pool(worker: &Worker, template: &str) -> anyhow::Result<Arc<Pool>> {
    let pool = worker
        .pools()
        .get(template)
        .ok_or_else(|| anyhow::anyhow!("no template {template:?}"))?
        .clone();
    while pool.idle() < pool.template().config.pool.min_idle.max(1) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(pool)
}

/// The cgroup parent that runsc makes for the bare baselines' sandboxes (each of which names
/// its own child of it, removed by runsc); removed once the baselines are done.
pub const BARE_CGROUP_PARENT: &str = "shardbox-bench";

/// Removes [`BARE_CGROUP_PARENT`] from every cgroup hierarchy where it is left empty.
pub fn remove_bare_cgroup_parent() {
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    for hierarchy in hierarchies.flatten() {
        let _ = std::fs::remove_dir(hierarchy.path().join(BARE_CGROUP_PARENT));
    }
}

/// The `q` quantile (0..=1) of `samples`, which need not be sorted.
pub fn quantile(samples: &[f64], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Prints a table row by row to stderr, so stdout stays JSON.
pub fn table(title: &str, header: &[&str], rows: &[Vec<String>]) {
    eprintln!("\n{title}");
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:>w$}"))
            .collect();
        eprintln!("  {}", padded.join("  "));
    };
    line(header.iter().map(|s| s.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_a_small_set() {
        let xs = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(quantile(&xs, 0.5), 3.0);
        assert_eq!(quantile(&xs, 0.0), 1.0);
        assert_eq!(quantile(&xs, 1.0), 5.0);
        assert!(quantile(&[], 0.5).is_nan());
    }

    #[test]
    fn ratios_for_people() {
        assert_eq!(format_ratio(0.000417), "4.17e-4");
        assert_eq!(format_ratio(0.989), "0.989");
        assert_eq!(format_ratio(29.79), "29.8");
        assert_eq!(format_ratio(2421.0), "2421");
    }

    #[test]
    fn the_sci_template_parses_and_only_adds() {
        let mut config = WorkerConfig::embedded().unwrap();
        add_sci_template(&mut config).unwrap();
        let sci = &config.templates[SCI_TEMPLATE];
        assert_eq!(sci.preload, ["numpy"]);
        let reduced = only_templates(&config, &[SCI_TEMPLATE]).unwrap();
        assert_eq!(reduced.templates.len(), 1);
        assert_eq!(reduced.worker.default_template, SCI_TEMPLATE);
        assert!(only_templates(&config, &["nope"]).is_err());
    }
}
