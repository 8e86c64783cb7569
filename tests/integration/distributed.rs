//! The distributed engine on a loopback cluster: two `sluice worker` processes of this binary on
//! free loopback ports, the coordinator a `sluice --workers ...` command. Queries, the aggregates
//! and data checks give the local engine's results; both workers take tasks; a dead worker fails
//! a query with a clear error and the lake untouched, and the query runs again without it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

use crate::support::*;

/// A running `sluice worker`: the process and its URL.
struct Worker {
    child: Option<Child>,
    url: String,
}

impl Worker {
    fn start(p: &Project, extra: &[&str]) -> Worker {
        let mut args = vec!["-v"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["worker", "--listen", "127.0.0.1:0"]);
        let mut child = p
            .cmd(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("sluice worker listening on ")
            .unwrap_or_else(|| panic!("no listening line: {line:?}"))
            .to_string();
        Worker {
            child: Some(child),
            url,
        }
    }

    /// Stops it (SIGTERM): its log.
    fn stop(&mut self) -> String {
        let child = self.child.take().unwrap();
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Rows of `sluice query --format json`, floats to 9 significant digits (a distributed sum
/// adds in another order).
fn rows(p: &Project, workers: Option<&str>, sql: &str) -> Vec<Value> {
    let mut args = Vec::new();
    if let Some(w) = workers {
        args.extend_from_slice(&["--workers", w]);
    }
    args.extend_from_slice(&["query", "--format", "json", sql]);
    let out = p.sluice(&args);
    assert!(out.status.success(), "{sql}: {}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    v.as_array().unwrap().iter().map(rounded).collect()
}

fn rounded(v: &Value) -> Value {
    match v {
        Value::Number(n) if n.is_f64() => Value::String(format!("{:.9e}", n.as_f64().unwrap())),
        Value::Array(a) => Value::Array(a.iter().map(rounded).collect()),
        Value::Object(o) => Value::Object(o.iter().map(|(k, v)| (k.clone(), rounded(v))).collect()),
        other => other.clone(),
    }
}

/// The example pipeline with its fixtures run, and tasks of about 4 KiB of Parquet.
fn lake() -> Project {
    let p = Project::with_fixtures();
    let text = std::fs::read_to_string(p.config()).unwrap();
    std::fs::write(
        p.config(),
        format!("{text}\n[engine]\ntask_size = \"4KiB\"\n"),
    )
    .unwrap();
    assert_eq!(p.run().0, 0);
    p
}

const QUERIES: &[&str] = &[
    "SELECT count(*) AS n, count(DISTINCT request_id) AS keys, sum(latency_ms) AS latency FROM app_logs",
    "SELECT event_date, service_name, count(*) AS n, avg(latency_ms) AS avg, count(DISTINCT user_id) AS users \
     FROM app_logs GROUP BY 1, 2 ORDER BY 1, 2",
    "SELECT l.service_name, t.status, count(*) AS n FROM app_logs l JOIN support_tickets t \
     ON l.event_date = t.event_date GROUP BY 1, 2 ORDER BY 1, 2",
    "SELECT request_id, service_name, latency_ms, \
     rank() OVER (PARTITION BY service_name ORDER BY latency_ms DESC, request_id) AS r \
     FROM app_logs ORDER BY service_name, r LIMIT 40",
    "SELECT count(try_to_timestamp(CAST(event_ts AS VARCHAR), '%Y-%m-%dT%H:%M:%S%.f')) AS parsed, \
     count(*) AS n FROM app_logs",
    "SELECT json_get_str('{\"a\": {\"b\": \"x\"}}', 'a', 'b') AS j, count(*) AS n FROM support_tickets",
    "SELECT * FROM daily_service_health ORDER BY event_date, service_name",
];

#[test]
fn queries_aggregates_and_checks_on_a_loopback_cluster_equal_the_local_engine() {
    let p = lake();
    let mut a = Worker::start(&p, &[]);
    let mut b = Worker::start(&p, &[]);
    let workers = format!("{},{}", a.url, b.url);
    for sql in QUERIES {
        let local = rows(&p, None, sql);
        assert!(!local.is_empty(), "{sql}");
        assert_eq!(rows(&p, Some(&workers), sql), local, "{sql}");
    }
    // The aggregates a run builds on the cluster are their queries' results here, over the
    // same tables (another project: compared with itself, since rows tied on the dedup order
    // may win differently between two lakes' runs).
    let q = Project::with_fixtures();
    let out = q.sluice(&["--workers", &workers, "run", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    for agg in ["daily_service_health", "daily_ticket_stats"] {
        let query = std::fs::read_to_string(repo().join(format!("queries/aggregates/{agg}.sql")))
            .unwrap()
            .lines()
            .filter(|l| !l.trim_start().starts_with("--"))
            .collect::<Vec<_>>()
            .join("\n");
        let stored = rows(&q, None, &format!("SELECT * FROM {agg} ORDER BY 1, 2"));
        assert!(!stored.is_empty(), "{agg}");
        assert_eq!(stored, rows(&q, None, &query), "{agg}");
    }
    // Data checks over the whole table on the cluster.
    let text_before = std::fs::read_to_string(p.config()).unwrap();
    std::fs::write(
        p.config(),
        text_before.replacen(
            "[[aggregate]]",
            "[[table.check]]\nmin_rows = 1\n[[table.check]]\nnot_null = [\"ticket_id\"]\n\n[[aggregate]]",
            1,
        ),
    )
    .unwrap();
    let local = p.sluice(&["check", "--json"]);
    let remote = p.sluice(&["--workers", &workers, "check", "--json"]);
    assert_eq!(
        local.status.code(),
        remote.status.code(),
        "{}",
        text(&remote)
    );
    assert_eq!(
        String::from_utf8_lossy(&local.stdout),
        String::from_utf8_lossy(&remote.stdout)
    );
    std::fs::write(p.config(), text_before).unwrap();
    // The work was split: both workers ran tasks.
    let (la, lb) = (a.stop(), b.stop());
    for (name, log) in [("a", &la), ("b", &lb)] {
        assert!(
            log.contains("a query's tasks arrived"),
            "worker {name} ran no task: {log}"
        );
    }
}

#[test]
fn a_dead_worker_fails_the_query_clearly_and_the_rerun_without_it_is_right() {
    let p = lake();
    let a = Worker::start(&p, &[]);
    let mut b = Worker::start(&p, &[]);
    let dead = b.url.clone();
    b.stop();
    let files = p.files("");
    let sql = QUERIES[1];
    let out = p.sluice(&[
        "--workers",
        &format!("{},{dead}", a.url),
        "query",
        "--format",
        "json",
        sql,
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    let msg = text(&out);
    assert!(
        msg.contains(dead.trim_start_matches("http://")) || msg.to_lowercase().contains("connect"),
        "{msg}"
    );
    assert_eq!(p.files(""), files, "the lake is untouched");
    assert_eq!(rows(&p, Some(&a.url), sql), rows(&p, None, sql));
}

#[test]
fn a_worker_with_little_memory_still_completes_a_big_aggregate() {
    let p = lake();
    // Many groups: every request id, on a worker with the smallest memory pool.
    let a = Worker::start(&p, &["--memory-limit", "64MiB"]);
    let sql = "SELECT request_id, count(*) AS n, max(latency_ms) AS m FROM app_logs \
               GROUP BY request_id ORDER BY request_id";
    assert_eq!(rows(&p, Some(&a.url), sql), rows(&p, None, sql));
}

#[test]
fn workers_are_checked_before_anything_runs() {
    let p = Project::with_fixtures();
    let out = p.sluice(&["--workers", "not a url", "run"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--workers"), "{}", text(&out));
    let text_before = std::fs::read_to_string(p.config()).unwrap();
    std::fs::write(
        p.config(),
        format!("{text_before}\n[engine]\nkind = \"distributed\"\n"),
    )
    .unwrap();
    let out = p.sluice(&["validate"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("engine.workers"), "{}", text(&out));
    assert!(p.files("processed").is_empty());
}
