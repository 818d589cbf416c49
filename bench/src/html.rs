//! The report of `bench all`: one self-contained HTML file, its charts inline SVG drawn with
//! `plotters`, built from the run's JSON alone (so a saved `bench.json` can be drawn again).
//!
//! Charts: start latency per method (CDF), each job's wall time per method (CDF, per template),
//! jobs per second per method (bars), jobs completed per second over time, idle sandboxes over
//! time. Tables: every ratio of the run and the machine's description.

use std::fmt::Write as _;

use plotters::prelude::*;
use serde_json::Value;

use crate::report::format_ratio;

const WIDTH: u32 = 820;
const HEIGHT: u32 = 380;

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// One named series of points.
struct Series {
    name: String,
    points: Vec<(f64, f64)>,
}

/// The report for the figures of one run (`{machine, suites: {name: figures}}`).
///
/// # Errors
/// When a chart cannot be drawn.
pub fn render(run: &Value) -> anyhow::Result<String> {
    let suites = &run["suites"];
    let mut body = String::new();
    let _ = write!(
        body,
        "<h1>shardbox benchmarks</h1><p>{}; every timing against a baseline measured in the \
         same run. The figures are in <code>bench.json</code> beside this file.</p>",
        escape(run["machine"]["date"].as_str().unwrap_or(""))
    );
    body += "<h2>Ratios</h2>";
    body += &ratio_table(suites);

    body += "<h2>Start latency</h2><p>From taking a job to its input written into a running \
             sandbox: a sandbox from the warm pool, a restore per job, a cold boot per job.</p>";
    let start = &suites["start"];
    let series = named_samples(&start["samples_ms"]);
    if series.is_empty() {
        body += "<p>(no start suite in this run)</p>";
    } else {
        let title = format!(
            "start latency, template {}, CDF",
            start["template"].as_str().unwrap_or("?")
        );
        body += &cdf_chart(&title, &series)?;
    }

    body += "<h2>Throughput</h2><p>Fresh sandboxes per second, one job each. Per job: each \
             job's wall time (for shardbox, handoff plus run, with a sandbox waiting).</p>";
    let mut bars = Vec::new();
    let mut over_time = Vec::new();
    let mut pool_idle = Vec::new();
    for template in suites["throughput"]["templates"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = template["template"].as_str().unwrap_or("?");
        if let Some(note) = template["skipped"].as_str() {
            let _ = write!(body, "<p>{}: {}</p>", escape(name), escape(note));
            continue;
        }
        let methods = template["methods"].as_object().into_iter().flatten();
        let mut series = Vec::new();
        for (method, figures) in methods {
            bars.push((format!("{name}: {method}"), figures["per_s"].as_f64()));
            series.push(Series {
                name: method.clone(),
                points: floats(&figures["job_ms"])
                    .into_iter()
                    .map(|x| (x, 0.0))
                    .collect(),
            });
        }
        body += &cdf_chart(&format!("job wall time, template {name}, CDF"), &series)?;
        over_time.push(Series {
            name: format!("shardbox, {name}"),
            points: per_second(&floats(&template["shardbox_done_s"])),
        });
        pool_idle.extend(idle_series(&template["pool_idle"], "throughput"));
    }
    let process = &suites["process"];
    for (label, key) in [
        ("process: in-sandbox fork loop", "ceiling_fork_loop_per_s"),
        (
            "process: shardbox process isolation",
            "process_isolation_per_s",
        ),
        (
            "process: shardbox sandbox isolation",
            "sandbox_isolation_per_s",
        ),
        ("process: host python3 -c", "host_subprocess_per_s"),
    ] {
        if let Some(v) = process[key].as_f64() {
            bars.push((label.to_owned(), Some(v)));
        }
    }
    let humaneval = &suites["humaneval"];
    if let Some(v) = humaneval["shardbox"]["per_s"].as_f64() {
        bars.push(("humaneval: shardbox".into(), Some(v)));
        bars.push((
            "humaneval: host python3 -c".into(),
            humaneval["host"]["per_s"].as_f64(),
        ));
        over_time.push(Series {
            name: "shardbox, humaneval".into(),
            points: per_second(&floats(&humaneval["done_s"])),
        });
        pool_idle.extend(idle_series(&humaneval["pool_idle"], "humaneval"));
    }
    let bars: Vec<(String, f64)> = bars
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
        .filter(|(_, v)| *v > 0.0)
        .collect();
    if !bars.is_empty() {
        body += &bar_chart("jobs per second (log scale)", &bars)?;
    }
    if !over_time.is_empty() {
        body += "<h2>Throughput over time</h2><p>Jobs completed in each second of a run through \
                 shardbox (time from the run's start).</p>";
        body += &line_chart("jobs completed per second", "seconds", "jobs", &over_time)?;
    }
    let scheduler = &suites["scheduler"];
    if let Some(per_tenth) = scheduler["results_per_100ms"].as_array() {
        let points = per_tenth
            .iter()
            .enumerate()
            .map(|(n, v)| (n as f64 / 10.0, v.as_f64().unwrap_or(0.0) * 10.0))
            .collect();
        let memory = floats(&scheduler["scheduler_rss_mib_every_100ms"])
            .iter()
            .enumerate()
            .map(|(n, v)| (n as f64 / 10.0, *v))
            .collect();
        body += "<h2>Scheduler</h2><p>A million jobs through the scheduler service with \
                 simulated executors (no code runs), durability on: results per second as the \
                 client received them, and the scheduler's resident memory.</p>";
        let series = [Series {
            name: "results per second".into(),
            points,
        }];
        body += &line_chart("scheduler results per second", "seconds", "jobs/s", &series)?;
        let series = [Series {
            name: "scheduler resident memory".into(),
            points: memory,
        }];
        body += &line_chart("scheduler memory", "seconds", "MiB", &series)?;
    }
    pool_idle.extend(idle_series(&start["pool_idle"], "start"));
    if !pool_idle.is_empty() {
        body += "<h2>Pool size over time</h2><p>Idle sandboxes in the warm pool, sampled every \
                 100 ms during each run (time from the run's start).</p>";
        body += &line_chart("idle sandboxes", "seconds", "idle", &pool_idle)?;
    }

    body += "<h2>Machine</h2>";
    body += &machine_table(&run["machine"]);
    let _ = write!(
        body,
        "<details><summary>All figures (JSON)</summary><pre>{}</pre></details>",
        escape(&serde_json::to_string_pretty(run)?)
    );
    Ok(format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>shardbox benchmarks</title><style>{STYLE}</style></head><body>{body}</body>\
         </html>\n"
    ))
}

