//! The distributed engine on a loopback cluster: two `sluice worker` processes of this binary on
//! free loopback ports, the coordinator a `sluice --workers ...` command. Queries, the aggregates
//! and data checks give the local engine's results; both workers take tasks and read rows, which
//! add up to the table (and would not if a task read more than its share: the negative control);
//! a dead worker, or one killed mid-query, fails the query with a clear error and the lake
//! untouched, and the query runs again without it; a worker with little memory spills.

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
        Worker::start_with(p, extra, &[])
    }

    /// [`Worker::start`] with environment variables.
    fn start_with(p: &Project, extra: &[&str], env: &[(&str, &str)]) -> Worker {
        let mut cmd = p.cmd(&Worker::args(extra));
        cmd.envs(env.iter().copied());
        Worker::spawn(cmd)
    }

    /// `sluice -v EXTRA worker --listen 127.0.0.1:0`.
    fn args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec!["-v"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["worker", "--listen", "127.0.0.1:0"]);
        args
    }

    /// Starts the worker command and waits until it listens.
    fn spawn(mut cmd: Command) -> Worker {
        let mut child = cmd
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

    /// Kills it (SIGKILL), as a lost machine would: its URL.
    fn kill(&mut self) -> String {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        self.url.clone()
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
    rows_with(p, workers, sql, &[])
}

/// [`rows`] with environment variables for the coordinator.
fn rows_with(p: &Project, workers: Option<&str>, sql: &str, env: &[(&str, &str)]) -> Vec<Value> {
    let mut cmd = p.cmd(&query_args(workers, sql));
    cmd.envs(env.iter().copied());
    rows_of(cmd, sql)
}

/// `[--workers W] query --format json SQL`.
fn query_args<'a>(workers: Option<&'a str>, sql: &'a str) -> Vec<&'a str> {
    let mut args = Vec::new();
    if let Some(w) = workers {
        args.extend_from_slice(&["--workers", w]);
    }
    args.extend_from_slice(&["query", "--format", "json", sql]);
    args
}

/// The rows a `sluice query --format json` command printed, floats rounded.
fn rows_of(mut cmd: Command, sql: &str) -> Vec<Value> {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{sql}: {}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    v.as_array().unwrap().iter().map(rounded).collect()
}

/// An aggregate's query as shipped, without its comment lines.
fn aggregate_query(name: &str) -> String {
    std::fs::read_to_string(repo().join(format!("queries/aggregates/{name}.sql")))
        .unwrap()
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n")
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
    small_tasks(&p);
    assert_eq!(p.run().0, 0);
    p
}

/// Tasks of about 4 KiB of Parquet, so that the fixtures' tables make many.
fn small_tasks(p: &Project) {
    let text = std::fs::read_to_string(p.config()).unwrap();
    std::fs::write(
        p.config(),
        format!("{text}\n[engine]\ntask_size = \"4KiB\"\n"),
    )
    .unwrap();
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
        let stored = rows(&q, None, &format!("SELECT * FROM {agg} ORDER BY 1, 2"));
        assert!(!stored.is_empty(), "{agg}");
        assert_eq!(stored, rows(&q, None, &aggregate_query(agg)), "{agg}");
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
            tasks(log).iter().any(|&rows| rows > 0),
            "worker {name} ran no task: {log}"
        );
    }
}

/// The rows the scans of each task a worker reported in its log read (`worker: task done`).
fn tasks(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("worker: task done"))
        .map(|l| {
            let field = l
                .split_whitespace()
                .find_map(|w| w.strip_prefix("rows="))
                .unwrap_or_else(|| panic!("no rows= in {l}"));
            field.parse().unwrap_or_else(|e| panic!("{e}: {l}"))
        })
        .collect()
}

