//! What starts a run: the CLI (`run`), an S3 event (`handle-event`, the Lambda handler), an SQS
//! queue of S3 events (`watch --queue`) or a timer over the raw prefixes (`watch`).

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aws_sdk_sqs::Client as Sqs;
use tracing::Instrument;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::events::{self, Named};
use crate::lake::Lake;
use crate::notify;
use crate::pipeline::Runner;
use crate::progress::Progress;
use crate::report::{self, FileStatus, RunReport, RunStatus};

/// Runs the pipeline once (over `only`, when given) and sends the notifications.
pub async fn run(
    config: &Config,
    lake: Lake,
    only: Option<BTreeSet<String>>,
    human: bool,
) -> Result<RunReport> {
    let run_id = report::new_run_id();
    let span = tracing::info_span!("run", run_id = %run_id);
    run_as(config, lake, only, human, &run_id)
        .instrument(span)
        .await
}

async fn run_as(
    config: &Config,
    lake: Lake,
    only: Option<BTreeSet<String>>,
    human: bool,
    run_id: &str,
) -> Result<RunReport> {
    let mut runner = Runner::new(config, lake.clone(), run_id)
        .with_progress(Progress::new(human && std::io::stderr().is_terminal()));
    if let Some(keys) = only {
        runner = runner.only(keys);
    }
    let mut report = runner.run().await?;
    // Freshness and gaps (late sources notified once, missing partitions) go into the report.
    let evaluated = crate::freshness::configured(config);
    if evaluated {
        match crate::freshness::evaluate(config, &lake, &report.run_id).await {
            Ok((freshness, problems)) => {
                report.warnings.extend(problems);
                report.freshness = Some(freshness);
            }
            Err(e) => report
                .warnings
                .push(format!("freshness not evaluated: {e}")),
        }
    }
    // Every sink masks secret values (crate::redact): the saved report, the notifications,
    // the output.
    let undelivered = notify::notify(&config.notify, &config.pipeline_name(), &report).await;
    if !undelivered.is_empty() || evaluated {
        report
            .errors
            .extend(undelivered.iter().map(ToString::to_string));
        lake.put_report(&report::run_key(&report.run_id), &report)
            .await?;
    }
    if report::metrics_enabled() {
        for record in report::metric_records(&report, config) {
            crate::redact::eprint(&format!("{record}\n"));
        }
    }
    Ok(report)
}

/// The lake keys of the named objects: those in the lake's bucket, under its prefix.
pub fn keys_in_lake(lake: &Lake, named: &[Named]) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for n in named {
        match lake.key_of(&n.bucket, &n.key) {
            Some(k) => {
                keys.insert(k);
            }
            None => {
                tracing::info!(bucket = %n.bucket, key = %n.key, "object is outside the lake; ignored")
            }
        }
    }
    keys
}

/// Processes the objects an event names (`None` when it names none of the lake's), or every
/// pending file for a schedule's payload (any JSON that is not an S3 event).
pub async fn handle_event(
    config: &Config,
    lake: Lake,
    event: &str,
    human: bool,
) -> Result<Option<RunReport>> {
    let named = match events::trigger(event)? {
        events::Trigger::Everything => {
            tracing::info!("not an S3 event: a run over everything pending");
            return run(config, lake, None, human).await.map(Some);
        }
        events::Trigger::Objects(named) => named,
    };
    let keys = keys_in_lake(&lake, &named);
    if keys.is_empty() {
        return Ok(None);
    }
    run(config, lake, Some(keys), human).await.map(Some)
}

/// Set by SIGTERM or Ctrl-C: finish the current run, then stop.
fn stop_flag() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("stopping after the current run");
        flag.store(true, Ordering::SeqCst);
    });
    stop
}

/// Waits `d`, or less if asked to stop.
async fn pause(d: Duration, stop: &AtomicBool) {
    let step = Duration::from_millis(100);
    let mut waited = Duration::ZERO;
    while waited < d && !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(step).await;
        waited += step;
    }
}

