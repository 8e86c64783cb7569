//! The AWS Lambda custom runtime (cargo feature `lambda`): the binary, started by Lambda (it
//! sets `AWS_LAMBDA_RUNTIME_API`), handles each invocation's S3, SQS, SNS or EventBridge event
//! like `sluice handle-event`. The config is `SLUICE_CONFIG` (default `sluice.toml` beside the
//! function's code). A failed run is returned as an error, so Lambda retries it or returns the
//! SQS messages to their queue; the ledger makes a retry of committed files a no-op.

use std::path::PathBuf;
use std::time::Duration;

use lambda_runtime::{LambdaEvent, service_fn};
use serde_json::Value;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::lake::Lake;
use crate::report::RunStatus;
use crate::trigger;

/// Whether this process was started by Lambda.
pub fn in_lambda() -> bool {
    std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some()
}

fn config_path() -> PathBuf {
    match std::env::var_os("SLUICE_CONFIG") {
        Some(p) => PathBuf::from(p),
        None => std::env::var_os("LAMBDA_TASK_ROOT")
            .map(PathBuf::from)
            .unwrap_or_default()
            .join("sluice.toml"),
    }
}

async fn handle(event: LambdaEvent<Value>) -> Result<Value> {
    let path = config_path();
    let mut config = Config::load(&path)?;
    bound_by_deadline(&mut config, event.context.deadline);
    crate::timeout::set(config.timeouts.get());
    config.resolve_secrets().await?;
    let lake = Lake::open(&config.lake_root(), &config.timeouts.get())
        .await?
        .with_max_concurrent_requests(config.lake.max_concurrent_requests);
    match trigger::handle_event(&config, lake, &event.payload.to_string(), false).await? {
        None => Ok(serde_json::json!({ "status": "nothing_to_do" })),
        Some(report) if report.status == RunStatus::Failed => Err(Error::State {
            path: format!("run {}", report.run_id),
            message: format!("the run failed: {}", report.errors.join("; ")),
        }),
        Some(report) => serde_json::to_value(&report).map_err(|e| Error::State {
            path: "report".into(),
            message: e.to_string(),
        }),
    }
}

/// The invocation's deadline (ms since the epoch) bounds `max_runtime`: the run stops at a safe
/// point a margin (a tenth of the time left, at most a minute) before Lambda would kill it, so
/// its report is saved and its claims let go. A smaller configured `max_runtime` stands.
fn bound_by_deadline(config: &mut Config, deadline_ms: u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let left = Duration::from_millis(deadline_ms).saturating_sub(now);
    let limit = left.saturating_sub((left / 10).min(Duration::from_secs(60)));
    let secs = limit.as_secs().max(1);
    if config
        .engine
        .max_runtime()
        .is_none_or(|m| m > Duration::from_secs(secs))
    {
        tracing::info!(
            seconds = secs,
            "the invocation's deadline bounds max_runtime"
        );
        config.engine.max_runtime = Some(format!("{secs}s"));
    }
}

/// Serves invocations until Lambda stops the process.
pub async fn serve() -> Result<()> {
    // The answer and the error go to Lambda's API, and on to logs: masked like every output.
    let handler = |event| async move {
        handle(event)
            .await
            .map(|answer| {
                serde_json::from_str(&crate::redact::mask(&answer.to_string())).unwrap_or_else(
                    |_| serde_json::json!({ "error": "the answer could not be masked" }),
                )
            })
            .map_err(|e| {
                lambda_runtime::Error::from(crate::redact::mask(&e.to_string()).into_owned())
            })
    };
    lambda_runtime::run(service_fn(handler))
        .await
        .map_err(|e| Error::State {
            path: "lambda runtime".into(),
            message: e.to_string(),
        })
}