/// Whether a cluster's query over one table split its input: both workers ran tasks that read
/// rows, the rows read add up to the table's, and the keys (every one, sorted) are the local
/// engine's. The reason it did not, if not.
fn split(local_keys: &[Value], cluster_keys: &[Value], logs: [&str; 2]) -> Result<(), String> {
    let per_worker: Vec<Vec<u64>> = logs.iter().map(|l| tasks(l)).collect();
    for (i, t) in per_worker.iter().enumerate() {
        if !t.iter().any(|&rows| rows > 0) {
            return Err(format!("worker {i} read no rows: {t:?}"));
        }
    }
    let read: u64 = per_worker.iter().flatten().sum();
    if read != local_keys.len() as u64 {
        return Err(format!(
            "the workers read {read} rows of a {}-row table: {per_worker:?}",
            local_keys.len()
        ));
    }
    if cluster_keys != local_keys {
        return Err(format!(
            "{} keys on the cluster, {} here",
            cluster_keys.len(),
            local_keys.len()
        ));
    }
    Ok(())
}

#[test]
fn both_workers_read_their_share_and_a_task_reading_all_its_input_would_be_caught() {
    let p = lake();
    let sql = "SELECT request_id FROM app_logs ORDER BY request_id";
    let local = rows(&p, None, sql);
    assert!(local.len() > 10, "{local:?}");
    let run = |env: &[(&str, &str)]| {
        let mut a = Worker::start(&p, &[]);
        let mut b = Worker::start(&p, &[]);
        let workers = format!("{},{}", a.url, b.url);
        let cluster = rows_with(&p, Some(&workers), sql, env);
        let (la, lb) = (a.stop(), b.stop());
        split(&local, &cluster, [&la, &lb])
    };
    assert_eq!(run(&[]), Ok(()));
    // Negative control: every task given its scan's whole input.
    let broken = run(&[("SLUICE_FAULT", "unsplit-scans")]);
    assert!(broken.is_err(), "{broken:?}");
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
    let out = p.sluice(&query_args(Some(&format!("{},{dead}", a.url)), sql));
    assert!(!out.status.success(), "{}", text(&out));
    let msg = text(&out);
    assert!(msg.contains(&format!("worker {dead}")), "{msg}");
    assert_eq!(p.files(""), files, "the lake is untouched");
    assert_eq!(rows(&p, Some(&a.url), sql), rows(&p, None, sql));
}

/// A worker that holds on its first task while the project's `pause` file exists; that file.
fn held_worker(p: &Project) -> (Worker, std::path::PathBuf) {
    let pause = p.path().join("pause");
    std::fs::write(&pause, "").unwrap();
    let pause_file = pause.to_str().unwrap().to_string();
    let w = Worker::start_with(
        p,
        &[],
        &[
            ("SLUICE_PAUSE_AT", "worker-task"),
            ("SLUICE_PAUSE_FILE", &pause_file),
        ],
    );
    (w, pause)
}

#[test]
fn a_worker_killed_mid_query_fails_it_clearly_and_the_rerun_without_it_is_right() {
    let p = lake();
    let a = Worker::start(&p, &[]);
    // Worker b holds on its first task until it is killed.
    let (mut b, pause) = held_worker(&p);
    let files = p.files("");
    let sql = QUERIES[1];
    let query = p
        .cmd(&query_args(Some(&format!("{},{}", a.url, b.url)), sql))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_held(&p, "worker b's first task");
    let killed = b.kill();
    let out = query.wait_with_output().unwrap();
    std::fs::remove_file(&pause).unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    let msg = text(&out);
    assert!(msg.contains(&format!("worker {killed}")), "{msg}");
    assert!(out.stdout.is_empty(), "no partial result: {msg}");
    assert_eq!(p.files(""), files, "the lake is untouched");
    assert_eq!(rows(&p, Some(&a.url), sql), rows(&p, None, sql));
}

