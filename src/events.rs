//! S3 "object created" events as triggers: the objects an event names, whatever envelope it
//! came in (a plain S3 notification, the body of an SQS message, an SNS notification, a Lambda
//! SQS or SNS batch, or an EventBridge "Object Created" event); and, for an invocation, any other
//! JSON (an EventBridge Scheduler or scheduled-rule payload) as "everything pending".

use serde_json::Value;

use crate::error::{Error, Result};

/// An object an event names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Named {
    /// The bucket.
    pub bucket: String,
    /// The object key, decoded.
    pub key: String,
}

fn bad(message: impl Into<String>) -> Error {
    Error::Read {
        key: "event".into(),
        message: message.into(),
    }
}

/// What an invocation's payload asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// The objects an S3 event names (maybe none: a test event, a delete).
    Objects(Vec<Named>),
    /// A run over every pending file: a schedule's payload, or any JSON that is not an S3,
    /// SQS, SNS or EventBridge S3 event.
    Everything,
}

/// Whether a JSON value is shaped like one of the events [`parse`] reads.
fn is_event(v: &Value) -> bool {
    v.get("Records").is_some()
        || v.get("Type").and_then(Value::as_str) == Some("Notification")
        || v.get("source").and_then(Value::as_str) == Some("aws.s3")
        || v.get("Event").and_then(Value::as_str) == Some("s3:TestEvent")
}

/// What an invocation's payload asks for: the objects of an S3 event (malformed events are
/// errors, as in [`parse`]), or everything pending for any other JSON; text that is not JSON
/// is an error.
pub fn trigger(text: &str) -> Result<Trigger> {
    let value: Value =
        serde_json::from_str(text.trim()).map_err(|e| bad(format!("not a JSON event: {e}")))?;
    if !is_event(&value) {
        return Ok(Trigger::Everything);
    }
    parse(text).map(Trigger::Objects)
}

/// The objects named by an event's JSON text. A test event (`s3:TestEvent`) and events other
/// than object creation name nothing.
pub fn parse(text: &str) -> Result<Vec<Named>> {
    let value: Value =
        serde_json::from_str(text.trim()).map_err(|e| bad(format!("not a JSON event: {e}")))?;
    let mut out = Vec::new();
    collect(&value, &mut out, 0)?;
    out.sort();
    out.dedup();
    Ok(out)
}

fn collect(v: &Value, out: &mut Vec<Named>, depth: usize) -> Result<()> {
    if depth > 4 {
        return Err(bad("events nested more than 4 deep"));
    }
    // A JSON document inside a string (SQS bodies, SNS messages).
    let nested = |text: &Value, out: &mut Vec<Named>| -> Result<()> {
        let text = text
            .as_str()
            .ok_or_else(|| bad("a message body is not text"))?;
        let inner: Value = serde_json::from_str(text)
            .map_err(|e| bad(format!("a message body is not JSON: {e}")))?;
        collect(&inner, out, depth + 1)
    };
    if v.get("Event").and_then(Value::as_str) == Some("s3:TestEvent") {
        return Ok(());
    }
    if v.get("Type").and_then(Value::as_str) == Some("Notification")
        && let Some(m) = v.get("Message")
    {
        return nested(m, out);
    }
    if v.get("source").and_then(Value::as_str) == Some("aws.s3") {
        if v.get("detail-type").and_then(Value::as_str) != Some("Object Created") {
            return Ok(());
        }
        let d = &v["detail"];
        let (Some(bucket), Some(key)) = (d["bucket"]["name"].as_str(), d["object"]["key"].as_str())
        else {
            return Err(bad(
                "an EventBridge event without detail.bucket.name or detail.object.key",
            ));
        };
        // EventBridge gives keys as they are, not URL-encoded.
        out.push(Named {
            bucket: bucket.to_string(),
            key: key.to_string(),
        });
        return Ok(());
    }
    let Some(records) = v.get("Records").and_then(Value::as_array) else {
        return Err(bad(
            "not an S3, SQS, SNS or EventBridge event (no Records, Message or detail)",
        ));
    };
    for r in records {
        if let Some(body) = r.get("body") {
            nested(body, out)?;
        } else if let Some(m) = r.get("Sns").and_then(|s| s.get("Message")) {
            nested(m, out)?;
        } else if r.get("s3").is_some() {
            let name = r
                .get("eventName")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if !name.starts_with("ObjectCreated:") {
                continue;
            }
            let (Some(bucket), Some(key)) = (
                r["s3"]["bucket"]["name"].as_str(),
                r["s3"]["object"]["key"].as_str(),
            ) else {
                return Err(bad("an S3 record without s3.bucket.name or s3.object.key"));
            };
            out.push(Named {
                bucket: bucket.to_string(),
                key: decode_key(key),
            });
        }
    }
    Ok(())
}

