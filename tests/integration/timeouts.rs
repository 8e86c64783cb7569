//! Calls that hang: a loopback server that accepts connections and never answers, as the
//! PostgreSQL warehouse and as a webhook. The run gives up after the configured timeout with an
//! error naming the step and the endpoint, its commits stand, and the next run carries on;
//! `--max-runtime` stops a run at a safe point, with its report saved and no lock left behind.

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::postgres::{PASSWORD, Pg};
use crate::support::{Project, assert_example_tables, text, webhook_server};

/// A loopback server that accepts connections and never answers them: it holds each socket
/// until it is dropped, or until `life` has passed (it stops by itself).
struct Silent {
    port: u16,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Silent {
    fn start(life: Duration) -> Silent {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, halt) = (accepted.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            let mut held = Vec::new();
            while !halt.load(Ordering::SeqCst) && start.elapsed() < life {
                match listener.accept() {
                    Ok((socket, _)) => {
                        count.fetch_add(1, Ordering::SeqCst);
                        held.push(socket);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Silent {
            port,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Appends to the project's config.
fn append_config(p: &Project, extra: &str) {
    let text = std::fs::read_to_string(p.config()).unwrap();
    std::fs::write(p.config(), format!("{text}\n{extra}")).unwrap();
}

/// The binary with the test server's password in its environment.
fn sluice(p: &Project, args: &[&str]) -> std::process::Output {
    p.cmd(args)
        .env("SLUICE_TEST_PG_PASSWORD", PASSWORD)
        .output()
        .unwrap()
}

/// `sluice run --json`: exit code, report, the output for messages, and the time it took.
fn run(p: &Project, extra: &[&str]) -> (i32, Value, String, Duration) {
    let mut args = vec!["run", "--json"];
    args.extend_from_slice(extra);
    let start = Instant::now();
    let out = sluice(p, &args);
    let took = start.elapsed();
    let report = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), report, text(&out), took)
}

/// The warehouse section for PostgreSQL at `port` (loading the example's staging tables).
fn warehouse(port: u16) -> String {
    format!(
        "[warehouse]\nkind = \"postgres\"\nhost = \"127.0.0.1\"\nport = {port}\nuser = \"sluice\"\n\
         database = \"postgres\"\npassword = \"env:SLUICE_TEST_PG_PASSWORD\"\nload = \"copy\"\n\
         load_into = \"analytics.{{table}}_staging\"\n\
         call = [\"CALL analytics.sp_build_daily_ticket_stats(:run_date)\", \"CALL analytics.sp_build_daily_service_health(:run_date)\"]\n"
    )
}

/// Seconds between the report's end and now: the notifications' time, for a run just ended.
fn since_finished(report: &Value) -> f64 {
    let finished = chrono::DateTime::parse_from_rfc3339(report["finished_at"].as_str().unwrap())
        .unwrap()
        .with_timezone(&chrono::Utc);
    (chrono::Utc::now() - finished).num_milliseconds() as f64 / 1000.0
}

#[test]
fn a_silent_postgres_warehouse_times_out_at_connect_and_the_next_run_loads_it() {
    let silent = Silent::start(Duration::from_secs(300));
    let p = Project::with_fixtures();
    append_config(
        &p,
        &format!("{}\n[timeouts]\nconnect = \"2s\"\n", warehouse(silent.port)),
    );
    let (code, report, out, took) = run(&p, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        silent.accepted() >= 1,
        "sluice connected to the silent server"
    );
    let errors = report["errors"].to_string();
    let expected = format!(
        "warehouse load: connecting to postgres 127.0.0.1:{}/postgres timed out after 2s",
        silent.port
    );
    assert!(errors.contains(&expected), "{errors}");
    assert!(!errors.contains(PASSWORD), "{errors}");
    // The step waited for the timeout, not much longer (a generous bound).
    let waited = report["timings"]["warehouse load"].as_f64().unwrap();
    eprintln!("silent postgres: warehouse load {waited:.2}s, run {took:?}");
    assert!(
        (1.9..15.0).contains(&waited),
        "warehouse load took {waited}s"
    );
    assert!(took < Duration::from_secs(120), "the run took {took:?}");
    // The lake's commits stand and no lock is left behind.
    assert_example_tables(&p);
    assert!(
        p.files("_sluice/locks").is_empty(),
        "{:?}",
        p.files("_sluice/locks")
    );
    let saved = p.files("_sluice/runs");
    assert_eq!(saved.len(), 1, "the run report is saved: {saved:?}");

    // The fix: the warehouse's real address. The next run loads what the first committed.
    let pg = Pg::start();
    p.edit_config(
        &format!("port = {}", silent.port),
        &format!("port = {}", pg.port),
    );
    let deployed = sluice(&p, &["warehouse", "deploy"]);
    assert!(deployed.status.success(), "{}", text(&deployed));
    let (code, report, out, _) = run(&p, &[]);
    assert_eq!(code, 0, "{out}");
    let statuses: Vec<&str> = report["statements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["finished"; 4], "{report:#}");
    assert_eq!(
        pg.count("analytics.app_logs"),
        crate::support::APP_LOGS_ROWS as u64
    );
    assert_eq!(
        pg.count("analytics.support_tickets"),
        crate::support::TICKETS_ROWS as u64
    );
}

#[test]
fn a_silent_webhook_times_out_naming_its_endpoint_and_a_fixed_one_gets_the_next_report() {
    let silent = Silent::start(Duration::from_secs(300));
    let hook = format!("http://127.0.0.1:{}/hook?token=t0ps3cret", silent.port);
    let p = Project::empty();
    p.edit_config("max_attempts = 3", "max_attempts = 1");
    p.edit_config(
        "on_success = [\"log\"]\non_failure = [\"log\"]",
        &format!(
            "on_success = [\"webhook:{hook}\"]\non_failure = [\"webhook:{hook}\"]\n\
             timeout_secs = 2\nretries = 0"
        ),
    );
    // A good file and a broken one: the run fails, and its failure is to be notified.
    p.add_fixture("support_tickets", "2024-03-01.csv");
    p.add_raw("app_logs", "broken.jsonl.gz", b"\x1f\x8b\x08\x00garbage");
    let (code, report, out, took) = run(&p, &[]);
    let notifying = since_finished(&report);
    eprintln!("silent webhook: notification {notifying:.2}s, run {took:?}");
    assert_eq!(code, 1, "{out}");
    assert!(
        silent.accepted() >= 1,
        "sluice connected to the silent webhook"
    );
    let errors = report["errors"].to_string();
    let expected = format!(
        "notification to webhook 127.0.0.1:{} failed: no answer within 2s (after 1 attempt)",
        silent.port
    );
    assert!(errors.contains(&expected), "{errors}");
    assert!(
        !errors.contains("t0ps3cret"),
        "no URL in messages: {errors}"
    );
    assert!(
        (1.9..15.0).contains(&notifying),
        "the notification took {notifying}s"
    );
    assert!(took < Duration::from_secs(120), "the run took {took:?}");
    // The commit stands.
    let written = report["tables"]["support_tickets"]["rows_written"]
        .as_u64()
        .unwrap();
    assert!(written > 300, "{report:#}");
    assert_eq!(p.rows("processed/support_tickets") as u64, written);

    // The fix: a webhook that answers gets the next run's report.
    let (url, rx) = webhook_server(200, 1);
    p.edit_config(&hook, &url);
    p.add_fixture("app_logs", "2024-03-01.jsonl");
    let (code, report, out, _) = run(&p, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        report["errors"].as_array().unwrap().is_empty(),
        "{report:#}"
    );
    let body: Value =
        serde_json::from_str(&rx.recv_timeout(Duration::from_secs(30)).unwrap()).unwrap();
    assert_eq!(body["run_id"], report["run_id"]);
    assert_eq!(body["status"], "succeeded");
}

#[test]
fn max_runtime_stops_the_run_at_a_safe_point_and_leaves_no_lock_behind() {
    // A warehouse that never answers, with a connect timeout far beyond the run's limit.
    let silent = Silent::start(Duration::from_secs(300));
    let p = Project::with_fixtures();
    let section = warehouse(silent.port);
    append_config(&p, &format!("{section}\n[timeouts]\nconnect = \"10m\"\n"));
    let (code, report, out, took) = run(&p, &["--max-runtime", "6s"]);
    assert_eq!(code, 1, "{out}");
    assert!(took < Duration::from_secs(90), "the run took {took:?}");
    assert_eq!(report["status"], "failed", "{report:#}");
    let errors = report["errors"].to_string();
    eprintln!("max_runtime 6s: run {took:?}, {errors}");
    assert!(
        errors.contains("max_runtime 6s reached at step "),
        "{errors}"
    );
    // The report is saved, with the error.
    let saved = format!("_sluice/runs/{}.json", report["run_id"].as_str().unwrap());
    let text_saved = std::fs::read_to_string(p.lake().join(&saved)).unwrap();
    assert!(
        text_saved.contains("max_runtime 6s reached"),
        "{text_saved}"
    );
    // No lock and no claim is left behind.
    assert!(
        p.files("_sluice/locks").is_empty(),
        "{:?}",
        p.files("_sluice/locks")
    );
    assert!(
        p.files("_sluice/claims").is_empty(),
        "{:?}",
        p.files("_sluice/claims")
    );
    let waiting = format!(
        "warehouse load (connecting to postgres 127.0.0.1:{}/postgres)",
        silent.port
    );
    if errors.contains(&waiting) {
        // Stopped while waiting for the warehouse: every commit before it stands.
        assert!(silent.accepted() >= 1);
        assert_example_tables(&p);
    }

    // The next run, without the warehouse, does not wait for anything the first one held and
    // finishes the job.
    p.edit_config(&section, "");
    let (code, report, out, took) = run(&p, &[]);
    assert!(code == 0, "{out}");
    assert!(
        report["errors"].as_array().unwrap().is_empty(),
        "{report:#}"
    );
    assert!(took < Duration::from_secs(90), "the rerun took {took:?}");
    assert_example_tables(&p);
}

#[test]
fn a_postgres_statement_past_its_timeout_is_cancelled_and_the_next_run_runs_it_again() {
    let pg = Pg::start();
    let p = Project::with_fixtures();
    append_config(
        &p,
        &format!(
            "[warehouse]\nkind = \"postgres\"\nurl = \"{}\"\npassword = \"env:SLUICE_TEST_PG_PASSWORD\"\n\
             call = [\"SELECT pg_sleep(60)\"]\n\n[timeouts]\nstatement = \"2s\"\n",
            pg.url()
        ),
    );
    let (code, report, out, _) = run(&p, &[]);
    assert_eq!(code, 1, "{out}");
    let errors = report["errors"].to_string();
    assert!(errors.contains("warehouse load: statement "), "{errors}");
    let endpoint = format!(
        "call 1 on postgres 127.0.0.1:{}/postgres timed out after 2s",
        pg.port
    );
    assert!(errors.contains(&endpoint), "{errors}");
    let waited = report["timings"]["warehouse load"].as_f64().unwrap();
    eprintln!("statement timeout 2s: warehouse load {waited:.2}s");
    assert!(
        (1.9..15.0).contains(&waited),
        "warehouse load took {waited}s"
    );
    // Failed once, not retried now; nothing committed in the warehouse.
    let statements = report["statements"].as_array().unwrap();
    assert_eq!(statements.len(), 1, "{report:#}");
    assert_eq!(statements[0]["status"], "failed");
    assert_eq!(pg.count("sluice_loads"), 0);
    // The server was asked to cancel it: without that, the sleep would go on for a minute
    // (a server notices a closed connection only when the statement ends).
    let start = Instant::now();
    let sleeping = || {
        pg.query(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE query LIKE 'SELECT pg_sleep%' AND state = 'active' \
             AND pid <> pg_backend_pid()",
        )[0][0]
            .clone()
    };
    while sleeping().as_deref() != Some("0") {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the statement still runs on the server"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_example_tables(&p);
    assert!(p.files("_sluice/locks").is_empty());

    // The fix: the next run runs the step again, once.
    p.edit_config("SELECT pg_sleep(60)", "SELECT 1");
    let (code, report, out, _) = run(&p, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(report["statements"][0]["status"], "finished", "{report:#}");
    assert_eq!(pg.count("sluice_loads"), 1);
}