const STYLE: &str = "body{font-family:sans-serif;max-width:880px;margin:2em auto;color:#222}\
    table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px}\
    td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f3f3}\
    pre{font-size:11px;overflow:auto;background:#f8f8f8;padding:8px}svg{display:block;margin:1em 0}";

fn ratio_table(suites: &Value) -> String {
    let mut rows = String::new();
    for (suite, figures) in suites.as_object().into_iter().flatten() {
        for r in figures["ratios"].as_array().into_iter().flatten() {
            let _ = write!(
                rows,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td></tr>",
                escape(suite),
                escape(r["measure"].as_str().unwrap_or("")),
                escape(r["method"].as_str().unwrap_or("")),
                escape(r["baseline"].as_str().unwrap_or("")),
                r["value"].as_f64().map_or("-".into(), format_ratio),
            );
        }
        if let Some(error) = figures["error"].as_str() {
            let _ = write!(
                rows,
                "<tr><td>{}</td><td colspan=\"4\">failed: {}</td></tr>",
                escape(suite),
                escape(error)
            );
        }
    }
    format!(
        "<table><tr><th>suite</th><th>measure</th><th>method</th><th>baseline</th>\
         <th>method / baseline</th></tr>{rows}</table>"
    )
}

fn machine_table(machine: &Value) -> String {
    let mut rows = String::new();
    for (key, value) in machine.as_object().into_iter().flatten() {
        let text = match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let _ = write!(
            rows,
            "<tr><th>{}</th><td>{}</td></tr>",
            escape(key),
            escape(&text)
        );
    }
    format!("<table>{rows}</table>")
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn floats(value: &Value) -> Vec<f64> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_f64)
        .collect()
}

/// `{name: [samples]}` as series whose points carry the samples in `x`.
fn named_samples(value: &Value) -> Vec<Series> {
    value
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, samples)| Series {
            name: name.clone(),
            points: floats(samples).into_iter().map(|x| (x, 0.0)).collect(),
        })
        .collect()
}

/// Completion times (seconds) as jobs completed in each whole second, one point per second.
fn per_second(done_s: &[f64]) -> Vec<(f64, f64)> {
    let Some(last) = done_s.iter().copied().reduce(f64::max) else {
        return Vec::new();
    };
    let mut bins = vec![0.0; last.floor() as usize + 1];
    for t in done_s {
        bins[t.max(0.0).floor() as usize] += 1.0;
    }
    bins.into_iter()
        .enumerate()
        .map(|(i, n)| (i as f64 + 0.5, n))
        .collect()
}

/// The pool samples of one run (`{t_s, idle: {template: [..]}}`) as one series per template.
fn idle_series(value: &Value, run: &str) -> Vec<Series> {
    let t_s = floats(&value["t_s"]);
    value["idle"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(template, idle)| Series {
            name: format!("{run}: {template}"),
            points: t_s.iter().copied().zip(floats(idle)).collect(),
        })
        .collect()
}

