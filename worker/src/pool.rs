//! Warm pools: per template, restored (or cold-booted) sandboxes already woken and waiting for a
//! job, refilled in the background.
//!
//! A pool aims for `max_idle` idle sandboxes while there is demand (someone waiting, or a
//! sandbox taken in the last few seconds) and for `min_idle` otherwise, with at most
//! `max_in_flight` starts at once. [`Pool::acquire`] hands over an idle sandbox or waits for
//! one; it never fails for lack of a sandbox, only when the template keeps failing to start.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::sandbox::Sandbox;
use crate::template::Template;

/// After this many starts in a row fail, the pool gives up and fails its waiters.
const MAX_CONSECUTIVE_FAILURES: u32 = 5;

/// How long after the last take a pool keeps aiming for `max_idle`.
const DEMAND_WINDOW: Duration = Duration::from_secs(5);

/// Why no sandbox could be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PoolError {
    /// Sandboxes of this template keep failing to start.
    #[error("template {template}: sandboxes keep failing to start: {last_error}")]
    Broken {
        /// The template.
        template: String,
        /// The last start error.
        last_error: String,
    },
    /// The worker is shutting down.
    #[error("the worker is shutting down")]
    Closed,
}

#[derive(Debug, Default)]
struct State {
    idle: VecDeque<Sandbox>,
    in_flight: usize,
    waiters: usize,
    last_take: Option<Instant>,
    failures: u32,
    broken: Option<String>,
    closed: bool,
}

/// The warm pool of one template.
#[derive(Debug)]
pub struct Pool {
    template: Arc<Template>,
    state: Mutex<State>,
    /// Wakes the refill loop (a take, a finished start, shutdown).
    refill: Notify,
    /// Wakes waiters (a new idle sandbox, a broken or closed pool).
    ready: Notify,
    started: AtomicUsize,
}