/// An S3 notification's key, URL-decoded (`+` is a space).
pub fn decode_key(key: &str) -> String {
    let bytes = key.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3_event(key: &str) -> String {
        serde_json::json!({"Records": [{
            "eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
            "s3": {"bucket": {"name": "lake"}, "object": {"key": key, "size": 3}}
        }]})
        .to_string()
    }

    #[test]
    fn every_envelope_names_the_same_object() {
        let want = vec![Named {
            bucket: "lake".into(),
            key: "raw/t/a b+c.csv".into(),
        }];
        let plain = s3_event("raw/t/a+b%2Bc.csv");
        assert_eq!(parse(&plain).unwrap(), want);
        let sqs = serde_json::json!({"Records": [{"eventSource": "aws:sqs", "body": plain}]});
        assert_eq!(parse(&sqs.to_string()).unwrap(), want);
        let sns = serde_json::json!({"Type": "Notification", "Message": plain});
        assert_eq!(parse(&sns.to_string()).unwrap(), want);
        let sns_in_sqs = serde_json::json!({"Records": [{"body": sns.to_string()}]}).to_string();
        assert_eq!(parse(&sns_in_sqs).unwrap(), want);
        let lambda_sns =
            serde_json::json!({"Records": [{"EventSource": "aws:sns", "Sns": {"Message": plain}}]});
        assert_eq!(parse(&lambda_sns.to_string()).unwrap(), want);
        let bridge = serde_json::json!({"source": "aws.s3", "detail-type": "Object Created",
            "detail": {"bucket": {"name": "lake"}, "object": {"key": "raw/t/a b+c.csv"}}});
        assert_eq!(parse(&bridge.to_string()).unwrap(), want);
    }

    #[test]
    fn test_events_and_deletes_name_nothing_and_junk_is_an_error() {
        let test = r#"{"Service":"Amazon S3","Event":"s3:TestEvent","Bucket":"lake"}"#;
        assert!(parse(test).unwrap().is_empty());
        let removed = s3_event("k").replace("ObjectCreated:Put", "ObjectRemoved:Delete");
        assert!(parse(&removed).unwrap().is_empty());
        assert!(
            parse("{nope")
                .unwrap_err()
                .to_string()
                .contains("not a JSON event")
        );
        assert!(parse("{}").unwrap_err().to_string().contains("not an S3"));
        assert_eq!(decode_key("100%25+done%"), "100% done%");
    }

    #[test]
    fn schedule_payloads_ask_for_everything_and_events_for_their_objects() {
        let rule = r#"{"version":"0","id":"x","detail-type":"Scheduled Event","source":"aws.events",
            "time":"2026-12-02T06:00:00Z","resources":["arn:aws:events:eu-west-1:1:rule/r"],"detail":{}}"#;
        assert_eq!(trigger(rule).unwrap(), Trigger::Everything);
        for other in ["{}", "\"run\"", "[]", "{\"pipeline\": \"tickets\"}"] {
            assert_eq!(trigger(other).unwrap(), Trigger::Everything, "{other}");
        }
        let named = trigger(&s3_event("raw/t/a.csv")).unwrap();
        assert!(matches!(named, Trigger::Objects(v) if v.len() == 1));
        let test = r#"{"Service":"Amazon S3","Event":"s3:TestEvent","Bucket":"lake"}"#;
        assert_eq!(trigger(test).unwrap(), Trigger::Objects(Vec::new()));
        // A malformed event is still an error, and so is text that is not JSON.
        assert!(trigger(r#"{"Records": [{"eventName": "ObjectCreated:Put", "s3": {}}]}"#).is_err());
        assert!(trigger("run now").is_err());
    }
}
