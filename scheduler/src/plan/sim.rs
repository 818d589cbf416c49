//! The discrete-event simulation behind `shardbox plan`.
//!
//! A virtual clock in microseconds jumps from one event to the next (a radix heap of timed
//! events), so a simulated hour costs only the work of its events. Jobs are queued in the real
//! [`TemplateQueue`] (shards, priorities, fair share between batches), stamped with simulated
//! time. Simulated nodes lease like `shardbox worker`: up to their free capacity at once, and a
//! node that finds the queue empty waits (the long poll) until jobs are queued.
//!
//! A simulated node with sandbox isolation keeps a warm pool the way `worker::pool` does: it
//! aims for `pool_size` idle sandboxes (counting restores in flight) while there is demand, for
//! `min_idle` otherwise, with at most `max_in_flight` restores at once; each job takes one
//! sandbox (its `start_us` is the handoff when one is idle, otherwise the wait for a restore
//! too) and the sandbox is destroyed after. With process isolation a node runs `slots` jobs at
//! once, each paying the handoff.

use std::collections::VecDeque;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::durations::Durations;
use super::fleet::{NodeIsolation, NodeSpec, Workload};
use crate::service::queue::{Run, Taken, TemplateQueue};

/// How long after its last take a simulated pool keeps aiming for `pool_size` (as the real
/// pool's demand window).
const DEMAND_WINDOW_US: u64 = 5_000_000;

/// Arrivals at a rate are queued in steps of this many microseconds.
const ARRIVAL_STEP_US: u64 = 1_000;

/// Shards of the simulated template queue, as the service's default.
const SHARDS: usize = 4;

/// Highest value the histograms tell apart, in microseconds (a week).
const MAX_US: u64 = 7 * 24 * 3_600_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    /// Queue the jobs that have arrived by now.
    Arrival,
    /// A lease answer reaches the node.
    Leased(u32),
    /// A restore on the node has finished.
    Restored(u32),
    /// A job on the node has ended.
    Done(u32),
}

impl Event {
    /// The event packed below its time in a heap key: the kind in bits 32..34, the node below.
    /// Events at the same time run in the order of kind, then node (deterministic, as the
    /// heap's order depends only on its keys).
    fn pack(self) -> u64 {
        match self {
            Event::Arrival => 0,
            Event::Leased(node) => 1 << 32 | u64::from(node),
            Event::Restored(node) => 2 << 32 | u64::from(node),
            Event::Done(node) => 3 << 32 | u64::from(node),
        }
    }

    fn unpack(key: u64) -> Event {
        let node = key as u32;
        match key >> 32 {
            0 => Event::Arrival,
            1 => Event::Leased(node),
            2 => Event::Restored(node),
            _ => Event::Done(node),
        }
    }
}

/// A heap key: the time in the high 64 bits, the packed event below.
fn key(at: u64, event: Event) -> u128 {
    u128::from(at) << 64 | u128::from(event.pack())
}

/// A radix heap: a priority queue for keys that never go below the last one popped, as the
/// times of a simulation's events. Keys sit in buckets by the highest bit in which they differ
/// from the last key popped; a pop empties the lowest non-empty bucket into lower ones. Each
/// key moves at most once per bit, so a million pending events cost far less than in a binary
/// heap, whose pops wander the whole of it.
#[derive(Debug)]
struct RadixHeap {
    buckets: Vec<Vec<u128>>,
    last: u128,
    len: usize,
}

impl RadixHeap {
    fn new() -> Self {
        RadixHeap {
            buckets: (0..=128).map(|_| Vec::new()).collect(),
            last: 0,
            len: 0,
        }
    }

    fn bucket(&self, key: u128) -> usize {
        (128 - (key ^ self.last).leading_zeros()) as usize
    }

    fn push(&mut self, key: u128) {
        debug_assert!(key >= self.last, "an event in the past");
        let b = self.bucket(key);
        self.buckets[b].push(key);
        self.len += 1;
    }

    fn pop(&mut self) -> Option<u128> {
        if self.len == 0 {
            return None;
        }
        if self.buckets[0].is_empty() {
            let i = (1..self.buckets.len())
                .find(|i| !self.buckets[*i].is_empty())
                .expect("a non-empty bucket");
            let keys = std::mem::take(&mut self.buckets[i]);
            self.last = *keys.iter().min().expect("non-empty");
            for key in &keys {
                let b = self.bucket(*key);
                self.buckets[b].push(*key);
            }
            // Keep the bucket's allocation for later.
            let mut keys = keys;
            keys.clear();
            if self.buckets[i].is_empty() {
                self.buckets[i] = keys;
            }
        }
        self.len -= 1;
        self.buckets[0].pop()
    }
}