impl Pool {
    /// A pool for `template`, with its refill loop running.
    pub fn start(template: Arc<Template>) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            template,
            state: Mutex::new(State::default()),
            refill: Notify::new(),
            ready: Notify::new(),
            started: AtomicUsize::new(0),
        });
        tokio::spawn(Arc::clone(&pool).refill_loop());
        pool
    }

    /// The pool's template.
    pub fn template(&self) -> &Arc<Template> {
        &self.template
    }

    /// How many sandboxes are idle now.
    pub fn idle(&self) -> usize {
        self.state.lock().idle.len()
    }

    /// How many sandboxes the pool has started in all.
    pub fn started(&self) -> usize {
        self.started.load(Ordering::Relaxed)
    }

    /// Takes an idle sandbox, waiting for one if none is idle. Dropping the future while it
    /// waits is fine: the pool stops counting the waiter.
    ///
    /// # Errors
    /// [`PoolError`] when the template is broken or the pool closed.
    pub async fn acquire(&self) -> Result<Sandbox, PoolError> {
        let _waiting = Waiting::new(self);
        loop {
            let notified = self.ready.notified();
            let taken = {
                let mut state = self.state.lock();
                if state.closed {
                    return Err(PoolError::Closed);
                }
                if let Some(last_error) = state.broken.clone() {
                    let template = self.template.name.clone();
                    return Err(PoolError::Broken {
                        template,
                        last_error,
                    });
                }
                let taken = state.idle.pop_front();
                if taken.is_some() {
                    state.last_take = Some(Instant::now());
                    self.publish(&state);
                }
                taken
            };
            self.refill.notify_one();
            match taken {
                Some(mut sandbox) => {
                    if sandbox.is_alive() {
                        return Ok(sandbox);
                    }
                    tracing::warn!(
                        sandbox_id = sandbox.id(),
                        "idle sandbox died; discarding it"
                    );
                    tokio::spawn(sandbox.discard());
                }
                None => notified.await,
            }
        }
    }

    /// Stops refilling and destroys every idle sandbox.
    pub async fn close(&self) {
        let idle: Vec<Sandbox> = {
            let mut state = self.state.lock();
            state.closed = true;
            state.idle.drain(..).collect()
        };
        self.refill.notify_one();
        self.ready.notify_waiters();
        let mut teardowns = tokio::task::JoinSet::new();
        for sandbox in idle {
            teardowns.spawn(sandbox.discard());
        }
        teardowns.join_all().await;
        // Starts still in flight put their sandbox back into a closed pool, which discards it.
        while self.state.lock().in_flight > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn target(&self, state: &State) -> usize {
        let pool = &self.template.config.pool;
        let busy =
            state.waiters > 0 || state.last_take.is_some_and(|t| t.elapsed() < DEMAND_WINDOW);
        if busy {
            pool.max_idle.max(state.waiters.min(pool.max_idle))
        } else {
            pool.min_idle
        }
    }

    fn publish(&self, state: &State) {
        metrics::gauge!("shardbox_pool_idle_sandboxes", "template" => self.template.name.clone())
            .set(state.idle.len() as f64);
    }

    async fn refill_loop(self: Arc<Self>) {
        let max_in_flight = self.template.config.pool.max_in_flight;
        loop {
            let notified = self.refill.notified();
            let to_start = {
                let mut state = self.state.lock();
                if state.closed {
                    return;
                }
                let have = state.idle.len() + state.in_flight;
                let want = self.target(&state);
                let n = want
                    .saturating_sub(have)
                    .min(max_in_flight - state.in_flight);
                if state.broken.is_some() {
                    0
                } else {
                    state.in_flight += n;
                    n
                }
            };
            for _ in 0..to_start {
                tokio::spawn(Arc::clone(&self).start_one());
            }
            // Re-check now and then even without a wake-up, so the demand window can lapse.
            let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
        }
    }

    async fn start_one(self: Arc<Self>) {
        let method = self.template.report.fill;
        let labels = [
            ("template", self.template.name.clone()),
            ("method", method.as_str().into()),
        ];
        metrics::counter!("shardbox_sandbox_starts_total", &labels).increment(1);
        let result = self.template.start(method).await;
        let discard = {
            let mut state = self.state.lock();
            // A sandbox started for a closed pool stays counted in flight until it is gone, so
            // that `close` waits for it.
            let closed_with_sandbox = state.closed && result.is_ok();
            if !closed_with_sandbox {
                state.in_flight -= 1;
            }
            match result {
                Ok(sandbox) => {
                    metrics::histogram!("shardbox_sandbox_start_seconds", &labels)
                        .record(sandbox.started_in().as_secs_f64());
                    self.started.fetch_add(1, Ordering::Relaxed);
                    state.failures = 0;
                    if state.closed {
                        Some(sandbox)
                    } else {
                        state.idle.push_back(sandbox);
                        self.publish(&state);
                        None
                    }
                }
                Err(err) => {
                    metrics::counter!("shardbox_sandbox_start_failures_total", &labels)
                        .increment(1);
                    state.failures += 1;
                    tracing::warn!(template = %self.template.name, error = %err,
                        failures = state.failures, "sandbox start failed");
                    if state.failures >= MAX_CONSECUTIVE_FAILURES {
                        tracing::error!(template = %self.template.name, error = %err,
                            "template marked broken after repeated start failures");
                        state.broken = Some(err.to_string());
                    }
                    None
                }
            }
        };
        if let Some(sandbox) = discard {
            sandbox.discard().await;
            self.state.lock().in_flight -= 1;
        }
        let failures = self.state.lock().failures;
        if failures > 0 {
            // Back off a little before the loop tries again.
            tokio::time::sleep(Duration::from_millis(200 * u64::from(failures))).await;
        }
        self.ready.notify_waiters();
        self.refill.notify_one();
    }
}

/// Counts one waiter of a pool for as long as it lives.
struct Waiting<'a>(&'a Pool);

impl<'a> Waiting<'a> {
    fn new(pool: &'a Pool) -> Self {
        pool.state.lock().waiters += 1;
        Waiting(pool)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.state.lock().waiters -= 1;
    }
}
