//! Notifications after a run: the log, and webhooks (an HTTP POST of the report, with a timeout
//! and retries). A notification that cannot be delivered is logged; it never undoes data.

use std::time::Duration;

use crate::config::NotifyConfig;
use crate::error::{Error, Result};
use crate::report::{FileStatus, RunReport, RunStatus};

/// Where a notification goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The log (tracing).
    Log,
    /// An HTTP POST of the report as JSON.
    Webhook(String),
}

impl Target {
    /// Parses `log` or `webhook:<url>`.
    pub fn parse(s: &str) -> Option<Target> {
        if s == "log" {
            Some(Target::Log)
        } else {
            s.strip_prefix("webhook:")
                .map(|u| Target::Webhook(u.to_string()))
        }
    }
}

/// Sends the report to the targets for its status; returns the delivery errors.
pub async fn notify(config: &NotifyConfig, report: &RunReport) -> Vec<Error> {
    let targets = match report.status {
        RunStatus::Failed => &config.on_failure,
        RunStatus::Succeeded => &config.on_success,
        RunStatus::NothingToDo => return Vec::new(),
    };
    let mut errors = Vec::new();
    for t in targets.iter().filter_map(|t| Target::parse(t)) {
        match t {
            Target::Log => {
                let files = report.files.len();
                let failed = report.count(FileStatus::Failed);
                match report.status {
                    RunStatus::Failed => {
                        tracing::error!(run = %report.run_id, files, failed, errors = report.errors.len(), "run failed")
                    }
                    _ => tracing::info!(run = %report.run_id, files, "run succeeded"),
                }
            }
            Target::Webhook(url) => {
                if let Err(e) = post(&url, report, config).await {
                    tracing::warn!(target = %url, error = %e, "notification not delivered");
                    errors.push(e);
                }
            }
        }
    }
    errors
}

async fn post(url: &str, report: &RunReport, config: &NotifyConfig) -> Result<()> {
    let fail = |message: String| Error::Notify {
        target: url.to_string(),
        message,
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(config.timeout_secs))
        .build()
        .map_err(|e| fail(e.to_string()))?;
    let mut last = String::new();
    for attempt in 0..=config.retries {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 * 2u64.pow(attempt.min(6)))).await;
        }
        match client.post(url).json(report).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => last = format!("HTTP {}", r.status()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(fail(format!(
        "{last} (after {} attempts)",
        config.retries + 1
    )))
}