/// A job a node has leased and not yet started.
#[derive(Debug, Clone, Copy)]
struct Pending {
    /// When it was queued.
    since: u64,
    /// When the node got it (the lease answer arrived).
    taken: u64,
}

#[derive(Debug, Default)]
struct Node {
    idle: u32,
    restoring: u32,
    running: u32,
    /// Leased jobs: on their way (lease answer not yet arrived) or waiting for a sandbox.
    pending: VecDeque<Pending>,
    /// Jobs leased whose answer has not arrived.
    in_lease: u32,
    last_take: Option<u64>,
    waiting: bool,
}

/// What a simulated run found.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// Simulated nodes.
    pub nodes: u32,
    /// Jobs run.
    pub jobs: u64,
    /// From the first job queued to the last result, in seconds.
    pub makespan_s: f64,
    /// Sustained throughput: the jobs completed between the 10th and the 90th percentile of
    /// completions, per hour (ramp-up and the tail left out).
    pub jobs_per_hour: f64,
    /// Jobs over the whole makespan, per hour.
    pub overall_jobs_per_hour: f64,
    /// Queue wait (`queue_ms`) percentiles.
    pub queue_ms: Percentiles,
    /// `start_us` percentiles: from the node getting the job to its handoff being done.
    pub start_us: Percentiles,
    /// Share of the nodes' job capacity busy with jobs over the makespan.
    pub node_utilisation: f64,
    /// Share of the nodes' restore slots busy over the makespan (sandbox isolation).
    pub restore_utilisation: f64,
    /// Restores performed.
    pub restores: u64,
    /// Events the simulation processed.
    pub events: u64,
    /// Wall time the simulation took, in seconds.
    pub sim_wall_s: f64,
}

/// 50th, 90th, 99th percentiles and the maximum.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Maximum.
    pub max: u64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>, divisor: u64) -> Self {
        Percentiles {
            p50: h.value_at_quantile(0.50) / divisor,
            p90: h.value_at_quantile(0.90) / divisor,
            p99: h.value_at_quantile(0.99) / divisor,
            max: h.max() / divisor,
        }
    }
}

struct Sim<'a> {
    spec: &'a NodeSpec,
    workload: &'a Workload,
    durations: Durations,
    now: u64,
    heap: RadixHeap,
    /// Events due now (no delay), run in order before the heap's; so that the heap only ever
    /// gets keys after the last one it gave.
    immediate: VecDeque<Event>,
    queue: TemplateQueue<u64>,
    nodes: Vec<Node>,
    /// Nodes with free capacity that found the queue empty, in the order they asked.
    waiting: VecDeque<u32>,
    taken: Vec<Taken<u64>>,
    capacity: u32,
    restore_us: u64,
    /// Jobs queued so far, and per batch the next line.
    queued: u64,
    next_line: Vec<u64>,
    completed: u64,
    /// When the last job ended.
    last_done: u64,
    busy_us: u128,
    restores: u64,
    events: u64,
    first_decile: Option<u64>,
    ninth_decile: Option<u64>,
    queue_us: Histogram<u64>,
    start_us: Histogram<u64>,
}

/// Runs the workload on `nodes` simulated nodes of `spec`.
pub fn simulate(spec: &NodeSpec, nodes: u32, workload: &Workload, durations: Durations) -> Outcome {
    let wall = std::time::Instant::now();
    let histogram = || Histogram::new_with_bounds(1, MAX_US, 3).expect("valid bounds");
    let mut sim = Sim {
        spec,
        workload,
        durations,
        now: 0,
        heap: RadixHeap::new(),
        immediate: VecDeque::new(),
        queue: TemplateQueue::new(SHARDS),
        nodes: (0..nodes).map(|_| Node::default()).collect(),
        waiting: VecDeque::new(),
        taken: Vec::new(),
        capacity: spec.capacity(),
        restore_us: spec.restore_us(),
        queued: 0,
        next_line: vec![1; workload.batches as usize],
        completed: 0,
        last_done: 0,
        busy_us: 0,
        restores: 0,
        events: 0,
        first_decile: None,
        ninth_decile: None,
        queue_us: histogram(),
        start_us: histogram(),
    };
    sim.start();
    loop {
        let event = if let Some(event) = sim.immediate.pop_front() {
            event
        } else if let Some(key) = sim.heap.pop() {
            sim.now = (key >> 64) as u64;
            Event::unpack(key as u64)
        } else {
            break;
        };
        sim.events += 1;
        match event {
            Event::Arrival => sim.arrive(),
            Event::Leased(node) => sim.leased(node),
            Event::Restored(node) => sim.restored(node),
            Event::Done(node) => sim.done(node),
        }
    }
    sim.outcome(nodes, wall.elapsed().as_secs_f64())
}

