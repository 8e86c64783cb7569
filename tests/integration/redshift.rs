//! The warehouse step on Amazon Redshift through the Data API, against a fake Data API server
//! of the test's own (moto does not serve it to the Rust SDK): JSON 1.1 over HTTP on a loopback
//! port, with scripted outcomes, recording every request. The lake is an S3 lake on moto, so
//! COPY manifests name real `s3://` objects.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use crate::aws::{Moto, s3_project};
use crate::support::Project;

/// How a scripted statement ends.
#[derive(Debug, Clone)]
pub enum Outcome {
    Finish,
    Fail(String),
    Abort,
}

#[derive(Debug)]
struct Statement {
    polls_left: u32,
    outcome: Outcome,
}

#[derive(Default)]
struct State {
    /// (operation, request body), in order.
    requests: Vec<(String, Value)>,
    statements: HashMap<String, Statement>,
    tokens: HashMap<String, String>,
    /// (SQL substring, DescribeStatement calls answered STARTED before the end, outcome).
    scripts: Vec<(String, u32, Outcome)>,
}

impl State {
    fn respond(&mut self, op: &str, body: Value) -> (u16, Value) {
        self.requests.push((op.to_string(), body.clone()));
        match op {
            "ExecuteStatement" => {
                let token = body["ClientToken"].as_str().unwrap_or_default().to_string();
                if let Some(id) = self.tokens.get(&token) {
                    return (200, json!({ "Id": id }));
                }
                let sql = body["Sql"].as_str().unwrap_or_default();
                let (polls, outcome) = self
                    .scripts
                    .iter()
                    .find(|(p, _, _)| sql.contains(p.as_str()))
                    .map(|(_, n, o)| (*n, o.clone()))
                    .unwrap_or((1, Outcome::Finish));
                let id = format!("fake-{:04}", self.statements.len() + 1);
                self.statements.insert(
                    id.clone(),
                    Statement {
                        polls_left: polls,
                        outcome,
                    },
                );
                self.tokens.insert(token, id.clone());
                (
                    200,
                    json!({ "Id": id, "CreatedAt": 1.7e9, "Database": body["Database"] }),
                )
            }
            "DescribeStatement" => {
                let id = body["Id"].as_str().unwrap_or_default().to_string();
                let Some(st) = self.statements.get_mut(&id) else {
                    return (
                        400,
                        json!({ "__type": "ResourceNotFoundException", "Message": format!("no statement {id}") }),
                    );
                };
                if st.polls_left > 0 {
                    st.polls_left -= 1;
                    return (200, json!({ "Id": id, "Status": "STARTED" }));
                }
                match &st.outcome {
                    Outcome::Finish => (
                        200,
                        json!({ "Id": id, "Status": "FINISHED", "Duration": 1_500_000_000i64, "ResultRows": 42 }),
                    ),
                    Outcome::Fail(m) => (200, json!({ "Id": id, "Status": "FAILED", "Error": m })),
                    Outcome::Abort => (200, json!({ "Id": id, "Status": "ABORTED" })),
                }
            }
            other => (
                400,
                json!({ "__type": "ValidationException", "Message": format!("{other} is not faked") }),
            ),
        }
    }
}

/// A Data API endpoint on a loopback port.
pub struct FakeDataApi {
    pub endpoint: String,
    state: Arc<Mutex<State>>,
}