/// Runs over everything pending at the ticks of `schedule` until stopped: once at start if a
/// tick passed since the lake's last run began (the process was down), then at each tick after
/// now (a run longer than the interval skips the ticks it covered, never runs them in a burst).
pub async fn watch_schedule(
    config: &Config,
    lake: Lake,
    schedule: &crate::schedule::Schedule,
) -> Result<()> {
    let stop = stop_flag();
    let once = |lake: Lake| async move {
        match run(config, lake, None, false).await {
            Ok(r) if r.status == RunStatus::NothingToDo => {}
            Ok(r) => crate::redact::eprint(&r.summary()),
            Err(e) => tracing::error!(error = %e, "run failed"),
        }
    };
    let last = last_run_start(&lake).await;
    if schedule.missed(last, chrono::Utc::now()) {
        tracing::info!(last_run = ?last, "a scheduled run is due (none since the last tick): running now");
        once(lake.clone()).await;
    }
    while !stop.load(Ordering::SeqCst) {
        let Some(wait) = schedule.wait(chrono::Utc::now()) else {
            tracing::info!("the schedule has no more ticks; stopping");
            break;
        };
        tracing::debug!(seconds = wait.as_secs_f64(), "waiting for the next tick");
        let until = tokio::time::Instant::now() + wait;
        while !stop.load(Ordering::SeqCst) && tokio::time::Instant::now() < until {
            let left = until - tokio::time::Instant::now();
            tokio::time::sleep(left.min(Duration::from_millis(100))).await;
        }
        if stop.load(Ordering::SeqCst) {
            break;
        }
        once(lake.clone()).await;
    }
    Ok(())
}

/// When the lake's newest run started (its report's `started_at`), if any run is on record.
async fn last_run_start(lake: &Lake) -> Option<chrono::DateTime<chrono::Utc>> {
    let prefix = format!("{}/runs", crate::lake::STATE);
    let newest = lake
        .list(&prefix)
        .await
        .ok()?
        .into_iter()
        .map(|m| m.location.to_string())
        .filter(|k| k.ends_with(".json"))
        .max()?;
    let report: RunReport = lake.get_json(&newest).await.ok()??;
    Some(report.started_at)
}

/// Runs over the raw prefixes every `interval` until stopped.
pub async fn watch_prefixes(config: &Config, lake: Lake, interval: Duration) -> Result<()> {
    let stop = stop_flag();
    while !stop.load(Ordering::SeqCst) {
        match run(config, lake.clone(), None, false).await {
            Ok(r) if r.status == RunStatus::NothingToDo => {}
            Ok(r) => crate::redact::eprint(&r.summary()),
            Err(e) => tracing::error!(error = %e, "run failed"),
        }
        pause(interval, &stop).await;
    }
    Ok(())
}

fn sqs_error(message: String) -> Error {
    Error::Aws {
        service: "sqs".into(),
        message,
    }
}

/// Long-polls an SQS queue of S3 events until stopped. A message is deleted only once every
/// object it names is committed (or gone: processed before); while its objects are processed
/// its visibility is extended, so no other worker takes it.
pub async fn watch_queue(
    config: &Config,
    lake: Lake,
    queue: &str,
    visibility: i32,
    wait: i32,
) -> Result<()> {
    let sqs = Sqs::new(crate::aws::config().await);
    // A long poll answers within `wait`: keep it inside the request timeout.
    let longest = (crate::timeout::get().request.as_secs() as i32 - 5).max(0);
    let wait = wait.clamp(0, 20).min(longest);
    let stop = stop_flag();
    let limit = config.engine.batch_files.unwrap_or(QUEUE_BATCH);
    while !stop.load(Ordering::SeqCst) {
        let first = receive(&sqs, queue, limit.min(10), wait, visibility);
        let mut messages = tokio::select! {
            r = first => r?,
            _ = async { while !stop.load(Ordering::SeqCst) { tokio::time::sleep(Duration::from_millis(100)).await } } => break,
        };
        // A backlog: more messages at once (without waiting), up to the batch's bound, so one
        // run (and its aggregates' refresh) takes many files.
        let mut last = messages.len();
        while last > 0 && messages.len() < limit {
            let more =
                receive(&sqs, queue, (limit - messages.len()).min(10), 0, visibility).await?;
            last = more.len();
            messages.extend(more);
        }
        if messages.is_empty() {
            crate::freshness::poll(config, &lake).await;
            continue;
        }
        // Each message's keys; a message that is not an event stays for the queue's redrive.
        let mut batch: Vec<(String, BTreeSet<String>)> = Vec::new();
        for m in &messages {
            let (Some(receipt), Some(body)) = (m.receipt_handle(), m.body()) else {
                continue;
            };
            match events::parse(body) {
                Ok(named) => batch.push((receipt.to_string(), keys_in_lake(&lake, &named))),
                Err(e) => {
                    tracing::error!(message = ?m.message_id(), error = %e, "not an S3 event; left on the queue")
                }
            }
        }
        let all: BTreeSet<String> = batch.iter().flat_map(|(_, k)| k.iter().cloned()).collect();
        let report = if all.is_empty() {
            None
        } else {
            let keeper = extend_visibility(&sqs, queue, &batch, visibility);
            let result = run(config, lake.clone(), Some(all), false).await;
            keeper.abort();
            match result {
                Ok(r) => {
                    crate::redact::eprint(&r.summary());
                    Some(r)
                }
                Err(e) => {
                    tracing::error!(error = %e, "run failed; its messages come back later");
                    continue;
                }
            }
        };
        let done: Vec<&str> = batch
            .iter()
            .filter(|(_, keys)| {
                keys.iter().all(|k| {
                    report.as_ref().is_none_or(|r| {
                        !r.files
                            .iter()
                            .any(|f| &f.key == k && f.status == FileStatus::Failed)
                    })
                })
            })
            .map(|(receipt, _)| receipt.as_str())
            .collect();
        delete(&sqs, queue, &done).await;
    }
    Ok(())
}

