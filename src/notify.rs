//! Notifications after a run: the log, webhooks (an HTTP POST of the report) and SNS topics (a
//! subject, the run summary, and `status` / `pipeline` / `run_id` message attributes), each with
//! retries. A notification that cannot be delivered is logged; it never undoes data.

use std::time::Duration;

use crate::config::NotifyConfig;
use crate::error::{Error, Result};
use crate::report::{FileStatus, RunReport, RunStatus};
use crate::secrets::redact;

/// Where a notification goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The log (tracing).
    Log,
    /// An HTTP POST of the report as JSON.
    Webhook(String),
    /// A message to an SNS topic (its ARN).
    Sns(String),
}

impl Target {
    /// Parses `log`, `webhook:<url>` or `sns:<topic arn>`.
    pub fn parse(s: &str) -> Option<Target> {
        if s == "log" {
            Some(Target::Log)
        } else if let Some(arn) = s.strip_prefix("sns:") {
            Some(Target::Sns(arn.to_string()))
        } else {
            s.strip_prefix("webhook:")
                .map(|u| Target::Webhook(u.to_string()))
        }
    }
}

/// Sends the report to the targets for its status; returns the delivery errors.
pub async fn notify(config: &NotifyConfig, pipeline: &str, report: &RunReport) -> Vec<Error> {
    // A failed `warn` check goes to the failure targets too, though its batch was published.
    let warned = report.checks.iter().any(|c| !c.passed);
    let union: Vec<String>;
    let targets = match report.status {
        RunStatus::Failed => &config.on_failure,
        RunStatus::Succeeded if warned => {
            union = config
                .on_success
                .iter()
                .chain(
                    config
                        .on_failure
                        .iter()
                        .filter(|t| !config.on_success.contains(*t)),
                )
                .cloned()
                .collect();
            &union
        }
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
                // The body as the lake's copy of the report: secret values masked.
                let sent = match crate::redact::to_json(report) {
                    Ok(body) => post(&url, body, config).await,
                    Err(e) => Err(Error::Notify {
                        target: format!("webhook {}", endpoint(&url)),
                        message: e.to_string(),
                    }),
                };
                if let Err(e) = sent {
                    tracing::warn!(target = %redact(&url), error = %e, "notification not delivered");
                    errors.push(e);
                }
            }
            Target::Sns(arn) => {
                let attributes = [
                    ("status", report.status.name().to_string()),
                    ("pipeline", pipeline.to_string()),
                    ("run_id", report.run_id.clone()),
                ];
                let text = redact(&report.summary());
                let sent =
                    publish(&arn, &subject(pipeline, report), &text, &attributes, config).await;
                if let Err(e) = sent {
                    tracing::warn!(target = %redact(&arn), error = %e, "notification not delivered");
                    errors.push(e);
                }
            }
        }
    }
    errors
}

/// The subject line of a run's message (SNS allows 100 characters), masked.
pub fn subject(pipeline: &str, report: &RunReport) -> String {
    let mut s: String = redact(&format!("sluice {pipeline}: run {}", report.status.label()))
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .collect();
    s.truncate(100);
    s
}

/// A notification that is not a run's report (a source late or recovered).
#[derive(Debug, Clone)]
pub struct Message {
    /// The subject line (SNS), masked and at most 100 characters.
    pub subject: String,
    /// The text (SNS, log).
    pub text: String,
    /// The body of a webhook's POST.
    pub body: serde_json::Value,
    /// SNS message attributes.
    pub attributes: Vec<(&'static str, String)>,
}

/// Sends a message to targets; returns the delivery errors.
pub async fn send(targets: &[String], config: &NotifyConfig, message: &Message) -> Vec<Error> {
    let mut errors = Vec::new();
    for t in targets.iter().filter_map(|t| Target::parse(t)) {
        let sent = match t {
            Target::Log => {
                tracing::warn!(subject = %redact(&message.subject), "{}", redact(&message.text));
                Ok(())
            }
            Target::Webhook(url) => match crate::redact::to_json(&message.body) {
                Ok(body) => post(&url, body, config).await,
                Err(e) => Err(Error::Notify {
                    target: format!("webhook {}", endpoint(&url)),
                    message: e.to_string(),
                }),
            },
            Target::Sns(arn) => {
                let mut subject: String = redact(&message.subject)
                    .chars()
                    .filter(|c| c.is_ascii_graphic() || *c == ' ')
                    .collect();
                subject.truncate(100);
                publish(
                    &arn,
                    &subject,
                    &redact(&message.text),
                    &message.attributes,
                    config,
                )
                .await
            }
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, "notification not delivered");
            errors.push(e);
        }
    }
    errors
}

async fn publish(
    arn: &str,
    subject: &str,
    text: &str,
    attributes: &[(&str, String)],
    config: &NotifyConfig,
) -> Result<()> {
    use aws_sdk_sns::types::MessageAttributeValue;
    let fail = |message: String| Error::Notify {
        target: redact(arn),
        message,
    };
    let attr = |v: &str| {
        MessageAttributeValue::builder()
            .data_type("String")
            .string_value(v)
            .build()
            .map_err(|e| fail(e.to_string()))
    };
    let client = aws_sdk_sns::Client::new(crate::aws::config().await);
    let mut last = String::new();
    for attempt in 0..=config.retries {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 * 2u64.pow(attempt.min(6)))).await;
        }
        let mut request = client
            .publish()
            .topic_arn(arn)
            .subject(subject)
            .message(text);
        for (name, value) in attributes {
            request = request.message_attributes(*name, attr(value)?);
        }
        let sent = request.send();
        match tokio::time::timeout(Duration::from_secs(config.timeout_secs), sent).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => last = crate::aws::describe(&e),
            Err(_) => last = format!("no answer in {}s", config.timeout_secs),
        }
    }
    Err(fail(format!(
        "{last} (after {} attempts)",
        config.retries + 1
    )))
}

/// `host:port` of a URL, for messages (no path, query or credentials).
fn endpoint(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|u| Some(format!("{}:{}", u.host_str()?, u.port_or_known_default()?)))
        .unwrap_or_else(|| "(an invalid URL)".to_string())
}

async fn post(url: &str, body: String, config: &NotifyConfig) -> Result<()> {
    let fail = |message: String| Error::Notify {
        target: format!("webhook {}", endpoint(url)),
        message: redact(&message),
    };
    // The whole request within `timeout_secs`, its connection within `[timeouts] connect`.
    let timeout = Duration::from_secs(config.timeout_secs);
    let connect = crate::timeout::get().connect.min(timeout);
    let client = reqwest::Client::builder()
        .connect_timeout(connect)
        .timeout(timeout)
        .build()
        .map_err(|e| fail(e.to_string()))?;
    let mut last = String::new();
    for attempt in 0..=config.retries {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 * 2u64.pow(attempt.min(6)))).await;
        }
        let request = client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.clone());
        match request.send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => last = format!("HTTP {}", r.status()),
            Err(e) if e.is_timeout() && e.is_connect() => {
                last = format!(
                    "connecting timed out after {}",
                    crate::config::format_duration(connect)
                )
            }
            Err(e) if e.is_timeout() => {
                last = format!(
                    "no answer within {}",
                    crate::config::format_duration(timeout)
                )
            }
            Err(e) => last = crate::error::chain(&e.without_url()),
        }
    }
    Err(fail(format!(
        "{last} (after {} attempt{})",
        config.retries + 1,
        if config.retries == 0 { "" } else { "s" }
    )))
}