impl FakeDataApi {
    pub fn start() -> FakeDataApi {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let state = shared.clone();
                std::thread::spawn(move || serve(conn, state));
            }
        });
        FakeDataApi { endpoint, state }
    }

    /// Statements whose SQL contains `sql` stay STARTED for `polls` descriptions, then end so.
    pub fn script(&self, sql: &str, polls: u32, outcome: Outcome) {
        let mut s = self.state.lock().unwrap();
        s.scripts.retain(|(p, _, _)| p != sql);
        s.scripts.insert(0, (sql.to_string(), polls, outcome));
    }

    /// The ExecuteStatement requests, in order.
    pub fn executed(&self) -> Vec<Value> {
        let s = self.state.lock().unwrap();
        s.requests
            .iter()
            .filter(|(op, _)| op == "ExecuteStatement")
            .map(|(_, b)| b.clone())
            .collect()
    }

    /// How many times a statement was described.
    pub fn described(&self, id: &str) -> usize {
        let s = self.state.lock().unwrap();
        s.requests
            .iter()
            .filter(|(op, b)| op == "DescribeStatement" && b["Id"] == id)
            .count()
    }

    /// The id the server gave the n-th ExecuteStatement (0-based) with a new token.
    pub fn ids(&self) -> Vec<String> {
        let s = self.state.lock().unwrap();
        let mut ids: Vec<String> = s.statements.keys().cloned().collect();
        ids.sort();
        ids
    }
}

fn serve(conn: TcpStream, state: Arc<Mutex<State>>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let (mut length, mut target) = (0usize, String::new());
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                match k.trim().to_ascii_lowercase().as_str() {
                    "content-length" => length = v.trim().parse().unwrap_or(0),
                    "x-amz-target" => target = v.trim().to_string(),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let op = target.strip_prefix("RedshiftData.").unwrap_or(&target);
        let (status, reply) = state.lock().unwrap().respond(op, body);
        let reply = reply.to_string();
        let head = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: {}\r\n\r\n",
            if status == 200 { "OK" } else { "Bad Request" },
            reply.len()
        );
        if out.write_all(head.as_bytes()).is_err() || out.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

const ROLE: &str = "arn:aws:iam::123456789012:role/sluice-copy";
const SECRET: &str = "arn:aws:secretsmanager:us-east-1:123456789012:secret:redshift-admin";

/// The example pipeline on an S3 lake, loading Redshift through `fake`.
fn redshift_project(moto: &Moto, extra: &str) -> Project {
    let p = s3_project(moto, "lake", "kind = \"lake\"");
    let text = std::fs::read_to_string(p.config()).unwrap();
    std::fs::write(
        p.config(),
        format!(
            "{text}\n[warehouse]\nkind = \"redshift-data\"\nworkgroup_name = \"analytics\"\n\
             database = \"dev\"\nsecret_arn = \"{SECRET}\"\niam_role = \"{ROLE}\"\n\
             load = \"copy\"\nload_into = \"analytics.{{table}}_staging\"\n\
             call = \"CALL analytics.sp_build_daily_ticket_stats(:run_date)\"\n{extra}"
        ),
    )
    .unwrap();
    p.edit_config("max_attempts = 3", "max_attempts = 2");
    p
}

fn run(moto: &Moto, fake: &FakeDataApi, p: &Project, extra: &[&str]) -> (i32, Value, String) {
    let mut args = vec!["run", "--json"];
    args.extend_from_slice(extra);
    let mut c = p.cmd(&args);
    moto.env(&mut c);
    c.env("AWS_ENDPOINT_URL_REDSHIFT_DATA", &fake.endpoint);
    let out = c.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let report = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (
        out.status.code().unwrap_or(-1),
        report,
        format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)),
    )
}

fn today() -> String {
    chrono::Utc::now().date_naive().to_string()
}

fn manifest(moto: &Moto, sql: &str) -> (String, Value) {
    let url = sql.split('\'').nth(1).unwrap().to_string();
    let key = url.strip_prefix("s3://lake/").unwrap().to_string();
    let data = moto.get("lake", &key);
    (key, serde_json::from_slice(&data).unwrap())
}