impl Sim<'_> {
    fn at(&mut self, delay: u64, event: Event) {
        if delay == 0 {
            self.immediate.push_back(event);
        } else {
            self.heap.push(key(self.now + delay, event));
        }
    }

    fn start(&mut self) {
        for index in 0..self.nodes.len() as u32 {
            if self.spec.isolation == NodeIsolation::Sandbox {
                if self.spec.warm_at_start {
                    self.nodes[index as usize].idle = self.spec.pool_size;
                } else {
                    // A worker that has just started: its pool aims for min_idle.
                    self.refill(index);
                }
            }
        }
        self.arrive();
        for index in 0..self.nodes.len() as u32 {
            self.lease(index);
        }
    }

    /// Queues what has arrived by now and wakes waiting nodes.
    fn arrive(&mut self) {
        let total = self.workload.jobs;
        let due = match self.workload.arrival_per_s {
            None => total,
            Some(rate) => ((self.now as f64 / 1e6 * rate).floor() as u64 + 1).min(total),
        };
        let mut count = due - self.queued;
        let batches = self.next_line.len() as u64;
        for batch in 0..batches {
            // Spread evenly: the first `count % batches` batches get one more.
            let n = count.div_ceil(batches - batch).min(count);
            if n == 0 {
                continue;
            }
            let start = self.next_line[batch as usize];
            self.queue.push(
                batch + 1,
                0,
                Run {
                    start,
                    end: start + n,
                    attempt: 1,
                    since: self.now,
                },
            );
            self.next_line[batch as usize] += n;
            count -= n;
        }
        self.queued = due;
        if self.queued < total {
            let rate = self
                .workload
                .arrival_per_s
                .expect("only rates arrive in steps");
            // Step to the next whole job, at least ARRIVAL_STEP_US on.
            let next_job_us = ((self.queued as f64) / rate * 1e6).ceil() as u64;
            let delay = next_job_us.saturating_sub(self.now).max(ARRIVAL_STEP_US);
            self.at(delay, Event::Arrival);
        }
        while !self.queue.is_empty() {
            let Some(node) = self.waiting.pop_front() else {
                break;
            };
            self.nodes[node as usize].waiting = false;
            self.lease(node);
        }
    }

    /// The node asks for up to its free capacity; finding nothing, it waits.
    fn lease(&mut self, index: u32) {
        let node = &self.nodes[index as usize];
        if node.waiting {
            return;
        }
        let busy = node.running + node.pending.len() as u32;
        let free = self.capacity.saturating_sub(busy);
        if free == 0 {
            return;
        }
        self.taken.clear();
        self.queue.take(free as usize, &mut self.taken);
        let node = &mut self.nodes[index as usize];
        // Short of what it asked for, the node asks again at once, as the agent does, and
        // waits on the queue (the long poll) until more jobs arrive.
        if self.taken.len() < free as usize && self.queued < self.workload.jobs {
            node.waiting = true;
            self.waiting.push_back(index);
        }
        if self.taken.is_empty() {
            return;
        }
        let taken = self.now + self.spec.lease_us;
        for job in &self.taken {
            node.pending.push_back(Pending {
                since: job.since,
                taken,
            });
        }
        node.in_lease += self.taken.len() as u32;
        let delay = self.spec.lease_us;
        self.at(delay, Event::Leased(index));
    }

    /// A lease answer arrived: its jobs may start.
    fn leased(&mut self, index: u32) {
        let node = &mut self.nodes[index as usize];
        let now = self.now;
        let arrived = node
            .pending
            .iter()
            .rev()
            .take(node.in_lease as usize)
            .filter(|p| p.taken <= now)
            .count() as u32;
        node.in_lease -= arrived;
        self.start_jobs(index);
    }

    /// Starts the node's pending jobs that have arrived, while it has sandboxes or slots.
    fn start_jobs(&mut self, index: u32) {
        let sandbox = self.spec.isolation == NodeIsolation::Sandbox;
        loop {
            let node = &mut self.nodes[index as usize];
            let ready = node.pending.len() as u32 - node.in_lease;
            if ready == 0 {
                break;
            }
            if sandbox {
                if node.idle == 0 {
                    break;
                }
                node.idle -= 1;
                node.last_take = Some(self.now);
            } else if node.running >= self.spec.slots {
                break;
            }
            let job = node.pending.pop_front().expect("a ready job");
            node.running += 1;
            let handoff = self.spec.handoff_us;
            let run = self.durations.next_us();
            self.queue_us
                .saturating_record((job.taken - job.since).max(1));
            self.start_us
                .saturating_record((self.now + handoff - job.taken).max(1));
            self.busy_us += u128::from(handoff + run);
            self.at(handoff + run, Event::Done(index));
        }
        if sandbox {
            self.refill(index);
        }
    }

    /// Starts restores toward the pool's target, as the real pool's refill loop does.
    fn refill(&mut self, index: u32) {
        let node = &mut self.nodes[index as usize];
        let waiters = node.pending.len() as u32 - node.in_lease;
        let busy = waiters > 0
            || node
                .last_take
                .is_some_and(|t| self.now.saturating_sub(t) < DEMAND_WINDOW_US);
        let target = if busy {
            self.spec.pool_size
        } else {
            self.spec.min_idle()
        };
        let have = node.idle + node.restoring;
        let n = target
            .saturating_sub(have)
            .min(self.spec.max_in_flight.saturating_sub(node.restoring));
        node.restoring += n;
        self.restores += u64::from(n);
        for _ in 0..n {
            self.at(self.restore_us, Event::Restored(index));
        }
    }

    fn restored(&mut self, index: u32) {
        let node = &mut self.nodes[index as usize];
        node.restoring -= 1;
        node.idle += 1;
        self.start_jobs(index);
    }

    fn done(&mut self, index: u32) {
        self.nodes[index as usize].running -= 1;
        self.completed += 1;
        self.last_done = self.now;
        let jobs = self.workload.jobs;
        if self.first_decile.is_none() && self.completed >= jobs.div_ceil(10) {
            self.first_decile = Some(self.now);
        }
        if self.ninth_decile.is_none() && self.completed >= (jobs * 9).div_ceil(10) {
            self.ninth_decile = Some(self.now);
        }
        if self.spec.isolation == NodeIsolation::Process {
            self.start_jobs(index);
        }
        self.lease(index);
    }

    fn outcome(self, nodes: u32, sim_wall_s: f64) -> Outcome {
        // Restores refilling the pools after the last job do not count.
        let makespan_us = self.last_done.max(1);
        let makespan_s = makespan_us as f64 / 1e6;
        let jobs = self.completed;
        let overall = jobs as f64 / makespan_s * 3600.0;
        let steady = match (self.first_decile, self.ninth_decile) {
            (Some(a), Some(b)) if b > a => {
                let between = (jobs * 9).div_ceil(10) - jobs.div_ceil(10);
                between as f64 / ((b - a) as f64 / 1e6) * 3600.0
            }
            _ => overall,
        };
        let slots = f64::from(nodes) * f64::from(self.capacity) * makespan_us as f64;
        let restore_slots =
            f64::from(nodes) * f64::from(self.spec.max_in_flight) * makespan_us as f64;
        Outcome {
            nodes,
            jobs,
            makespan_s,
            jobs_per_hour: steady,
            overall_jobs_per_hour: overall,
            queue_ms: Percentiles::of(&self.queue_us, 1_000),
            start_us: Percentiles::of(&self.start_us, 1),
            node_utilisation: (self.busy_us as f64 / slots).min(1.0),
            restore_utilisation: if self.spec.isolation == NodeIsolation::Sandbox {
                (self.restores as f64 * self.restore_us as f64 / restore_slots).min(1.0)
            } else {
                0.0
            },
            restores: self.restores,
            events: self.events,
            sim_wall_s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn the_radix_heap_pops_in_order_like_a_sorted_list() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
        let mut heap = RadixHeap::new();
        let mut reference: Vec<u128> = Vec::new();
        let mut now = 0u128;
        let mut popped = Vec::new();
        let mut expected = Vec::new();
        for _ in 0..20_000 {
            // Pushes at or after the last pop, some at the same key, some far ahead.
            for _ in 0..rng.random_range(0..3) {
                let ahead = match rng.random_range(0..4) {
                    0 => 0,
                    1 => rng.random_range(0..16),
                    _ => rng.random_range(0..1u128 << 70),
                };
                heap.push(now + ahead);
                reference.push(now + ahead);
            }
            if let Some(key) = heap.pop() {
                reference.sort_unstable_by(|a, b| b.cmp(a));
                expected.push(reference.pop().unwrap());
                popped.push(key);
                now = key;
            }
        }
        while let Some(key) = heap.pop() {
            popped.push(key);
        }
        reference.sort_unstable_by(|a, b| b.cmp(a));
        while let Some(key) = reference.pop() {
            expected.push(key);
        }
        assert_eq!(popped, expected);
    }

    #[test]
    fn events_pack_and_unpack() {
        for event in [
            Event::Arrival,
            Event::Leased(7),
            Event::Restored(u32::MAX),
            Event::Done(0),
        ] {
            assert_eq!(Event::unpack(key(42, event) as u64), event);
            assert_eq!((key(42, event) >> 64) as u64, 42);
        }
    }
}
