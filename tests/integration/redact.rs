//! Secret values never leave: every key that accepts `secret:` resolved from Secrets Manager
//! (moto), each consumer made to fail and to succeed (webhooks on a loopback server and on a
//! closed port, SNS, PostgreSQL, the Redshift Data API, Glue, the lake root), then everything
//! sluice wrote (stdout, stderr at `-vv` as text and JSON, every file of the lake, the SNS
//! messages, the webhook bodies) searched for each secret value, its sensitive parts and their
//! encoded forms.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use crate::aws::Moto;
use crate::postgres::{PASSWORD, Pg};
use crate::redshift::{FakeDataApi, Outcome};
use crate::support::{Project, tickets};

/// A webhook receiver on a loopback port: answers 200 and keeps each request's body.
struct Hook {
    port: u16,
    bodies: Arc<Mutex<Vec<String>>>,
}

impl Hook {
    fn start() -> Hook {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let kept = bodies.clone();
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let body = read_request(&mut conn);
                kept.lock().unwrap().push(body);
                let _ = conn.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            }
        });
        Hook { port, bodies }
    }

    fn bodies(&self) -> Vec<String> {
        self.bodies.lock().unwrap().clone()
    }
}

/// The body of one HTTP/1.1 request (by its Content-Length).
fn read_request(conn: &mut std::net::TcpStream) -> String {
    let mut data = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = conn.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        data.extend_from_slice(&buf[..n]);
        let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if data.len() >= end + 4 + length {
            return String::from_utf8_lossy(&data[end + 4..end + 4 + length]).into_owned();
        }
    }
    String::new()
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Every byte but RFC 3986's unreserved ones percent-encoded.
fn percent_encoded(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// What must never appear: (what it is, the text).
struct Needles(Vec<(String, String)>);

impl Needles {
    /// A value, percent-encoded, form-encoded and, for a URL, as the url crate prints it.
    fn add(&mut self, what: &str, value: &str) {
        let mut forms = vec![
            value.to_string(),
            percent_encoded(value),
            url::form_urlencoded::byte_serialize(value.as_bytes()).collect(),
        ];
        let address = value.strip_prefix("webhook:").unwrap_or(value);
        if let Ok(u) = url::Url::parse(address)
            && address.contains("://")
        {
            forms.push(u.to_string());
        }
        for f in forms {
            if !self.0.iter().any(|(_, n)| *n == f) {
                self.0.push((what.to_string(), f));
            }
        }
    }

    /// The needles `text` holds, each with its context.
    fn find(&self, place: &str, text: &[u8]) -> Vec<String> {
        let mut found = Vec::new();
        for (what, n) in &self.0 {
            if let Some(at) = memchr::memmem::find(text, n.as_bytes()) {
                let from = at.saturating_sub(120);
                let to = (at + n.len() + 120).min(text.len());
                found.push(format!(
                    "{what} ({n}) in {place}: ...{}...",
                    String::from_utf8_lossy(&text[from..to])
                ));
            }
        }
        found
    }
}

/// Everything one command wrote.
struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

fn sluice(moto: &Moto, fake: &FakeDataApi, p: &Project, args: &[&str]) -> Ran {
    let mut c = p.cmd(args);
    moto.env(&mut c);
    c.env("AWS_ENDPOINT_URL_REDSHIFT_DATA", &fake.endpoint)
        .env_remove("NO_COLOR");
    let out = c.output().unwrap();
    Ran {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn report(ran: &Ran) -> Value {
    serde_json::from_str(&ran.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}); stdout: {}\nstderr: {}",
            ran.stdout, ran.stderr
        )
    })
}

/// Every file under `dir`, with its path.
fn all_files(dir: &std::path::Path, out: &mut Vec<(String, Vec<u8>)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            all_files(&e.path(), out);
        } else {
            out.push((
                e.path().display().to_string(),
                std::fs::read(e.path()).unwrap(),
            ));
        }
    }
}

const CALLS: &str = r#"["CALL analytics.sp_build_daily_ticket_stats(:run_date)", "CALL analytics.sp_build_daily_service_health(:run_date)"]"#;

