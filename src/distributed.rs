//! The distributed engine (cargo feature `distributed`), on datafusion-distributed: this process
//! plans a query over the lake's tables as it always does, and the planner splits its stages
//! into tasks that run on `sluice worker` processes (Arrow Flight over gRPC), the head of the
//! plan and every write staying here. Workers are this same binary: they register sluice's
//! functions in every query's session and read the lake with the config's storage (an S3 lake's
//! bucket store, a folder every node sees), within the config's memory limit. Only Parquet scans
//! of the lake are split (by byte range, which Parquet readers cut at row groups); a plan over
//! this process's own streams (a commit's staged rows) runs here. The engine has no task
//! retries: a worker lost mid-query fails the query with an error naming the worker, nothing is
//! written, and the query can simply run again.

use std::net::SocketAddr;

use datafusion::error::DataFusionError;
use datafusion::execution::{SessionState, SessionStateBuilder};
use datafusion::prelude::SessionContext;
use datafusion_distributed::{
    DistributedExt, SessionStateBuilderExt, Worker, WorkerQueryContext, WorkerResolver,
    WorkerSessionBuilder,
};
use url::Url;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::lake::Lake;

/// The workers named in the config.
#[derive(Clone)]
struct Workers(Vec<Url>);

impl WorkerResolver for Workers {
    fn get_urls(&self) -> std::result::Result<Vec<Url>, DataFusionError> {
        Ok(self.0.clone())
    }
}

/// A coordinator's session: `threads` partitions here, `pool_bytes` for its own operators, tasks
/// of about `task_bytes` of Parquet each on `workers`.
pub fn session(
    workers: &[Url],
    threads: usize,
    pool_bytes: usize,
    task_bytes: usize,
) -> Result<SessionContext> {
    let state = SessionStateBuilder::new()
        .with_default_features()
        .with_config(crate::transform::session_config(threads))
        .with_runtime_env(crate::transform::runtime(pool_bytes))
        .with_distributed_worker_resolver(Workers(workers.to_vec()))
        .with_distributed_planner()
        .with_distributed_file_scan_config_bytes_per_partition(task_bytes)
        .map_err(|e| Error::State {
            path: "engine.task_size".into(),
            message: e.to_string(),
        })?
        .build();
    let ctx = SessionContext::new_with_state(state);
    crate::functions::register(&ctx);
    Ok(ctx)
}

/// Every query's session on a worker: sluice's functions on the session the coordinator asks for.
struct Sessions;

#[async_trait::async_trait]
impl WorkerSessionBuilder for Sessions {
    async fn build_session_state(
        &self,
        ctx: WorkerQueryContext,
    ) -> std::result::Result<SessionState, DataFusionError> {
        let mut state = ctx.builder.build();
        crate::functions::register_on(&mut state);
        tracing::info!(session = %state.session_id(), "worker: a query's tasks arrived");
        Ok(state)
    }
}

/// Serves as a worker on `listen` until interrupted (Ctrl-C or SIGTERM).
pub async fn serve(config: &Config, lake: &Lake, listen: SocketAddr) -> Result<()> {
    let runtime = crate::transform::runtime(config.engine.budget().pool_bytes);
    lake.attach_runtime(&runtime)?;
    let worker = Worker::from_session_builder(Sessions).with_runtime_env(runtime);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Error::io(format!("cannot listen on {listen}"), e))?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::io(format!("cannot listen on {listen}"), e))?;
    // One line on stdout once it listens (tests and scripts wait for it).
    println!("sluice worker listening on http://{local}");
    tracing::info!(%local, "worker listening");
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tonic::transport::Server::builder()
        .add_service(worker.into_worker_server())
        .serve_with_incoming_shutdown(incoming, shutdown())
        .await
        .map_err(|e| Error::State {
            path: format!("worker {local}"),
            message: crate::error::chain(&e),
        })
}

/// Ctrl-C or SIGTERM.
async fn shutdown() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resolver_hands_out_the_configured_workers() {
        let urls = vec![
            Url::parse("http://127.0.0.1:50051").unwrap(),
            Url::parse("http://127.0.0.1:50052").unwrap(),
        ];
        assert_eq!(Workers(urls.clone()).get_urls().unwrap(), urls);
    }
}
