//! The progress bar on stderr: jobs done out of those read so far, rate, counts per status.
//! Shown only when asked for (the binary asks when stderr is a terminal).

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::summary::Summary;

const TEMPLATE: &str =
    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} jobs ({per_sec}, eta {eta}) {msg}";

/// A progress bar, or nothing.
#[derive(Debug, Clone)]
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A bar drawn on stderr when `visible`, otherwise a no-op.
    pub fn new(visible: bool) -> Self {
        let bar = visible.then(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(TEMPLATE)
                .expect("the progress template is valid")
                .progress_chars("=> ");
            bar.set_style(style);
            bar
        });
        Progress { bar }
    }

    /// A progress bar that draws nothing.
    pub fn hidden() -> Self {
        Progress { bar: None }
    }

    /// Starts the clock (rate and elapsed time count from here) and the spinner.
    pub fn start(&self) {
        if let Some(bar) = &self.bar {
            bar.reset();
            bar.enable_steady_tick(Duration::from_millis(200));
        }
    }

    /// One more job is known (a batch line was read).
    pub fn add_known(&self) {
        if let Some(bar) = &self.bar {
            bar.inc_length(1);
        }
    }

    /// The number of jobs known is `total` (a batch's size, once the scheduler knows it).
    pub fn set_known(&self, total: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(total);
        }
    }

    /// One more result was written; `summary` holds the counts so far.
    pub fn add_done(&self, summary: &Summary) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
            bar.set_message(summary.status_counts());
        }
    }

    /// Prints a line above the bar (or plainly, when there is no bar) on stderr.
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    /// Removes the bar from the screen.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
