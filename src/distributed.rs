//! The distributed engine (cargo feature `distributed`), on datafusion-distributed: this process
//! plans a query over the lake's tables as it always does, and the planner splits its stages
//! into tasks that run on `sluice worker` processes (Arrow Flight over gRPC), the head of the
//! plan and every write staying here. Workers are this same binary: they register sluice's
//! functions in every query's session and read the lake with the config's storage (an S3 lake's
//! bucket store, a folder every node sees), within the config's memory limit. Only Parquet scans
//! of the lake are split (by byte range, which Parquet readers cut at row groups); a plan over
//! this process's own streams (a commit's staged rows) runs here. The engine has no task
//! retries: a worker lost mid-query fails the query with an error naming the worker, nothing is
//! written, and the query can simply run again. Every worker logs each task it ran, its place in
//! its stage and the rows its scans read (`worker: task done`), so an operator (and the tests) can
//! see how the work was split.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::{
    SendableRecordBatchStream, SessionState, SessionStateBuilder, TaskContext,
};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::metrics::ExecutionPlanMetricsSet;
use datafusion::physical_plan::metrics::MetricsSet;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, PlanProperties,
};
use datafusion::prelude::SessionContext;
use datafusion_distributed::grpc::DefaultChannelResolver;
use datafusion_distributed::{
    ChannelResolver, CoordinatorToWorkerMsg, ExecuteTaskRequest, GetWorkerInfoRequest,
    GetWorkerInfoResponse, SetPlanRequest, WorkerChannel, WorkerToCoordinatorMsg,
};
use datafusion_distributed::{
    DistributedExt, DistributedTaskContext, ScaleUpLeafNodeEvent, ScaleUpLeafNodeEventResponse,
    SessionStateBuilderExt, Worker, WorkerPlanRewriteEvent, WorkerPlanRewriteEventResponse,
    WorkerQueryContext, WorkerResolver, WorkerSessionBuilder,
};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use tonic::codegen::http::HeaderMap;
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
        .with_distributed_channel_resolver(Named::default())
        .with_distributed_planner()
        .with_distributed_file_scan_config_bytes_per_partition(task_bytes)
        .map_err(|e| Error::State {
            path: "engine.task_size".into(),
            message: e.to_string(),
        })?
        .build();
    let state = if crate::fault::active(UNSPLIT_SCANS) {
        SessionStateBuilder::new_from_existing(state)
            .with_distributed_scale_up_leaf_node_handler(unsplit_scan)
            .build()
    } else {
        state
    };
    let ctx = SessionContext::new_with_state(state);
    crate::functions::register(&ctx);
    Ok(ctx)
}

/// The fault (`SLUICE_FAULT`) that gives every task of a scan the scan's whole input, as an
/// engine that cannot split a leaf would: the tests' negative control for duplicated rows.
const UNSPLIT_SCANS: &str = "unsplit-scans";

/// Under [`UNSPLIT_SCANS`]: the leaf as it is, for every task.
fn unsplit_scan(
    ev: ScaleUpLeafNodeEvent,
) -> Option<std::result::Result<ScaleUpLeafNodeEventResponse, DataFusionError>> {
    ev.plan.downcast_ref::<DataSourceExec>()?;
    Some(Ok(ScaleUpLeafNodeEventResponse::new(Arc::clone(ev.plan))))
}

/// Every task's session on a worker: sluice's functions on the session the coordinator asks for,
/// the task's report, and one set of clients to the other workers.
struct Sessions(Named);

#[async_trait::async_trait]
impl WorkerSessionBuilder for Sessions {
    async fn build_session_state(
        &self,
        ctx: WorkerQueryContext,
    ) -> std::result::Result<SessionState, DataFusionError> {
        let mut state = ctx
            .builder
            .with_distributed_worker_plan_rewrite_handler(task_arrived)
            .with_distributed_channel_resolver(self.0.clone())
            .build();
        crate::functions::register_on(&mut state);
        Ok(state)
    }
}

/// A task's plan, as it arrives on a worker: logged, and its scans counted for the task's report
/// (the plan's shape unchanged: the coordinator matches the task's metrics to it node by node).
fn task_arrived(
    ev: WorkerPlanRewriteEvent,
) -> std::result::Result<WorkerPlanRewriteEventResponse, DataFusionError> {
    let task = ev
        .session_config
        .get_extension::<DistributedTaskContext>()
        .map(|t| format!("{}/{}", t.task_index + 1, t.task_count))
        .unwrap_or_else(|| "1/1".into());
    tracing::info!(%task, "worker: task arrived");
    crate::fault::pause("worker-task");
    let report = Arc::new(TaskReport {
        task,
        partitions_left: AtomicUsize::new(0),
        rows: AtomicUsize::new(0),
    });
    let plan = ev
        .plan
        .transform_up(|node| {
            if node.downcast_ref::<DataSourceExec>().is_none() {
                return Ok(Transformed::no(node));
            }
            let partitions = node.output_partitioning().partition_count();
            report
                .partitions_left
                .fetch_add(partitions, Ordering::SeqCst);
            Ok(Transformed::yes(Arc::new(CountedScan {
                inner: node,
                report: Arc::clone(&report),
            }) as Arc<dyn ExecutionPlan>))
        })?
        .data;
    Ok(WorkerPlanRewriteEventResponse::new(plan))
}

