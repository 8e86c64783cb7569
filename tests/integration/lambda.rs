//! The Lambda custom runtime (feature `lambda`): the binary against a fake Lambda runtime API
//! on a loopback port, handed one S3 event, answers with the run report.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

use crate::support::Project;

/// Reads one HTTP/1.1 request: its request line and body.
fn read_request(reader: &mut BufReader<TcpStream>) -> Option<(String, Vec<u8>)> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut length = 0;
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        if h == "\r\n" || h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some((line.trim().to_string(), body))
}

/// Serves the runtime API: the first `next` gets `event`; what the function posts back is sent
/// on the channel as (path, body).
fn fake_runtime_api(event: Value, timeout: Duration) -> (String, mpsc::Receiver<(String, Value)>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut served = false;
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let mut writer = stream.try_clone().unwrap();
            let mut reader = BufReader::new(stream);
            let tx = tx.clone();
            while let Some((line, body)) = read_request(&mut reader) {
                if line.contains("/runtime/invocation/next") {
                    if served {
                        // No more invocations: hold the call, as Lambda does between events.
                        std::thread::sleep(Duration::from_secs(600));
                        return;
                    }
                    served = true;
                    let payload = event.to_string();
                    let deadline = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_millis()
                        + timeout.as_millis();
                    write!(
                        writer,
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                         Lambda-Runtime-Aws-Request-Id: req-1\r\n\
                         Lambda-Runtime-Deadline-Ms: {deadline}\r\n\
                         Lambda-Runtime-Invoked-Function-Arn: arn:aws:lambda:us-east-1:123456789012:function:sluice\r\n\
                         Content-Length: {}\r\n\r\n{payload}",
                        payload.len()
                    )
                    .unwrap();
                } else {
                    let path = line
                        .split_whitespace()
                        .nth(1)
                        .unwrap_or_default()
                        .to_string();
                    let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    write!(writer, "HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n").unwrap();
                    let _ = tx.send((path, value));
                }
            }
        }
    });
    (addr, rx)
}

/// Starts the function under a fake runtime API serving `event`; its answer (path, body) and
/// its log (stderr).
fn invoke(p: &Project, event: Value) -> (String, Value, String) {
    invoke_with(p, event, Duration::from_secs(120), &[])
}

/// [`invoke`] with the invocation's time (`timeout`) and more environment.
fn invoke_with(
    p: &Project,
    event: Value,
    timeout: Duration,
    env: &[(&str, &std::ffi::OsStr)],
) -> (String, Value, String) {
    let (addr, posted) = fake_runtime_api(event, timeout);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .envs(env.iter().copied())
        .env("AWS_LAMBDA_RUNTIME_API", &addr)
        .env("AWS_LAMBDA_FUNCTION_NAME", "sluice")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "1")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1024")
        .env("AWS_LAMBDA_LOG_STREAM_NAME", "test")
        .env("AWS_LAMBDA_LOG_GROUP_NAME", "test")
        .env("SLUICE_CONFIG", p.config())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let got = posted.recv_timeout(Duration::from_secs(120));
    let _ = child.kill();
    let output = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    let (path, body) = got.unwrap_or_else(|e| panic!("no answer from the function ({e}): {log}"));
    (path, body, log)
}

#[test]
fn lambda_runtime_runs_everything_pending_on_a_schedule_payload() {
    let p = Project::empty();
    p.add_fixture("support_tickets", "2024-03-01.csv");
    p.add_fixture("app_logs", "2024-03-01.jsonl");
    // EventBridge Scheduler passes its target's input as it is; a scheduled rule sends this.
    let event = serde_json::json!({"version": "0", "id": "53dc4d37", "detail-type": "Scheduled Event",
        "source": "aws.events", "account": "123456789012", "time": "2026-12-02T06:00:00Z",
        "region": "eu-west-1", "resources": ["arn:aws:events:eu-west-1:123456789012:rule/sluice"],
        "detail": {}});
    let (path, report, _) = invoke(&p, event);
    assert_eq!(
        path, "/2018-06-01/runtime/invocation/req-1/response",
        "{report}"
    );
    assert_eq!(report["status"], "succeeded", "{report:#}");
    assert_eq!(report["files"].as_array().unwrap().len(), 2, "{report:#}");
    assert!(p.files("raw").is_empty());
}

#[test]
fn lambda_runtime_handles_an_s3_event() {
    let p = Project::empty();
    p.add_fixture("support_tickets", "2024-03-01.csv");
    p.add_fixture("support_tickets", "2024-03-02.csv");
    let event = serde_json::json!({"Records": [{
        "eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": "any"}, "object": {"key": "raw/support_tickets/2024-03-01.csv"}}
    }]});
    let (path, report, logs) = invoke(&p, event);
    assert_eq!(
        path, "/2018-06-01/runtime/invocation/req-1/response",
        "{report}"
    );
    assert_eq!(report["status"], "succeeded", "{report:#}");
    let files = report["files"].as_array().unwrap();
    assert_eq!(files.len(), 1, "{report:#}");
    assert_eq!(files[0]["key"], "raw/support_tickets/2024-03-01.csv");
    // Exactly the named object: the other file waits.
    assert_eq!(
        p.files("raw/support_tickets"),
        vec!["raw/support_tickets/2024-03-02.csv"]
    );
    assert!(p.rows("processed/support_tickets") > 0);
    // JSON log lines for CloudWatch, with the run's span.
    let line = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| {
            l["spans"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["name"] == "run"))
        })
        .unwrap_or_else(|| panic!("no JSON log line with spans: {logs}"));
    let spans = line["spans"].as_array().unwrap();
    assert!(
        spans
            .iter()
            .any(|s| s["name"] == "run" && s["run_id"].is_string()),
        "{line}"
    );
    assert!(
        spans.iter().any(|s| s["requestId"] == "req-1"),
        "the invocation's request id: {line}"
    );
}

#[test]
fn the_invocations_deadline_stops_the_run_at_a_safe_point_before_lambda_kills_it() {
    let p = Project::empty();
    p.add_fixture("app_logs", "2024-03-01.jsonl");
    let raw = p.files("raw");
    // Held after reading its files until the invocation's 3 s are nearly gone: the deadline
    // less its margin (a tenth) has passed when it goes on, so it stops before its commit.
    let pause = p.path().join("pause");
    std::fs::write(&pause, "").unwrap();
    let release = {
        let pause = pause.clone();
        std::thread::spawn(move || {
            let reached = pause.with_extension("reached");
            while !reached.exists() {
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(2900));
            std::fs::remove_file(&pause).unwrap();
        })
    };
    let event = serde_json::json!({"source": "aws.scheduler", "detail": {}});
    let (path, body, log) = invoke_with(
        &p,
        event,
        Duration::from_secs(3),
        &[
            ("SLUICE_PAUSE_AT", "read".as_ref()),
            ("SLUICE_PAUSE_FILE", pause.as_os_str()),
        ],
    );
    release.join().unwrap();
    assert_eq!(
        path, "/2018-06-01/runtime/invocation/req-1/error",
        "{body}\n{log}"
    );
    let message = body.to_string();
    assert!(
        message.contains("max_runtime 2s reached") && message.contains("before its commit"),
        "{message}\n{log}"
    );
    // Nothing committed, nothing lost: the file waits for the next invocation, which takes it.
    assert_eq!(p.files("raw"), raw);
    assert!(p.files("processed").is_empty());
    let event = serde_json::json!({"source": "aws.scheduler", "detail": {}});
    let (_, report, _) = invoke(&p, event);
    assert_eq!(report["status"], "succeeded", "{report:#}");
    assert!(p.files("raw").is_empty());
}
