//! What the scheduler needs from a worker, as a trait: [`shardbox_worker::Worker`] implements it
//! for real runs, and tests implement it with doubles that need no `runsc`.

use std::future::Future;
use std::time::Instant;

use shardbox_proto::{Job, JobResult};
use shardbox_worker::pool::PoolError;
use shardbox_worker::{PreparedJob, Slot, Worker};

/// The operations [`crate::run::run_batch`] calls on a worker.
pub trait Backend: Send + Sync + 'static {
    /// A sandbox taken from a pool, ready for one job.
    type Sandbox: Send + 'static;
    /// A job checked against its template.
    type Prepared: Send + Sync + 'static;

    /// The worker's name, reported in results.
    fn name(&self) -> &str;

    /// Every template this backend serves, each of which gets a queue and a dispatcher.
    fn templates(&self) -> Vec<String>;

    /// Checks `job` against its template.
    ///
    /// # Errors
    /// Why the job cannot run, in words meant for the user.
    fn prepare(&self, job: Job) -> Result<Self::Prepared, String>;

    /// The job inside a prepared job.
    fn job(prepared: &Self::Prepared) -> &Job;

    /// The template a prepared job runs on.
    fn template(prepared: &Self::Prepared) -> &str;

    /// Takes an idle sandbox of `template`, waiting for one if needed.
    fn acquire(
        &self,
        template: &str,
    ) -> impl Future<Output = Result<Self::Sandbox, PoolError>> + Send;

    /// Runs the job in the sandbox, which was taken at `taken`.
    fn run(
        &self,
        sandbox: Self::Sandbox,
        prepared: &Self::Prepared,
        taken: Instant,
    ) -> impl Future<Output = JobResult> + Send;

    /// Destroys a sandbox that was taken but will not be used.
    fn discard(&self, sandbox: Self::Sandbox) -> impl Future<Output = ()> + Send;
}

impl Backend for Worker {
    type Sandbox = Slot;
    type Prepared = PreparedJob;

    fn name(&self) -> &str {
        Worker::name(self)
    }

    fn templates(&self) -> Vec<String> {
        self.pools().keys().cloned().collect()
    }

    fn prepare(&self, job: Job) -> Result<PreparedJob, String> {
        Worker::prepare(self, job)
    }

    fn job(prepared: &PreparedJob) -> &Job {
        &prepared.job
    }

    fn template(prepared: &PreparedJob) -> &str {
        &prepared.template
    }

    fn acquire(&self, template: &str) -> impl Future<Output = Result<Slot, PoolError>> + Send {
        Worker::acquire(self, template)
    }

    fn run(
        &self,
        sandbox: Slot,
        prepared: &PreparedJob,
        taken: Instant,
    ) -> impl Future<Output = JobResult> + Send {
        Worker::run(self, sandbox, prepared, taken)
    }

    fn discard(&self, sandbox: Slot) -> impl Future<Output = ()> + Send {
        Worker::discard(self, sandbox)
    }
}