/// What a worker says of one task once every partition of its scans ended: its place in its
/// stage and the rows those scans read from the lake.
#[derive(Debug)]
struct TaskReport {
    task: String,
    partitions_left: AtomicUsize,
    rows: AtomicUsize,
}

impl TaskReport {
    fn partition_done(&self, rows: usize) {
        let total = self.rows.fetch_add(rows, Ordering::SeqCst) + rows;
        if self.partitions_left.fetch_sub(1, Ordering::SeqCst) == 1 {
            tracing::info!(task = %self.task, rows = total, "worker: task done");
        }
    }
}

/// A scan of the lake in a worker's task: the scan itself (same output, same metrics), counting
/// the rows its partitions put out for the task's report.
#[derive(Debug)]
struct CountedScan {
    inner: Arc<dyn ExecutionPlan>,
    report: Arc<TaskReport>,
}

impl DisplayAs for CountedScan {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        self.inner.fmt_as(t, f)
    }
}

impl ExecutionPlan for CountedScan {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.inner.properties()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        Vec::new()
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        self.inner.apply_expressions(f)
    }

    fn with_new_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        let stream = self.inner.execute(partition, context)?;
        let schema = stream.schema();
        // Reports the partition when its stream is dropped: at its end, or when its reader stops.
        let mut done = PartitionDone {
            report: Arc::clone(&self.report),
            rows: 0,
        };
        let counted = stream.inspect(move |batch| {
            if let Ok(batch) = batch {
                done.add(batch.num_rows());
            }
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, counted)))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        self.inner.metrics()
    }
}

/// One scan partition's rows, reported when dropped.
struct PartitionDone {
    report: Arc<TaskReport>,
    rows: usize,
}

impl PartitionDone {
    fn add(&mut self, rows: usize) {
        self.rows += rows;
    }
}

impl Drop for PartitionDone {
    fn drop(&mut self) {
        self.report.partition_done(self.rows);
    }
}

/// The engine's own gRPC clients to the workers, with the worker named in every error that comes
/// back from one (the engine's transport errors name no one: "transport error, connection
/// reset").
#[derive(Clone, Default)]
struct Named(DefaultChannelResolver);

#[async_trait::async_trait]
impl ChannelResolver for Named {
    async fn get_worker_client_for_url(&self, url: &Url) -> DfResult<Box<dyn WorkerChannel>> {
        let inner = self
            .0
            .get_worker_client_for_url(url)
            .await
            .map_err(|e| on_worker(url, e))?;
        Ok(Box::new(NamedChannel {
            url: url.clone(),
            inner,
        }))
    }
}

/// A worker's client whose errors name the worker.
struct NamedChannel {
    url: Url,
    inner: Box<dyn WorkerChannel>,
}

#[async_trait::async_trait]
impl WorkerChannel for NamedChannel {
    async fn coordinator_channel(
        &mut self,
        headers: HeaderMap,
        set_plan_request: SetPlanRequest,
        c2w_stream: BoxStream<'static, CoordinatorToWorkerMsg>,
        metrics: ExecutionPlanMetricsSet,
        task_ctx: &Arc<TaskContext>,
    ) -> DfResult<BoxStream<'static, DfResult<WorkerToCoordinatorMsg>>> {
        let url = self.url.clone();
        let stream = self
            .inner
            .coordinator_channel(headers, set_plan_request, c2w_stream, metrics, task_ctx)
            .await
            .map_err(|e| on_worker(&url, e))?;
        Ok(stream.map_err(move |e| on_worker(&url, e)).boxed())
    }

    async fn execute_task(
        &mut self,
        headers: HeaderMap,
        request: ExecuteTaskRequest,
        metrics: ExecutionPlanMetricsSet,
        task_ctx: &Arc<TaskContext>,
    ) -> DfResult<Vec<BoxStream<'static, DfResult<RecordBatch>>>> {
        let streams = self
            .inner
            .execute_task(headers, request, metrics, task_ctx)
            .await
            .map_err(|e| on_worker(&self.url, e))?;
        Ok(streams
            .into_iter()
            .map(|s| {
                let url = self.url.clone();
                s.map_err(move |e| on_worker(&url, e)).boxed()
            })
            .collect())
    }

    async fn get_worker_info(
        &mut self,
        request: GetWorkerInfoRequest,
    ) -> DfResult<GetWorkerInfoResponse> {
        self.inner
            .get_worker_info(request)
            .await
            .map_err(|e| on_worker(&self.url, e))
    }
}

/// An error that came from (or on the way to) a worker, with its URL.
fn on_worker(url: &Url, e: DataFusionError) -> DataFusionError {
    DataFusionError::Context(format!("worker {url}"), Box::new(e))
}

/// Serves as a worker on `listen` until interrupted (Ctrl-C or SIGTERM).
pub async fn serve(config: &Config, lake: &Lake, listen: SocketAddr) -> Result<()> {
    let runtime = crate::transform::runtime(config.engine.budget().pool_bytes);
    lake.attach_runtime(&runtime)?;
    let worker = Worker::from_session_builder(Sessions(Named::default())).with_runtime_env(runtime);
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
