//! What every suite shares: finding a template's pool, percentiles and the printed table.

use std::sync::Arc;
use std::time::Duration;

use shardbox_worker::pool::Pool;
use shardbox_worker::Worker;

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
}