#[test]
fn secret_values_never_reach_logs_reports_the_lake_or_notifications() {
    let moto = Moto::start();
    let hook = Hook::start();
    let closed = closed_port();
    let pg = Pg::start();
    let fake = FakeDataApi::start();
    let (alerts, inbox) = moto.topic_with_queue("redact-alerts");
    let p = Project::with_fixtures();

    // The secrets: webhooks with tokens in path, query and user info, one refusing; the SNS
    // topic; the lake root; the Glue database; PostgreSQL's URL and password; the Redshift
    // connection keys.
    let ok_hook = format!(
        "webhook:http://127.0.0.1:{}/hook/Ok-T0ken-Path-51?token=Ok-Qu3ry-T0k&sig=a b|c",
        hook.port
    );
    let down_hook = format!(
        "webhook:http://hookuser:Down-Pa55-word@127.0.0.1:{closed}/hook/Down-T0ken-Path-77?token=Down-Qu3ry-T0k"
    );
    let sns_target = format!("sns:{alerts}");
    let lake_root = p.lake().display().to_string();
    let glue_db = "sluice_hidden_catalog";
    let bad_url = format!("postgres://loader:Bad-Url-Pa55@127.0.0.1:{closed}/warehouse_db");
    let redshift = [
        ("workgroup", "hidden-workgroup-7"),
        ("database", "hidden_rs_database"),
        (
            "secret_arn",
            "arn:aws:secretsmanager:us-east-1:123456789012:secret:hidden-rs-admin",
        ),
        (
            "iam_role",
            "arn:aws:iam::123456789012:role/hidden-copy-role",
        ),
    ];
    moto.secret(
        "sluice/hooks",
        &json!({ "ok": ok_hook, "down": down_hook }).to_string(),
    );
    moto.secret("sluice/alerts", &sns_target);
    moto.secret("sluice/lake", &json!({ "root": lake_root }).to_string());
    moto.secret(
        "sluice/db",
        &json!({ "glue": glue_db, "url": pg.url(), "bad_url": bad_url, "password": PASSWORD })
            .to_string(),
    );
    let rs: serde_json::Map<String, Value> = redshift
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    moto.secret("sluice/redshift", &Value::Object(rs).to_string());

    let mut needles = Needles(Vec::new());
    needles.add("the ok webhook", &ok_hook);
    needles.add("the down webhook", &down_hook);
    for part in [
        "Ok-T0ken-Path-51",
        "Ok-Qu3ry-T0k",
        "Down-Pa55-word",
        "Down-T0ken-Path-77",
        "Down-Qu3ry-T0k",
    ] {
        needles.add("a webhook token", part);
    }
    needles.add("the SNS target", &sns_target);
    needles.add("the topic ARN", &alerts);
    needles.add("the lake root", &lake_root);
    needles.add("the Glue database", glue_db);
    needles.add("the warehouse URL", &bad_url);
    needles.add("the warehouse URL's password", "Bad-Url-Pa55");
    needles.add("the warehouse password", PASSWORD);
    for (k, v) in redshift {
        needles.add(k, v);
    }

    // Every key that takes `secret:`, PostgreSQL first (refused: its URL names a closed port).
    let base = std::fs::read_to_string(p.config()).unwrap();
    let base = base
        .replace("root = \"lake\"", "root = \"secret:sluice/lake#root\"")
        .replace(
            "on_success = [\"log\"]\non_failure = [\"log\"]",
            "on_success = [\"log\", \"secret:sluice/hooks#ok\", \"secret:sluice/alerts\"]\n\
             on_failure = [\"log\", \"secret:sluice/hooks#down\", \"secret:sluice/hooks#ok\", \"secret:sluice/alerts\"]\n\
             retries = 0\ntimeout_secs = 5",
        )
        .replace("max_attempts = 3", "max_attempts = 1");
    let base = format!(
        "name = \"redact-check\"\n{base}\n[catalog]\nkind = \"glue\"\ndatabase = \"secret:sluice/db#glue\"\n"
    );
    let postgres = |url: &str| {
        format!(
            "{base}\n[warehouse]\nkind = \"postgres\"\nurl = \"secret:sluice/db#{url}\"\n\
             password = \"secret:sluice/db#password\"\nload = \"copy\"\n\
             load_into = \"analytics.{{table}}_staging\"\ncall = {CALLS}\n"
        )
    };
    let mut seen: Vec<(String, Vec<u8>)> = Vec::new();
    // Each command's output, and the lake after it (state a later run rewrites included).
    let mut keep = |what: &str, ran: &Ran| {
        seen.push((format!("stdout of {what}"), ran.stdout.clone().into_bytes()));
        seen.push((format!("stderr of {what}"), ran.stderr.clone().into_bytes()));
        let mut files = Vec::new();
        all_files(&p.lake(), &mut files);
        seen.extend(
            files
                .into_iter()
                .map(|(f, data)| (format!("{f} after {what}"), data)),
        );
        if let Some(at) = ran.stderr.find("\x1b[") {
            let line = ran.stderr[..at].rfind('\n').map_or(0, |n| n + 1);
            panic!(
                "colour codes on a stderr that is no terminal ({what}): {:?}",
                &ran.stderr[line..(at + 300).min(ran.stderr.len())]
            );
        }
    };
    let broken = b"\x1f\x8b\x08\x00broken".to_vec();

    // 1. Failing: a broken file, the warehouse refused, a webhook refused; text logs.
    std::fs::write(p.config(), postgres("bad_url")).unwrap();
    p.add_raw("app_logs", "broken-1.jsonl.gz", &broken);
    let ran = sluice(&moto, &fake, &p, &["-vv", "run", "--json"]);
    keep("a failing run", &ran);
    let r = report(&ran);
    assert_eq!(ran.code, 1, "{}", ran.stderr);
    assert_eq!(r["status"], "failed");
    let errors = r["errors"].to_string();
    assert!(
        // A webhook's error names only its host and port (the target is a secret).
        errors.contains("notification to webhook 127.0.0.1:"),
        "{errors}"
    );
    assert!(errors.contains("cannot connect to"), "{errors}");
    assert!(
        ran.stderr.contains("notification not delivered")
            && ran.stderr.contains("[secret:sluice/hooks#down]"),
        "{}",
        ran.stderr
    );
    assert!(
        p.lake()
            .join("failed/app_logs/broken-1.jsonl.gz.error.json")
            .exists()
    );

    // 2. Failing again, JSON logs and the plain summary.
    p.add_raw("app_logs", "broken-2.jsonl.gz", &broken);
    let ran = sluice(&moto, &fake, &p, &["-vv", "--log-format", "json", "run"]);
    keep("a failing run with JSON logs", &ran);
    assert_eq!(ran.code, 1, "{}", ran.stderr);
    assert!(
        ran.stdout.contains("notification to webhook 127.0.0.1:"),
        "{}",
        ran.stdout
    );
    for line in ran.stderr.lines().filter(|l| l.starts_with('{')) {
        serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    }
    assert!(
        ran.stderr.contains("[secret:sluice/hooks#down]"),
        "{}",
        ran.stderr
    );

    // 3. Succeeding: the warehouse reachable, deployed and loaded.
    std::fs::write(p.config(), postgres("url")).unwrap();
    let ran = sluice(&moto, &fake, &p, &["-vv", "warehouse", "deploy"]);
    keep("warehouse deploy", &ran);
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    p.add_raw(
        "support_tickets",
        "extra-1.csv",
        &tickets(&[
            "T-9001,2024-03-04T10:00:00Z,2024-03-04T11:00:00Z,open,high,a@example.com,Hi,Body,ann",
        ]),
    );
    let ran = sluice(&moto, &fake, &p, &["-vv", "run", "--json"]);
    keep("a succeeding run", &ran);
    let r = report(&ran);
    assert_eq!(ran.code, 0, "{}\n{}", ran.stdout, ran.stderr);
    assert_eq!(r["status"], "succeeded");
    assert!(pg.count("sluice_loads") > 0, "the warehouse was loaded");
    p.add_raw(
        "support_tickets",
        "extra-2.csv",
        &tickets(&[
            "T-9002,2024-03-04T10:00:00Z,2024-03-04T11:00:00Z,open,high,b@example.com,Hi,Body,bob",
        ]),
    );
    let ran = sluice(&moto, &fake, &p, &["-vv", "--log-format", "json", "run"]);
    keep("a succeeding run with JSON logs", &ran);
    assert_eq!(ran.code, 0, "{}\n{}", ran.stdout, ran.stderr);

    // 4. The Redshift Data API's keys: a statement failing with a message that quotes the
    // workgroup and the role, then succeeding.
    std::fs::write(
        p.config(),
        format!(
            "{base}\n[warehouse]\nkind = \"redshift-data\"\n\
             workgroup_name = \"secret:sluice/redshift#workgroup\"\n\
             database = \"secret:sluice/redshift#database\"\n\
             secret_arn = \"secret:sluice/redshift#secret_arn\"\n\
             iam_role = \"secret:sluice/redshift#iam_role\"\n\
             load = \"INSERT INTO analytics.marker SELECT :run_id\"\n"
        ),
    )
    .unwrap();
    fake.script(
        "INSERT INTO analytics.marker",
        0,
        Outcome::Fail(format!(
            "permission denied in workgroup {} for {} on {}",
            redshift[0].1, redshift[3].1, redshift[1].1
        )),
    );
    p.add_raw(
        "support_tickets",
        "extra-3.csv",
        &tickets(&[
            "T-9003,2024-03-04T10:00:00Z,2024-03-04T11:00:00Z,open,high,c@example.com,Hi,Body,cy",
        ]),
    );
    let ran = sluice(&moto, &fake, &p, &["-vv", "run", "--json"]);
    keep("a run with Redshift failing", &ran);
    let r = report(&ran);
    assert_eq!(ran.code, 1, "{}", ran.stderr);
    assert!(
        r["errors"]
            .to_string()
            .contains("permission denied in workgroup [secret:sluice/redshift#workgroup]"),
        "{r:#}"
    );
    fake.script("INSERT INTO analytics.marker", 0, Outcome::Finish);
    p.add_raw(
        "support_tickets",
        "extra-4.csv",
        &tickets(&[
            "T-9004,2024-03-04T10:00:00Z,2024-03-04T11:00:00Z,open,high,d@example.com,Hi,Body,di",
        ]),
    );
    let ran = sluice(&moto, &fake, &p, &["-vv", "run", "--json"]);
    keep("a run with Redshift succeeding", &ran);
    assert_eq!(ran.code, 0, "{}\n{}", ran.stdout, ran.stderr);
    assert!(
        !fake.executed().is_empty(),
        "the Data API got the statements"
    );
    for args in [&["-vv", "status"][..], &["status", "--json"]] {
        let ran = sluice(&moto, &fake, &p, args);
        keep("status", &ran);
        assert_eq!(ran.code, 0, "{}", ran.stderr);
    }

    // Everything sluice wrote: outputs, the lake, the SNS messages, the webhook bodies.
    let mut leaks = Vec::new();
    for (place, text) in &seen {
        leaks.extend(needles.find(place, text));
    }
    assert!(seen.iter().any(|(f, _)| f.contains("/_sluice/runs/")));
    assert!(
        seen.iter()
            .any(|(f, _)| f.contains("/_sluice/loads/redshift.json"))
    );
    assert!(
        seen.iter()
            .any(|(f, _)| f.ends_with(".error.json after a failing run"))
    );
    let messages = moto.drain(&inbox);
    let subjects: Vec<&str> = messages
        .iter()
        .filter_map(|m| m["Subject"].as_str())
        .collect();
    assert!(
        subjects.contains(&"sluice redact-check: run FAILED")
            && subjects.contains(&"sluice redact-check: run succeeded"),
        "{subjects:?}"
    );
    for m in &messages {
        let written = json!([m["Subject"], m["Message"], m["MessageAttributes"]]).to_string();
        leaks.extend(needles.find("an SNS message", written.as_bytes()));
    }
    let bodies = hook.bodies();
    assert!(bodies.len() >= 4, "{} webhook bodies", bodies.len());
    for b in &bodies {
        let v: Value = serde_json::from_str(b).unwrap_or_else(|e| panic!("{e}: {b}"));
        assert!(v["status"].is_string(), "{b}");
        leaks.extend(needles.find("a webhook body", b.as_bytes()));
    }
    assert!(
        leaks.is_empty(),
        "{} leaks:\n{}",
        leaks.len(),
        leaks.join("\n")
    );
    // The failure notifications carry the failing files and the warehouse's error, masked.
    assert!(bodies.iter().any(|b| b.contains("broken-1.jsonl.gz")));
    assert!(bodies.iter().any(|b| {
        b.contains("permission denied in workgroup [secret:sluice/redshift#workgroup]")
    }));
}