#[test]
fn redshift_copies_each_commits_files_by_manifest_and_calls_the_procedure() {
    let moto = Moto::start();
    let fake = FakeDataApi::start();
    fake.script("CALL", 3, Outcome::Finish);
    let p = redshift_project(&moto, "");
    let (code, report, out) = run(&moto, &fake, &p, &[]);
    assert_eq!(code, 0, "{out}");
    let run_id = report["run_id"].as_str().unwrap();

    let sent = fake.executed();
    assert_eq!(sent.len(), 3, "{sent:#?}");
    for (i, table) in ["app_logs", "support_tickets"].iter().enumerate() {
        let sql = sent[i]["Sql"].as_str().unwrap();
        assert_eq!(
            sql,
            format!(
                "COPY analytics.{table}_staging FROM 's3://lake/data/_sluice/manifests/{run_id}-{table}.json' \
                 IAM_ROLE '{ROLE}' FORMAT AS PARQUET MANIFEST"
            )
        );
        // The manifest lists exactly the table's committed files, with their sizes.
        let (_, m) = manifest(&moto, sql);
        let mut listed: Vec<(String, u64)> = m["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                assert_eq!(e["mandatory"], true);
                (
                    e["url"].as_str().unwrap().to_string(),
                    e["meta"]["content_length"].as_u64().unwrap(),
                )
            })
            .collect();
        listed.sort();
        let expected: Vec<(String, u64)> = moto
            .keys("lake", &format!("data/processed/{table}"))
            .into_iter()
            .map(|k| {
                let size = moto.size("lake", &k);
                (format!("s3://lake/{k}"), size)
            })
            .collect();
        assert!(!expected.is_empty());
        assert_eq!(listed, expected);
    }
    let call = &sent[2];
    assert_eq!(
        call["Sql"],
        "CALL analytics.sp_build_daily_ticket_stats(:run_date)"
    );
    assert_eq!(
        call["Parameters"],
        json!([{ "name": "run_date", "value": today() }])
    );
    for s in &sent {
        assert_eq!(s["WorkgroupName"], "analytics");
        assert_eq!(s["Database"], "dev");
        assert_eq!(s["SecretArn"], SECRET);
        assert_eq!(s["ClientToken"].as_str().unwrap().len(), 32);
        assert!(s["StatementName"].as_str().unwrap().starts_with("sluice-"));
    }
    assert!(call["StatementName"].as_str().unwrap().ends_with("-call-1"));
    let tokens: std::collections::BTreeSet<String> = sent
        .iter()
        .map(|s| s["ClientToken"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(tokens.len(), 3);
    // Polled until FINISHED: three STARTED answers, then the end.
    let ids = fake.ids();
    assert_eq!(fake.described(&ids[2]), 4);
    let st = report["statements"].as_array().unwrap();
    assert_eq!(st.len(), 3);
    for (s, id) in st.iter().zip(&ids) {
        assert_eq!(s["status"], "finished");
        assert_eq!(&s["id"], id);
        assert_eq!(s["rows"], 42);
        assert_eq!(s["seconds"], 1.5);
    }

    // Nothing new: nothing sent.
    let (code, report, out) = run(&moto, &fake, &p, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(report["statements"], json!([]));
    assert_eq!(fake.executed().len(), 3);

    // One new file: one COPY of that table, its manifest listing only the new commit's files.
    let before = moto.keys("lake", "data/processed/app_logs");
    moto.put(
        "lake",
        "data/raw/app_logs/2024-03-09.jsonl",
        br#"{"ts":"2024-03-09T10:00:00Z","level":"INFO","service":"api","host":"h1","request_id":"r-new-1","latency_ms":5,"message":"ok","user_id":"u1"}
"#
        .to_vec(),
    );
    let (code, report, out) = run(&moto, &fake, &p, &[]);
    assert_eq!(code, 0, "{out}");
    let sent = fake.executed();
    assert_eq!(sent.len(), 5, "{sent:#?}");
    let sql = sent[3]["Sql"].as_str().unwrap();
    assert!(
        sql.starts_with("COPY analytics.app_logs_staging FROM"),
        "{sql}"
    );
    let (_, m) = manifest(&moto, sql);
    let urls: Vec<&str> = m["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["url"].as_str().unwrap())
        .collect();
    assert!(!urls.is_empty());
    for u in &urls {
        let key = u.strip_prefix("s3://lake/").unwrap();
        assert!(
            !before.contains(&key.to_string()),
            "{key} was loaded before"
        );
    }
    assert!(sent[4]["Sql"].as_str().unwrap().starts_with("CALL"));
    assert_eq!(report["statements"].as_array().unwrap().len(), 2);
}

#[test]
fn a_failing_procedure_is_retried_with_new_tokens_and_reported() {
    let moto = Moto::start();
    let fake = FakeDataApi::start();
    let error = "ERROR: column \"hours_open\" does not exist in daily_ticket_stats";
    fake.script("CALL", 1, Outcome::Fail(error.to_string()));
    let (topic, inbox) = moto.topic_with_queue("failures");
    let p = redshift_project(&moto, "");
    p.edit_config(
        "on_failure = [\"log\"]",
        &format!("on_failure = [\"sns:{topic}\"]"),
    );
    let (code, report, out) = run(&moto, &fake, &p, &[]);
    assert_eq!(code, 1, "{out}");
    let sent = fake.executed();
    let calls: Vec<&Value> = sent
        .iter()
        .filter(|s| s["Sql"].as_str().unwrap().starts_with("CALL"))
        .collect();
    assert_eq!(calls.len(), 2, "retried once ([retry] max_attempts = 2)");
    assert_ne!(calls[0]["ClientToken"], calls[1]["ClientToken"]);
    assert!(
        report["errors"].to_string().contains("hours_open"),
        "{report}"
    );
    let failed: Vec<_> = report["statements"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == "failed")
        .collect();
    assert_eq!(failed.len(), 2);
    assert_eq!(failed[1]["error"], error);
    // The failure notification carries Redshift's text.
    let messages = moto.drain(&inbox);
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert!(
        messages[0]["Message"]
            .as_str()
            .unwrap()
            .contains("hours_open"),
        "{messages:?}"
    );

    // Fixed in Redshift: the next run calls again (a third token); the COPYs are not repeated.
    fake.script("CALL", 0, Outcome::Finish);
    let (code, report, out) = run(&moto, &fake, &p, &[]);
    assert_eq!(code, 0, "{out}");
    let sent = fake.executed();
    assert_eq!(sent.len(), 5, "{sent:#?}");
    assert!(sent[4]["Sql"].as_str().unwrap().starts_with("CALL"));
    assert_eq!(report["statements"][0]["step"], "call 1");
    assert_eq!(report["statements"][0]["attempt"], 3);
    assert_eq!(report["statements"][0]["status"], "finished");
}

#[test]
fn an_aborted_statement_fails_the_run_without_retrying() {
    let moto = Moto::start();
    let fake = FakeDataApi::start();
    fake.script("CALL", 0, Outcome::Abort);
    let p = redshift_project(&moto, "");
    let (code, report, out) = run(&moto, &fake, &p, &[]);
    assert_eq!(code, 1, "{out}");
    let calls = fake
        .executed()
        .iter()
        .filter(|s| s["Sql"].as_str().unwrap().starts_with("CALL"))
        .count();
    assert_eq!(calls, 1);
    assert!(report["errors"].to_string().contains("aborted"), "{report}");
}

#[test]
fn a_run_that_crashed_or_gave_up_waiting_resumes_the_same_statement() {
    let moto = Moto::start();
    let fake = FakeDataApi::start();
    fake.script("CALL", 8, Outcome::Finish);
    let p = redshift_project(&moto, "deadline = \"2s\"\n");
    // Crash right after the statement id is saved.
    let (code, _, out) = run(&moto, &fake, &p, &["--crash-at", "submitted:call 1"]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("injected crash"), "{out}");
    let call_id = fake.ids()[2].clone();
    assert_eq!(fake.described(&call_id), 0);

    // The next run waits for that statement instead of calling again, up to the deadline.
    let (code, report, out) = run(&moto, &fake, &p, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        report["errors"]
            .to_string()
            .contains("still running after 2s"),
        "{report}"
    );
    assert_eq!(report["statements"][0]["id"], call_id.as_str());
    assert_eq!(report["statements"][0]["status"], "submitted");
    let polled = fake.described(&call_id);
    assert!(polled >= 3, "{polled}");
    // `status` shows the unfinished unit.
    let mut c = p.cmd(&["status", "--json"]);
    moto.env(&mut c);
    let status: Value = serde_json::from_slice(&c.output().unwrap().stdout).unwrap();
    let w = &status["warehouse"];
    assert_eq!(w["kind"], "redshift");
    assert_eq!(w["commits_loaded"], 0);
    assert!(w["commits_waiting"].as_u64().unwrap() > 0);
    let waiting: Vec<_> = w["inflight"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["step"].as_str().unwrap(), s["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        waiting,
        [
            ("load app_logs", "finished"),
            ("load support_tickets", "finished"),
            ("call 1", "submitted")
        ]
    );

    // And the one after that sees it finish.
    p.edit_config("deadline = \"2s\"", "deadline = \"60s\"");
    let (code, report, out) = run(&moto, &fake, &p, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(report["statements"][0]["id"], call_id.as_str());
    assert_eq!(report["statements"][0]["status"], "finished");
    let calls = fake
        .executed()
        .iter()
        .filter(|s| s["Sql"].as_str().unwrap().starts_with("CALL"))
        .count();
    assert_eq!(calls, 1, "the procedure was called once");
}

#[test]
fn a_crash_after_a_copy_finished_does_not_copy_again() {
    let moto = Moto::start();
    let fake = FakeDataApi::start();
    let p = redshift_project(&moto, "");
    let (code, _, out) = run(&moto, &fake, &p, &["--crash-at", "finished:load app_logs"]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("injected crash"), "{out}");
    assert_eq!(fake.executed().len(), 1);

    let (code, report, out) = run(&moto, &fake, &p, &[]);
    assert_eq!(code, 0, "{out}");
    let sent: Vec<String> = fake
        .executed()
        .iter()
        .map(|s| {
            s["Sql"]
                .as_str()
                .unwrap()
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    assert_eq!(
        sent,
        [
            "COPY analytics.app_logs_staging",
            "COPY analytics.support_tickets_staging",
            "CALL analytics.sp_build_daily_ticket_stats(:run_date)"
        ]
    );
    // The finished COPY was looked up by its saved id, not sent again.
    assert_eq!(report["statements"][0]["step"], "load app_logs");
    assert_eq!(report["statements"][0]["id"], fake.ids()[0].as_str());
    assert_eq!(report["statements"][0]["status"], "finished");
}

#[test]
fn warehouse_deploy_runs_the_shipped_redshift_ddl_in_order() {
    let moto = Moto::start();
    let fake = FakeDataApi::start();
    let p = redshift_project(&moto, "parameters = { glue_database = \"lake_db\" }\n");
    let mut c = p.cmd(&["warehouse", "deploy"]);
    moto.env(&mut c);
    c.env("AWS_ENDPOINT_URL_REDSHIFT_DATA", &fake.endpoint);
    let out = c.output().unwrap();
    let printed = crate::support::text(&out);
    assert!(out.status.success(), "{printed}");
    assert!(
        printed.contains("01_external_schema.sql: 1 statements"),
        "{printed}"
    );
    assert!(printed.contains("02_tables.sql: 7 statements"), "{printed}");
    assert!(
        printed.contains("03_procedures.sql: 2 statements"),
        "{printed}"
    );
    let sent = fake.executed();
    assert_eq!(sent.len(), 10);
    let first = sent[0]["Sql"].as_str().unwrap();
    assert!(
        first.contains("FROM DATA CATALOG DATABASE 'lake_db'")
            && first.contains(&format!("IAM_ROLE '{ROLE}'")),
        "{first}"
    );
    assert!(
        sent[0].get("Parameters").is_none(),
        "DDL takes no bind parameters"
    );
    let last = sent[9]["Sql"].as_str().unwrap();
    assert!(
        last.starts_with("CREATE OR REPLACE PROCEDURE analytics.sp_build_daily_service_health"),
        "{last}"
    );
    assert!(last.trim_end().ends_with("LANGUAGE plpgsql"), "{last}");
    // Each statement was waited for before the next was sent.
    for id in fake.ids() {
        assert_eq!(fake.described(&id), 2, "{id}");
    }
}
