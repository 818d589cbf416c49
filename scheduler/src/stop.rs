//! How a run is asked to stop: first gently (take no new jobs, let running ones finish), then
//! at once (cancel running jobs too).

use std::sync::Arc;

use tokio::sync::watch;

/// How far a run has been asked to stop. Levels only ever go up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StopLevel {
    /// Keep going.
    Run,
    /// Start no more jobs: jobs not yet started get `cancelled` results; running jobs finish.
    Drain,
    /// As [`StopLevel::Drain`], and running jobs are cancelled too and no more batch lines are
    /// read.
    Abort,
}

/// A cloneable handle on a run's stop level.
#[derive(Debug, Clone)]
pub struct Stop {
    tx: Arc<watch::Sender<StopLevel>>,
}

impl Default for Stop {
    fn default() -> Self {
        Self::new()
    }
}

impl Stop {
    /// A handle at [`StopLevel::Run`].
    pub fn new() -> Self {
        Stop {
            tx: Arc::new(watch::Sender::new(StopLevel::Run)),
        }
    }

    /// Raises the level to `level` (never lowers it); returns whether it rose.
    pub fn raise(&self, level: StopLevel) -> bool {
        self.tx.send_if_modified(|current| {
            let rises = level > *current;
            if rises {
                *current = level;
            }
            rises
        })
    }

    /// Asks for [`StopLevel::Drain`].
    pub fn drain(&self) -> bool {
        self.raise(StopLevel::Drain)
    }

    /// Asks for [`StopLevel::Abort`].
    pub fn abort(&self) -> bool {
        self.raise(StopLevel::Abort)
    }

    /// The current level.
    pub fn level(&self) -> StopLevel {
        *self.tx.borrow()
    }

    /// Whether the level is at least `level`.
    pub fn reached(&self, level: StopLevel) -> bool {
        self.level() >= level
    }

    /// Waits until the level is at least `level`.
    pub async fn wait_for(&self, level: StopLevel) {
        let mut rx = self.tx.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|current| *current >= level).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn levels_only_rise_and_wake_waiters() {
        let stop = Stop::new();
        let waiter = {
            let stop = stop.clone();
            tokio::spawn(async move { stop.wait_for(StopLevel::Drain).await })
        };
        assert!(!stop.reached(StopLevel::Drain));
        assert!(stop.abort());
        assert!(!stop.drain());
        assert_eq!(stop.level(), StopLevel::Abort);
        waiter.await.unwrap();
        // Already reached: returns at once.
        stop.wait_for(StopLevel::Drain).await;
    }
}
