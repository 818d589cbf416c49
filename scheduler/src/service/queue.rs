//! Per-template job queues, split into shards that are locked separately.
//!
//! A queue holds no job bodies, only runs of consecutive line numbers ([`Run`]) per batch: a
//! batch of ten million lines for one template is a single run until jobs come back for another
//! attempt. Batches are spread over the shards by id; a lease looks at the highest priority
//! present in any shard and takes from the batches of that priority in turn, a fair share each,
//! so a small batch is never stuck behind a large one of the same priority.
//!
//! The time a run was queued at is a type parameter: the service uses tokio's [`Instant`], the
//! capacity planner (`crate::plan`) its simulated clock in microseconds.

use std::cmp::Reverse;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Consecutive lines of one batch, all queued at the same attempt since the same moment `T`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run<T = Instant> {
    /// First line of the run.
    pub start: u64,
    /// One past the last line.
    pub end: u64,
    /// The attempt the jobs will make when leased, from 1.
    pub attempt: u32,
    /// When the jobs were queued.
    pub since: T,
}

impl<T> Run<T> {
    fn len(&self) -> u64 {
        self.end - self.start
    }
}

/// A job taken from a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken<T = Instant> {
    /// Its batch.
    pub batch: u64,
    /// Its line.
    pub line: u64,
    /// The attempt it makes now.
    pub attempt: u32,
    /// When it was queued.
    pub since: T,
}

/// Sort key of a batch in a shard: higher priority first, then older batches.
type BatchKey = (Reverse<i32>, u64);

#[derive(Debug)]
struct Shard<T> {
    batches: BTreeMap<BatchKey, VecDeque<Run<T>>>,
    /// Where the last lease stopped among the batches of the top priority.
    cursor: Option<BatchKey>,
}

impl<T> Default for Shard<T> {
    fn default() -> Self {
        Shard {
            batches: BTreeMap::new(),
            cursor: None,
        }
    }
}

/// Marks an empty shard in [`TemplateQueue`]'s priority cache.
const EMPTY: i64 = i64::MIN;

/// The queue of one template, its runs stamped with times of type `T`.
#[derive(Debug)]
pub struct TemplateQueue<T = Instant> {
    shards: Vec<Mutex<Shard<T>>>,
    /// Highest priority queued in each shard, or [`EMPTY`].
    top: Vec<AtomicI64>,
    /// Batches of that priority in each shard, for sharing a lease between shards.
    top_batches: Vec<AtomicUsize>,
    /// Where the next lease starts looking, so shards take turns.
    next_shard: AtomicUsize,
    /// Woken when jobs are queued.
    pub queued: Notify,
}

impl<T: Copy> TemplateQueue<T> {
    /// An empty queue of `shards` shards (at least one).
    pub fn new(shards: usize) -> Self {
        let shards = shards.max(1);
        TemplateQueue {
            shards: (0..shards).map(|_| Mutex::new(Shard::default())).collect(),
            top: (0..shards).map(|_| AtomicI64::new(EMPTY)).collect(),
            top_batches: (0..shards).map(|_| AtomicUsize::new(0)).collect(),
            next_shard: AtomicUsize::new(0),
            queued: Notify::new(),
        }
    }

    fn shard_of(&self, batch: u64) -> usize {
        (batch % self.shards.len() as u64) as usize
    }

    /// Queues lines `start..end` of `batch` at `attempt`.
    pub fn push(&self, batch: u64, priority: i32, run: Run<T>) {
        if run.start >= run.end {
            return;
        }
        let index = self.shard_of(batch);
        let mut shard = self.shards[index].lock();
        let runs = shard.batches.entry((Reverse(priority), batch)).or_default();
        match runs.back_mut() {
            Some(last) if last.end == run.start && last.attempt == run.attempt => {
                last.end = run.end;
            }
            _ => runs.push_back(run),
        }
        self.refresh_top(index, &shard);
        drop(shard);
        self.queued.notify_waiters();
    }

    fn refresh_top(&self, index: usize, shard: &Shard<T>) {
        let top = shard
            .batches
            .keys()
            .next()
            .map_or(EMPTY, |(Reverse(p), _)| i64::from(*p));
        let count = shard
            .batches
            .keys()
            .take_while(|(Reverse(p), _)| i64::from(*p) == top)
            .count();
        self.top[index].store(top, Ordering::Relaxed);
        self.top_batches[index].store(count, Ordering::Relaxed);
    }

    /// Takes up to `want` jobs: from the highest priority queued, a fair share of each batch of
    /// that priority in turn.
    pub fn take(&self, want: usize, out: &mut Vec<Taken<T>>) {
        let mut left = want;
        while left > 0 {
            let best = self.top.iter().map(|t| t.load(Ordering::Relaxed)).max();
            let Some(best) = best.filter(|b| *b != EMPTY) else {
                return;
            };
            let count = self.shards.len();
            let first = self.next_shard.fetch_add(1, Ordering::Relaxed) % count;
            // Each shard's share of this round follows how many batches of the top priority
            // it holds, so batches are served alike whichever shard they fell in.
            let at_best: Vec<(usize, usize)> = (0..count)
                .map(|step| (first + step) % count)
                .filter(|i| self.top[*i].load(Ordering::Relaxed) == best)
                .map(|i| (i, self.top_batches[i].load(Ordering::Relaxed).max(1)))
                .collect();
            let total: usize = at_best.iter().map(|(_, n)| n).sum();
            let round = left;
            let mut progressed = false;
            for (index, batches) in at_best {
                let share = (round * batches).div_ceil(total).min(left);
                let mut shard = self.shards[index].lock();
                let got = take_from_shard(&mut shard, best, share, out);
                self.refresh_top(index, &shard);
                left -= got;
                progressed |= got > 0;
                if left == 0 {
                    break;
                }
            }
            if !progressed {
                return;
            }
        }
    }