#[test]
fn a_worker_with_little_memory_spills_and_completes_a_big_aggregate() {
    let p = lake();
    let raw = p.lake().join("raw/app_logs/generated.jsonl");
    let out = p.sluice(&[
        "generate",
        "logs",
        raw.to_str().unwrap(),
        "--rows",
        "300000",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(p.run().0, 0);
    // Every request id a group, on workers with a small memory pool (a single worker would get
    // no tasks: the planner keeps a one-worker plan here).
    let a = Worker::start(&p, &["--memory-limit", "64MiB"]);
    let b = Worker::start(&p, &["--memory-limit", "64MiB"]);
    let workers = format!("{},{}", a.url, b.url);
    let sql = "SELECT request_id, count(*) AS n, max(latency_ms) AS m, min(service_name) AS s \
               FROM app_logs GROUP BY request_id";
    let checksum = format!(
        "SELECT count(*) AS groups, sum(n) AS n, sum(m) AS m, count(DISTINCT s) AS s FROM ({sql})"
    );
    let local = rows(&p, None, &checksum);
    assert!(local[0]["groups"].as_u64().unwrap() > 250_000, "{local:?}");
    assert_eq!(rows(&p, Some(&workers), &checksum), local);
    // It did not fit: the workers' aggregates spilled.
    let explain = p.sluice(&[
        "--workers",
        &workers,
        "query",
        &format!("EXPLAIN ANALYZE {sql}"),
    ]);
    assert!(explain.status.success(), "{}", text(&explain));
    let plan = String::from_utf8_lossy(&explain.stdout);
    let spilled = plan
        .split([',', ' ', '[', ']', '{', '}'])
        .filter_map(|w| w.strip_prefix("spill_count="))
        .filter_map(|v| v.parse::<u64>().ok())
        .sum::<u64>();
    assert!(spilled > 0, "no spill on the worker: {plan}");
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

#[test]
fn queries_over_an_s3_lake_run_on_workers_that_read_it_from_s3() {
    let moto = crate::aws::Moto::start();
    let p = crate::aws::s3_project(&moto, "cluster", "kind = \"lake\"");
    small_tasks(&p);
    let (code, report) = crate::aws::run_json(&moto, &p, &[]);
    assert_eq!(code, 0, "{report:#}");
    let worker = || {
        let mut cmd = p.cmd(&Worker::args(&[]));
        moto.env(&mut cmd);
        Worker::spawn(cmd)
    };
    let (mut a, mut b) = (worker(), worker());
    let workers = format!("{},{}", a.url, b.url);
    let query = |workers: Option<&str>, sql: &str| {
        let mut cmd = p.cmd(&query_args(workers, sql));
        moto.env(&mut cmd);
        rows_of(cmd, sql)
    };
    for sql in &QUERIES[..3] {
        let local = query(None, sql);
        assert!(!local.is_empty(), "{sql}");
        assert_eq!(query(Some(&workers), sql), local, "{sql}");
    }
    let (la, lb) = (a.stop(), b.stop());
    for (name, log) in [("a", &la), ("b", &lb)] {
        assert!(
            tasks(log).iter().any(|&rows| rows > 0),
            "worker {name} read nothing from S3: {log}"
        );
    }
}

#[test]
fn a_worker_killed_during_a_runs_aggregates_keeps_the_commit_and_the_old_aggregates() {
    let p = lake();
    let raw = p.lake().join("raw/app_logs/late.jsonl");
    let out = p.sluice(&["generate", "logs", raw.to_str().unwrap(), "--rows", "500"]);
    assert!(out.status.success(), "{}", text(&out));
    let a = Worker::start(&p, &[]);
    let (mut b, pause) = held_worker(&p);
    let warehouse = p.files("warehouse");
    assert!(!warehouse.is_empty());
    let before = rows(&p, None, "SELECT count(*) AS n FROM app_logs");
    let run = p
        .cmd(&[
            "--workers",
            &format!("{},{}", a.url, b.url),
            "run",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_held(&p, "worker b's first task of the aggregates");
    let killed = b.kill();
    let out = run.wait_with_output().unwrap();
    std::fs::remove_file(&pause).unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("worker {killed}")),
        "{}",
        text(&out)
    );
    // The file's rows are committed; the aggregates are the old ones, untouched.
    assert_ne!(rows(&p, None, "SELECT count(*) AS n FROM app_logs"), before);
    assert_eq!(p.files("warehouse"), warehouse, "{}", text(&out));
    // The rerun (without the lost worker) refreshes them right.
    let out = p.sluice(&["--workers", &a.url, "run"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_ne!(p.files("warehouse"), warehouse);
    assert_eq!(
        rows(&p, None, "SELECT * FROM daily_service_health ORDER BY 1, 2"),
        rows(&p, None, &aggregate_query("daily_service_health"))
    );
}