/// Cumulative distributions of each series' `x` values, on a logarithmic axis.
fn cdf_chart(title: &str, series: &[Series]) -> anyhow::Result<String> {
    let all: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .filter(|x| *x > 0.0)
        .collect();
    if all.is_empty() {
        return Ok(String::new());
    }
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min) * 0.8;
    let hi = all.iter().copied().fold(0.0, f64::max) * 1.25;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            // Headroom above 1 for the legend, so that it hides no line.
            .build_cartesian_2d((lo..hi).log_scale(), 0.0..1.35)?;
        chart
            .configure_mesh()
            .y_label_formatter(&|y| {
                if *y <= 1.0 {
                    format!("{y:.1}")
                } else {
                    String::new()
                }
            })
            .x_labels(8)
            .x_desc("milliseconds (log scale)")
            .y_desc("fraction of jobs")
            .draw()?;
        for (i, s) in series.iter().enumerate() {
            let mut xs: Vec<f64> = s.points.iter().map(|p| p.0.max(lo)).collect();
            xs.sort_by(f64::total_cmp);
            let n = xs.len() as f64;
            let mut points = Vec::with_capacity(xs.len() * 2);
            for (k, x) in xs.iter().enumerate() {
                points.push((*x, k as f64 / n));
                points.push((*x, (k + 1) as f64 / n));
            }
            let color = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                .label(format!("{} (n={})", s.name, xs.len()))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}

/// Lines of `(x, y)` points on linear axes.
fn line_chart(
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
) -> anyhow::Result<String> {
    let points = series.iter().flat_map(|s| s.points.iter());
    let x_max = points.clone().map(|p| p.0).fold(1.0, f64::max);
    // Headroom for the legend.
    let y_max = points.map(|p| p.1).fold(1.0, f64::max) * 1.45;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .draw()?;
        for (i, s) in series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(s.points.clone(), color.stroke_width(2)))?
                .label(s.name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}

/// Horizontal bars on a logarithmic axis, one per `(label, value)`, labelled with the value.
fn bar_chart(title: &str, bars: &[(String, f64)]) -> anyhow::Result<String> {
    let lo = bars.iter().map(|b| b.1).fold(f64::INFINITY, f64::min) / 2.0;
    let hi = bars.iter().map(|b| b.1).fold(0.0, f64::max) * 3.0;
    let height = 70 + 26 * bars.len() as u32;
    let mut groups: Vec<&str> = Vec::new();
    for (label, _) in bars {
        let group = label.split(':').next().unwrap_or("");
        if !groups.contains(&group) {
            groups.push(group);
        }
    }
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let (labels, plot) = root.split_horizontally(300);
        let mut chart = ChartBuilder::on(&plot)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(30)
            .build_cartesian_2d((lo..hi).log_scale(), 0.0..bars.len() as f64)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .disable_y_axis()
            .draw()?;
        let plot_top = 12 + 18 + 8;
        let row_height = (height as f64 - plot_top as f64 - 12.0 - 30.0) / bars.len() as f64;
        for (i, (label, value)) in bars.iter().enumerate() {
            let y = bars.len() as f64 - i as f64;
            // One colour per group (the label's part before the colon).
            let group = label.split(':').next().unwrap_or("");
            let group_index = groups.iter().position(|g| *g == group).unwrap_or(0);
            let color = COLORS[group_index % COLORS.len()];
            chart.draw_series(std::iter::once(Rectangle::new(
                [(lo, y - 0.85), (*value, y - 0.15)],
                color.filled(),
            )))?;
            chart.draw_series(std::iter::once(Text::new(
                format!("{value:.2}"),
                (value * 1.05, y - 0.35),
                ("sans-serif", 12),
            )))?;
            let label_y = plot_top + (row_height * (i as f64 + 0.35)) as i32;
            labels.draw(&Text::new(
                label.clone(),
                (6, label_y),
                ("sans-serif", 12).into_font(),
            ))?;
        }
        root.present()?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_second_bins() {
        assert_eq!(
            per_second(&[0.2, 0.9, 1.5, 3.0]),
            vec![(0.5, 2.0), (1.5, 1.0), (2.5, 0.0), (3.5, 1.0)]
        );
        assert!(per_second(&[]).is_empty());
    }

    #[test]
    fn a_report_of_a_small_run_is_one_html_file() {
        let run = serde_json::json!({
            "machine": {"cores": 2, "date": "2026-01-01T00:00:00Z"},
            "suites": {
                "start": {
                    "template": "python",
                    "samples_ms": {"warm pool": [0.8, 1.1], "cold boot per job": [500.0, 640.0]},
                    "pool_idle": {"t_s": [0.0, 0.1], "idle": {"python": [2, 1]}},
                    "ratios": [{"measure": "m", "method": "a", "baseline": "b", "value": 2.5}],
                },
                "throughput": {"templates": [{
                    "template": "python",
                    "methods": {"bare restore loop": {"per_s": 4.0, "job_ms": [300.0, 310.0]}},
                    "shardbox_done_s": [0.5, 1.2],
                    "pool_idle": {"t_s": [0.0], "idle": {"python": [3]}},
                }, {"template": "python-sci", "skipped": "no <rootfs>"}]},
                "scheduler": {"error": "boom"},
            },
        });
        let html = render(&run).unwrap();
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert_eq!(html.matches("<svg").count(), 5, "{html}");
        assert!(html.contains("no &lt;rootfs&gt;"));
        assert!(html.contains("failed: boom"));
        assert!(!html.contains("<script"));
    }
}
