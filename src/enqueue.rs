//! `sluice enqueue`: every pending raw file of the lake (or of one source) put on an SQS queue as
//! an S3 `ObjectCreated` event, one message a file, ten to a `SendMessageBatch`, so that a
//! backlog (a backfill of months) spreads over as many `sluice watch --queue` workers as are
//! started. Pending means what `sluice status` shows: of a source's format, not committed.
//! Workers take each file once whatever the queue delivers: a message repeated, or a file a
//! `run` took meanwhile, is a no-op through the ledger.

use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use serde_json::json;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::lake::Lake;

/// What was put on the queue.
#[derive(Debug, Default, serde::Serialize)]
pub struct Enqueued {
    /// Raw keys, per source.
    pub files: std::collections::BTreeMap<String, Vec<String>>,
    /// Messages sent.
    pub messages: usize,
}

/// The S3 event naming one object (`key` in the lake) as S3 would send it.
pub fn event_for(lake: &Lake, key: &str, size: u64) -> serde_json::Value {
    // A folder lake's keys are its own; any bucket name is taken as the folder.
    let (bucket, object) = match lake.bucket() {
        Some(bucket) => {
            let url = lake.object_url(key);
            let prefix = format!("s3://{bucket}/");
            (
                bucket.to_string(),
                url.strip_prefix(&prefix).unwrap_or(key).to_string(),
            )
        }
        None => ("lake".to_string(), key.to_string()),
    };
    let encoded: String = object
        .split('/')
        .map(|seg| url::form_urlencoded::byte_serialize(seg.as_bytes()).collect::<String>())
        .collect::<Vec<_>>()
        .join("/");
    json!({"Records": [{
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": bucket}, "object": {"key": encoded, "size": size}},
    }]})
}

/// Puts the pending files of `source` (every source if `None`) on `queue`.
pub async fn enqueue(
    config: &Config,
    lake: &Lake,
    queue: &str,
    source: Option<&str>,
) -> Result<Enqueued> {
    if let Some(s) = source
        && !config.sources.iter().any(|c| c.name == s)
    {
        return Err(Error::config(&config.path, format!("no source named {s}")));
    }
    let ledger = crate::ledger::Ledger::load(lake).await?;
    let mut out = Enqueued::default();
    let mut bodies = Vec::new();
    for (name, files) in crate::inspect::pending(config, lake, &ledger).await? {
        if source.is_some_and(|s| s != name) || files.is_empty() {
            continue;
        }
        for m in &files {
            bodies.push(event_for(lake, m.location.as_ref(), m.size).to_string());
        }
        out.files
            .insert(name, files.iter().map(|m| m.location.to_string()).collect());
    }
    let sqs = aws_sdk_sqs::Client::new(crate::aws::config().await);
    let fail = |message: String| Error::State {
        path: format!("queue {queue}"),
        message,
    };
    for chunk in bodies.chunks(10) {
        let entries = chunk
            .iter()
            .enumerate()
            .map(|(i, body)| {
                SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(body)
                    .build()
                    .map_err(|e| fail(e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let sent = sqs
            .send_message_batch()
            .queue_url(queue)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| fail(format!("cannot send: {}", crate::aws::describe(&e))))?;
        if let Some(f) = sent.failed().first() {
            return Err(fail(format!(
                "{} of {} messages refused ({}: {}); {} sent before",
                sent.failed().len(),
                chunk.len(),
                f.code(),
                f.message().unwrap_or_default(),
                out.messages
            )));
        }
        out.messages += sent.successful().len();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn events_name_the_object_as_s3_would_and_parse_back_to_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(
            dir.path().to_str().unwrap(),
            &crate::config::TimeoutsConfig::default().get(),
        )
        .await
        .unwrap();
        let key = "raw/app_logs/2024 03/a+b.jsonl";
        let e = event_for(&lake, key, 7);
        let named = crate::events::parse(&e.to_string()).unwrap();
        assert_eq!(
            crate::trigger::keys_in_lake(&lake, &named)
                .into_iter()
                .collect::<Vec<_>>(),
            vec![key]
        );
        assert_eq!(e["Records"][0]["s3"]["object"]["size"], 7);
    }
}