/// Messages a queue worker takes into one run at most when a backlog waits (and
/// `engine.batch_files` does not say): up to ten receives of ten.
const QUEUE_BATCH: usize = 100;

/// Up to `n` (at most 10) messages, waiting up to `wait` seconds for the first.
async fn receive(
    sqs: &Sqs,
    queue: &str,
    n: usize,
    wait: i32,
    visibility: i32,
) -> Result<Vec<aws_sdk_sqs::types::Message>> {
    let out = sqs
        .receive_message()
        .queue_url(queue)
        .max_number_of_messages(n.clamp(1, 10) as i32)
        .wait_time_seconds(wait)
        .visibility_timeout(visibility)
        .send()
        .await
        .map_err(|e| {
            sqs_error(format!(
                "cannot receive from {queue}: {}",
                crate::aws::describe(&e)
            ))
        })?;
    Ok(out.messages.unwrap_or_default())
}

/// Deletes handled messages, ten a request. One that cannot be deleted comes back later and
/// does nothing (its objects are committed).
async fn delete(sqs: &Sqs, queue: &str, receipts: &[&str]) {
    for chunk in receipts.chunks(10) {
        let entries: Vec<_> = chunk
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                aws_sdk_sqs::types::DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(*r)
                    .build()
                    .ok()
            })
            .collect();
        match sqs
            .delete_message_batch()
            .queue_url(queue)
            .set_entries(Some(entries))
            .send()
            .await
        {
            Ok(out) if out.failed().is_empty() => {}
            Ok(out) => tracing::warn!(
                failed = out.failed().len(),
                "cannot delete some handled messages; they come back and do nothing"
            ),
            Err(e) => tracing::warn!(
                error = %crate::aws::describe(&e),
                "cannot delete handled messages; they come back and do nothing"
            ),
        }
    }
}

/// Keeps a batch's messages invisible while its run lasts (every half visibility timeout).
fn extend_visibility(
    sqs: &Sqs,
    queue: &str,
    batch: &[(String, BTreeSet<String>)],
    visibility: i32,
) -> tokio::task::JoinHandle<()> {
    let (sqs, queue) = (sqs.clone(), queue.to_string());
    let receipts: Vec<String> = batch.iter().map(|(r, _)| r.clone()).collect();
    let every = Duration::from_secs((visibility.max(2) / 2) as u64);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            for chunk in receipts.chunks(10) {
                let entries: Vec<_> = chunk
                    .iter()
                    .enumerate()
                    .filter_map(|(i, r)| {
                        aws_sdk_sqs::types::ChangeMessageVisibilityBatchRequestEntry::builder()
                            .id(i.to_string())
                            .receipt_handle(r)
                            .visibility_timeout(visibility)
                            .build()
                            .ok()
                    })
                    .collect();
                if let Err(e) = sqs
                    .change_message_visibility_batch()
                    .queue_url(&queue)
                    .set_entries(Some(entries))
                    .send()
                    .await
                {
                    tracing::warn!(error = %crate::aws::describe(&e), "cannot extend the messages' visibility");
                }
            }
        }
    })
}