    /// Removes every queued line of `batch`, returning them.
    pub fn remove_batch(&self, batch: u64, priority: i32) -> Vec<u64> {
        let index = self.shard_of(batch);
        let mut shard = self.shards[index].lock();
        let runs = shard
            .batches
            .remove(&(Reverse(priority), batch))
            .unwrap_or_default();
        self.refresh_top(index, &shard);
        runs.into_iter()
            .flat_map(|run| run.start..run.end)
            .collect()
    }

    /// Jobs queued for `batch`.
    pub fn queued_of(&self, batch: u64, priority: i32) -> u64 {
        let shard = self.shards[self.shard_of(batch)].lock();
        shard
            .batches
            .get(&(Reverse(priority), batch))
            .map_or(0, |runs| runs.iter().map(Run::len).sum())
    }

    /// Jobs queued in all.
    pub fn len(&self) -> u64 {
        self.shards
            .iter()
            .map(|shard| {
                let shard = shard.lock();
                shard.batches.values().flatten().map(Run::len).sum::<u64>()
            })
            .sum()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.top.iter().all(|t| t.load(Ordering::Relaxed) == EMPTY)
    }
}

/// Takes up to `want` jobs from the batches of priority `best` in one shard, round robin from
/// the shard's cursor, and returns how many it took.
fn take_from_shard<T: Copy>(
    shard: &mut Shard<T>,
    best: i64,
    want: usize,
    out: &mut Vec<Taken<T>>,
) -> usize {
    let keys: Vec<BatchKey> = shard
        .batches
        .keys()
        .take_while(|(Reverse(p), _)| i64::from(*p) == best)
        .copied()
        .collect();
    if keys.is_empty() {
        return 0;
    }
    // Start after the batch served last, so every batch gets its turn.
    let start = shard
        .cursor
        .and_then(|c| keys.iter().position(|k| *k > c))
        .unwrap_or(0);
    let share = want.div_ceil(keys.len()).max(1);
    let mut taken = 0;
    for step in 0..keys.len() {
        if taken == want {
            break;
        }
        let key = keys[(start + step) % keys.len()];
        let runs = shard.batches.get_mut(&key).expect("key listed above");
        let mut quota = share.min(want - taken);
        while quota > 0 {
            let Some(run) = runs.front_mut() else { break };
            let n = (run.len() as usize).min(quota);
            for line in run.start..run.start + n as u64 {
                out.push(Taken {
                    batch: key.1,
                    line,
                    attempt: run.attempt,
                    since: run.since,
                });
            }
            run.start += n as u64;
            if run.start == run.end {
                runs.pop_front();
            }
            quota -= n;
            taken += n;
        }
        if runs.is_empty() {
            shard.batches.remove(&key);
        }
        shard.cursor = Some(key);
    }
    taken
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(start: u64, end: u64) -> Run {
        Run {
            start,
            end,
            attempt: 1,
            since: Instant::now(),
        }
    }

    fn take(queue: &TemplateQueue, want: usize) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        queue.take(want, &mut out);
        out.into_iter().map(|t| (t.batch, t.line)).collect()
    }

    #[test]
    fn consecutive_pushes_merge_into_one_run() {
        let queue = TemplateQueue::new(1);
        queue.push(1, 0, run(1, 5));
        queue.push(1, 0, run(5, 9));
        assert_eq!(
            queue.shards[0]
                .lock()
                .batches
                .values()
                .next()
                .unwrap()
                .len(),
            1
        );
        assert_eq!(queue.len(), 8);
        assert_eq!(take(&queue, 3), vec![(1, 1), (1, 2), (1, 3)]);
        assert_eq!(queue.len(), 5);
    }

    #[test]
    fn a_small_batch_is_served_beside_a_large_one() {
        let queue = TemplateQueue::new(4);
        queue.push(1, 0, run(1, 10_000_001));
        queue.push(2, 0, run(1, 11));
        let got = take(&queue, 20);
        let small = got.iter().filter(|(b, _)| *b == 2).count();
        assert_eq!(got.len(), 20);
        assert_eq!(
            small, 10,
            "the ten-job batch gets its share at once: {got:?}"
        );
    }

    #[test]
    fn higher_priority_goes_first_across_shards() {
        let queue = TemplateQueue::new(3);
        queue.push(1, 0, run(1, 100));
        queue.push(2, 5, run(1, 4));
        queue.push(4, 5, run(1, 2));
        let got = take(&queue, 6);
        assert_eq!(
            &got[..4].iter().filter(|(b, _)| *b == 2 || *b == 4).count(),
            &4
        );
        assert!(got[4..].iter().all(|(b, _)| *b == 1), "{got:?}");
    }

    #[test]
    fn batches_take_turns_between_leases() {
        let queue = TemplateQueue::new(1);
        for batch in 1..=3 {
            queue.push(batch, 0, run(1, 100));
        }
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.extend(take(&queue, 1).into_iter().map(|(b, _)| b));
        }
        seen.sort_unstable();
        assert_eq!(seen, vec![1, 2, 3]);
    }

    #[test]
    fn removing_a_batch_returns_its_lines() {
        let queue = TemplateQueue::new(2);
        queue.push(3, 0, run(1, 4));
        queue.push(
            3,
            0,
            Run {
                attempt: 2,
                ..run(7, 8)
            },
        );
        queue.push(4, 0, run(1, 2));
        assert_eq!(queue.remove_batch(3, 0), vec![1, 2, 3, 7]);
        assert_eq!(queue.len(), 1);
        assert_eq!(queue.queued_of(3, 0), 0);
        assert!(!queue.is_empty());
    }
}
