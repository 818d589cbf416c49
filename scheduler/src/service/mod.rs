//! `shardbox scheduler`: the scheduler as an HTTP service with a durable store.
//!
//! - [`config`]: the `[scheduler]` settings file.
//! - [`store`]: the redb database, written by one thread with group commits.
//! - [`queue`]: per-template queues of line runs, in shards, with priorities and fair share.
//! - [`core`]: batches, uploads, workers, leases, results, expiry and recovery.
//! - [`http`]: the routes of `scheduler/openapi.yaml`, bearer tokens, streamed bodies.

pub mod config;
pub mod core;
pub mod http;
pub mod queue;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;

pub use self::config::ServiceConfig;
pub use self::core::Scheduler;
use self::store::StoreError;

/// Why the service could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The store could not be opened or recovered.
    #[error("cannot open the scheduler's store")]
    Store(#[from] StoreError),
    /// The listening address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The server failed.
    #[error("the HTTP server failed")]
    Serve(#[source] std::io::Error),
}

/// A running service.
pub struct Service {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// The scheduler behind it.
    pub scheduler: Arc<Scheduler>,
    server: tokio::task::JoinHandle<Result<(), std::io::Error>>,
    expiry: tokio::task::JoinHandle<()>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Service {
    /// Opens the store, recovers its state, binds `config.listen` and starts serving.
    ///
    /// # Errors
    /// [`ServeError`] if the store or the address cannot be opened.
    pub async fn start(
        config: ServiceConfig,
        metrics: Option<PrometheusHandle>,
    ) -> Result<Service, ServeError> {
        let addr = config.listen;
        let scheduler = Scheduler::open(config).await?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ServeError::Bind { addr, source })?;
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let router = http::Api::new(Arc::clone(&scheduler), metrics).router();
        let server = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
        });
        let expiry = tokio::spawn(expire_loop(Arc::clone(&scheduler)));
        tracing::info!(%addr, "scheduler listening");
        Ok(Service {
            addr,
            scheduler,
            server,
            expiry,
            stop,
        })
    }

    /// Stops accepting requests, lets open ones finish, and returns.
    ///
    /// # Errors
    /// [`ServeError::Serve`] if the server failed.
    pub async fn stop(self) -> Result<(), ServeError> {
        self.stop.send_replace(true);
        self.expiry.abort();
        let _ = self.expiry.await;
        match self.server.await {
            Ok(outcome) => outcome.map_err(ServeError::Serve),
            Err(err) => Err(ServeError::Serve(std::io::Error::other(err))),
        }
    }

    /// Waits until the server ends by itself (it does not unless it fails).
    ///
    /// # Errors
    /// [`ServeError::Serve`] if the server failed.
    pub async fn wait(&mut self) -> Result<(), ServeError> {
        match (&mut self.server).await {
            Ok(outcome) => outcome.map_err(ServeError::Serve),
            Err(err) => Err(ServeError::Serve(std::io::Error::other(err))),
        }
    }
}

/// Drops silent workers four times per lease period.
async fn expire_loop(scheduler: Arc<Scheduler>) {
    let period = Duration::from_millis((scheduler.config().lease_ms / 4).max(25));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(err) = scheduler.expire().await {
            tracing::error!(error = %err, "the store failed while taking back leases; exiting");
            std::process::exit(crate::exit::RUNTIME.into());
        }
    }
}
