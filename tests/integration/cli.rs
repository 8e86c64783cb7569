//! The other commands: status, query formats, demo, and notifications.

use crate::support::*;

#[test]
fn status_shows_pending_then_processed_files_and_runs() {
    let p = Project::with_fixtures();
    let out = p.sluice(&["status", "--json"]);
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["pending"]["app_logs"].as_array().unwrap().len(), 3);
    assert_eq!(s["processed_files"], 0);
    assert_eq!(p.run().0, 0);
    let out = p.sluice(&["status", "--json"]);
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["pending"]["app_logs"].as_array().unwrap().len(), 0);
    assert_eq!(s["processed_files"], 6);
    assert_eq!(s["last_runs"][0]["status"], "succeeded");
    assert_eq!(s["last_runs"][0]["rows_written"], 2063 + 1033);
}

#[test]
fn query_prints_tables_csv_and_json_and_rejects_bad_sql() {
    let p = Project::with_fixtures();
    assert_eq!(p.run().0, 0);
    let sql =
        "SELECT event_date, count(*) AS n FROM support_tickets GROUP BY event_date ORDER BY 1";
    let out = p.sluice(&["query", sql]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("| 2024-03-01 | 342 |"), "{table}");
    let out = p.sluice(&["query", sql, "--format", "csv"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "event_date,n\n2024-03-01,342\n2024-03-02,345\n2024-03-03,346"
    );
    let out = p.sluice(&["query", sql, "--format", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[2]["n"], 346);
    let out = p.sluice(&["query", "SELECT nope FROM support_tickets"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
}

#[test]
fn the_demo_runs_the_example_pipeline_in_a_fresh_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["demo", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("files: 6 processed, 0 duplicate, 0 failed"),
        "{stdout}"
    );
    assert!(
        stdout.contains("app_logs: 2063 written, 44 rejected, 58 duplicate"),
        "{stdout}"
    );
    assert!(stdout.contains("daily_service_health"), "{stdout}");
    assert!(
        dir.join("lake/warehouse/daily_ticket_stats/event_date=2024-03-01/data.parquet")
            .exists()
    );
    // A second demo into the same folder refuses to clobber it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["demo", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn webhooks_receive_the_report_on_success_and_on_failure() {
    let (url, rx) = webhook_server(200, 2);
    let p = Project::empty();
    p.edit_config(
        "on_success = [\"log\"]\non_failure = [\"log\"]",
        &format!("on_success = [\"log\", \"webhook:{url}\"]\non_failure = [\"webhook:{url}\"]"),
    );
    p.add_fixture("app_logs", "2024-03-01.jsonl");
    let (code, report) = p.run();
    assert_eq!(code, 0);
    let body: serde_json::Value = serde_json::from_str(&rx.recv().unwrap()).unwrap();
    assert_eq!(body["run_id"], report["run_id"]);
    assert_eq!(body["status"], "succeeded");

    p.add_raw("app_logs", "bad.jsonl.gz", b"\x1f\x8b\x08\x00garbage");
    let (code, _) = p.run();
    assert_eq!(code, 1);
    let body: serde_json::Value = serde_json::from_str(&rx.recv().unwrap()).unwrap();
    assert_eq!(body["status"], "failed");
    assert!(
        body["files"][0]["error"]
            .as_str()
            .unwrap()
            .contains("bad.jsonl.gz")
    );
}

#[test]
fn an_unreachable_webhook_never_undoes_the_commit() {
    let (url, _rx) = webhook_server(500, 2);
    let p = Project::empty();
    p.edit_config(
        "on_success = [\"log\"]\non_failure = [\"log\"]",
        &format!("on_success = [\"webhook:{url}\"]\nretries = 1\ntimeout_secs = 2"),
    );
    p.add_fixture("support_tickets", "2024-03-01.csv");
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    assert!(
        report["errors"][0].as_str().unwrap().contains("HTTP 500"),
        "{report:#}"
    );
    let written = report["tables"]["support_tickets"]["rows_written"]
        .as_u64()
        .unwrap();
    assert!(written > 300);
    assert_eq!(p.rows("processed/support_tickets") as u64, written);
    let (code, report) = p.run();
    assert_eq!(
        (code, report["status"].as_str()),
        (0, Some("nothing_to_do"))
    );
}

#[test]
fn watch_polls_the_raw_prefixes_until_sigterm() {
    let p = Project::empty();
    let mut child = p
        .cmd(&["watch", "--interval", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Files that land while it watches are picked up on a later poll.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    p.add_fixture("support_tickets", "2024-03-01.csv");
    let start = std::time::Instant::now();
    while !p.files("raw/support_tickets").is_empty() {
        if start.elapsed() > std::time::Duration::from_secs(60) {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("not picked up: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    stop(child);
    assert!(p.rows("processed/support_tickets") > 0);
}

/// Waits until `raw/<source>/` is empty, or panics with the child's output after a minute.
fn wait_until_taken(p: &Project, source: &str, child: &mut std::process::Child) {
    let start = std::time::Instant::now();
    while !p.files(&format!("raw/{source}")).is_empty() {
        if start.elapsed() > std::time::Duration::from_secs(60) {
            let _ = child.kill();
            panic!("{source}: not picked up");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn stop(child: std::process::Child) {
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn runs(p: &Project) -> usize {
    p.files("_sluice/runs").len()
}

#[test]
fn watch_on_a_schedule_makes_up_a_missed_tick_once_then_runs_at_each_tick() {
    // No run on record: the first start makes up for it at once, even with a tick a year off.
    let p = Project::empty();
    p.add_fixture("support_tickets", "2024-03-01.csv");
    let yearly = "0 0 0 1 1 *";
    let spawn = |args: &[&str]| {
        p.cmd(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut child = spawn(&["watch", "--schedule", yearly]);
    wait_until_taken(&p, "support_tickets", &mut child);
    std::thread::sleep(std::time::Duration::from_millis(500));
    stop(child);
    assert_eq!(runs(&p), 1);
    // Started again right after: no tick passed since that run, so nothing runs until one.
    p.add_fixture("support_tickets", "2024-03-02.csv");
    let child = spawn(&["watch", "--schedule", yearly]);
    std::thread::sleep(std::time::Duration::from_secs(3));
    stop(child);
    assert_eq!(runs(&p), 1, "no run without a tick");
    assert_eq!(p.files("raw/support_tickets").len(), 1);
    // Every second: a tick passed since the last run (made up at start), then one run a tick.
    let mut child = spawn(&["watch", "--every", "1s"]);
    wait_until_taken(&p, "support_tickets", &mut child);
    p.add_fixture("support_tickets", "2024-03-03.csv.gz");
    wait_until_taken(&p, "support_tickets", &mut child);
    stop(child);
    assert_eq!(p.files("archive").len(), 3);
    // Bad schedules are errors naming the flag.
    for (flag, value) in [("--schedule", "every day"), ("--every", "0s")] {
        let out = p.sluice(&["watch", flag, value]);
        assert!(!out.status.success());
        assert!(text(&out).contains(flag), "{}", text(&out));
    }
}

#[test]
fn json_logs_carry_one_embedded_metric_record_per_table_per_run() {
    let p = Project::with_fixtures();
    let out = p.sluice(&["--log-format", "json", "run", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let records: Vec<serde_json::Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("_aws").is_some())
        .collect();
    assert_eq!(records.len(), 2, "{stderr}");
    for r in &records {
        let table = r["table"].as_str().unwrap();
        let source = table; // the example's tables are named after their sources
        let files: Vec<&serde_json::Value> = report["files"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["source"] == source)
            .collect();
        for k in [
            "rows_read",
            "rows_written",
            "rows_rejected",
            "rows_duplicate",
        ] {
            let want: u64 = files.iter().map(|f| f[k].as_u64().unwrap()).sum();
            assert_eq!(r[k].as_u64(), Some(want), "{table} {k}: {r}");
        }
        let bytes: u64 = std::fs::read_dir(repo().join("fixtures/raw").join(source))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert_eq!(r["bytes"].as_u64(), Some(bytes), "{r}");
        assert_eq!(r["status"], "succeeded");
        assert_eq!(r["failed"], 0);
        assert!(r["duration"].as_f64().unwrap() > 0.0);
        let m = &r["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(m["Namespace"], "sluice");
        assert_eq!(m["Dimensions"], serde_json::json!([["pipeline", "table"]]));
        let names: Vec<&str> = m["Metrics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["Name"].as_str().unwrap())
            .collect();
        for n in &names {
            assert!(r[*n].is_number(), "every metric has its value: {n}");
        }
        assert!(r["_aws"]["Timestamp"].as_i64().unwrap() > 0);
    }
    // Text logs carry none; a run with nothing to do has no table to report.
    p.add_fixture("support_tickets", "2024-03-01.csv");
    let out = p.sluice(&["run"]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("_aws"));
    let out = p.sluice(&["--log-format", "json", "run"]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("_aws"));
}

#[test]
fn completions_and_the_man_page_come_from_the_command_definitions() {
    let p = Project::empty();
    let out = p.sluice(&["completions", "bash"]);
    assert!(out.status.success(), "{}", text(&out));
    let script = p.path().join("sluice.bash");
    std::fs::write(&script, &out.stdout).unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    for sub in ["reprocess", "watch", "compact", "--schedule", "--dry-run"] {
        assert!(body.contains(sub), "bash completion lacks {sub}");
    }
    // bash reads it (syntax), and completes `sluice repr` to `reprocess`.
    let check = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {}; COMP_WORDS=(sluice repr); COMP_CWORD=1; _sluice sluice repr sluice; echo \"${{COMPREPLY[@]}}\"",
            script.display()
        ))
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check));
    assert!(
        String::from_utf8_lossy(&check.stdout)
            .split_whitespace()
            .any(|w| w == "reprocess"),
        "{}",
        text(&check)
    );
    for shell in ["zsh", "fish", "powershell", "elvish"] {
        let out = p.sluice(&["completions", shell]);
        assert!(out.status.success() && !out.stdout.is_empty(), "{shell}");
    }
    let out = p.sluice(&["man"]);
    assert!(out.status.success(), "{}", text(&out));
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(
        page.starts_with(".ie") || page.contains(".TH sluice"),
        "{page}"
    );
    assert!(page.contains("reprocess"), "{page}");
    // groff renders it without warnings.
    let man = p.path().join("sluice.1");
    std::fs::write(&man, &out.stdout).unwrap();
    if let Ok(g) = std::process::Command::new("groff")
        .args(["-man", "-Tutf8", "-ww", "-z"])
        .arg(&man)
        .output()
    {
        assert!(g.status.success(), "{}", text(&g));
        assert!(
            g.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&g.stderr)
        );
    }
}

/// Chromium (Debian's package, installed by `.ci/run`): `SLUICE_CHROMIUM`, else
/// `/usr/bin/chromium`.
fn chromium() -> std::path::PathBuf {
    let p = std::env::var_os("SLUICE_CHROMIUM")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/usr/bin/chromium".into());
    assert!(
        p.exists(),
        "{} not found: `bash .ci/run` installs Debian's chromium (or set SLUICE_CHROMIUM)",
        p.display()
    );
    p
}

#[test]
fn the_html_report_shows_the_runs_numbers_in_a_real_browser() {
    let p = Project::with_fixtures();
    // A second run with a file that fails (a truncated gzip) and one that is a duplicate.
    assert_eq!(p.run().0, 0);
    let mut gz =
        std::fs::read(repo().join("fixtures/raw/support_tickets/2024-03-03.csv.gz")).unwrap();
    gz.truncate(gz.len() / 2);
    p.add_raw("support_tickets", "broken.csv.gz", &gz);
    p.add_fixture("app_logs", "2024-03-01.jsonl");
    let (_, second) = p.run();
    let out_dir = tempfile::tempdir().unwrap();
    let page = out_dir.path().join("report.html");
    let out = p.sluice(&["report", "--html", page.to_str().unwrap(), "--runs", "5"]);
    assert!(out.status.success(), "{}", text(&out));
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no network at view time"
    );
    assert!(html.contains("broken.csv.gz"), "the failed file is listed");
    assert!(html.contains("rejected rows by reason"));

    // The browser: no console error, and the totals the page's script adds equal the runs'.
    let profile = tempfile::tempdir().unwrap();
    let run = std::process::Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=2000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("file://{}", page.display()))
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", text(&run));
    let dom = String::from_utf8_lossy(&run.stdout);
    let log = String::from_utf8_lossy(&run.stderr);
    let console: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("CONSOLE") || l.contains("Uncaught"))
        .collect();
    assert!(console.is_empty(), "console messages: {console:?}");
    let first: serde_json::Value = serde_json::from_slice(
        &std::fs::read(p.lake().join(format!(
            "_sluice/runs/{}.json",
            p.files("_sluice/runs")[0]
                .rsplit('/')
                .next()
                .unwrap()
                .trim_end_matches(".json")
        )))
        .unwrap(),
    )
    .unwrap();
    for source in ["app_logs", "support_tickets"] {
        let section = dom
            .split("data-table=\"")
            .find(|s| s.starts_with(&format!("{source}\"")))
            .unwrap_or_else(|| panic!("no section for {source}: {dom}"));
        for col in ["read", "written", "rejected", "duplicate"] {
            let key = format!("rows_{col}");
            let want: u64 = [&first, &second]
                .iter()
                .flat_map(|r| r["files"].as_array().unwrap().iter())
                .filter(|f| f["source"] == source)
                .map(|f| f[key.as_str()].as_u64().unwrap())
                .sum();
            let cell = format!("<th class=\"total-{col}\">{want}</th>");
            assert!(section.contains(&cell), "{source}: no {cell} in {section}");
        }
    }
}

/// Every file of the lake with its size (sluice's own state included).
fn everything(p: &Project) -> std::collections::BTreeMap<String, u64> {
    p.files("")
        .into_iter()
        .map(|f| {
            let size = std::fs::metadata(p.lake().join(&f)).unwrap().len();
            (f, size)
        })
        .collect()
}

fn plan(p: &Project) -> serde_json::Value {
    let out = p.sluice(&["plan", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn planned<'a>(plan: &'a serde_json::Value, table: &str) -> &'a serde_json::Value {
    plan["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == table)
        .unwrap()
}

#[test]
fn plan_says_what_the_next_run_does_and_writes_nothing() {
    let p = Project::with_fixtures();
    let before = everything(&p);
    let first = plan(&p);
    assert_eq!(everything(&p), before, "a plan writes nothing");
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    let check = |plan: &serde_json::Value, report: &serde_json::Value| {
        for table in ["app_logs", "support_tickets"] {
            let t = planned(plan, table);
            let r = &report["tables"][table];
            if t["files"].as_array().unwrap().is_empty() {
                assert!(
                    r.is_null(),
                    "{table}: the plan has no file, the run changed it: {r}"
                );
                continue;
            }
            for k in [
                "rows_written",
                "rows_rejected",
                "rows_duplicate",
                "rows_replaced",
            ] {
                assert_eq!(t[k], r[k], "{table} {k}: plan {t:#}\nrun {r:#}");
            }
            assert_eq!(t["partitions"], r["partitions"], "{table}");
            assert_eq!(
                t["files_rewritten"].as_array().unwrap().len() as u64,
                r["files_rewritten"].as_u64().unwrap_or(0),
                "{table}"
            );
            for f in t["files"].as_array().unwrap() {
                let done = report["files"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|x| x["key"] == f["key"])
                    .unwrap_or_else(|| panic!("{f} not in the run"));
                assert_eq!(f["archive_to"], done["moved_to"], "{f}");
                let action = if done["status"] == "duplicate" {
                    "duplicate"
                } else {
                    "process"
                };
                assert_eq!(f["action"], action, "{f}");
            }
        }
    };
    check(&first, &report);
    assert_eq!(first["notifications"], serde_json::json!(["log"]));
    assert!(
        first["warehouse"]
            .to_string()
            .contains("daily_ticket_stats"),
        "{first:#}"
    );

    // Newer versions of some tickets and a copy of a committed file under another name.
    p.add_raw("support_tickets", "base.csv", &batch(0, 10, 2, 9, "open"));
    assert_eq!(p.run().0, 0);
    p.add_raw(
        "support_tickets",
        "updates.csv",
        &batch(0, 5, 2, 23, "closed"),
    );
    let copy = std::fs::read(repo().join("fixtures/raw/support_tickets/2024-03-01.csv")).unwrap();
    p.add_raw("support_tickets", "again.csv", &copy);
    let before = everything(&p);
    let second = plan(&p);
    assert_eq!(everything(&p), before, "a plan writes nothing");
    let t = planned(&second, "support_tickets");
    let dup = t["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["key"] == "raw/support_tickets/again.csv")
        .unwrap();
    assert_eq!(dup["action"], "duplicate");
    assert_eq!(dup["duplicate_of"], "raw/support_tickets/2024-03-01.csv");
    assert_eq!(t["rows_replaced"], 5, "{t:#}");
    assert!(
        !t["files_rewritten"].as_array().unwrap().is_empty(),
        "{t:#}"
    );
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    check(&second, &report);
    // Nothing pending: nothing to do.
    let out = p.sluice(&["plan"]);
    assert!(text(&out).contains("nothing to do"), "{}", text(&out));
}

/// Shell-quotes one argument.
fn quoted(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[test]
fn a_run_on_a_terminal_shows_files_and_bytes_and_nothing_when_piped() {
    let p = Project::with_fixtures();
    let pause = p.path().join("pause");
    std::fs::write(&pause, "").unwrap();
    // A terminal: `script` (util-linux) runs the binary on a pseudo-terminal and copies what it
    // draws to its stdout. The run is held after its first batch is read, so the bar is drawn.
    let cmd = format!(
        "{} --config {} run",
        quoted(&binary().to_string_lossy()),
        quoted(&p.config().to_string_lossy())
    );
    let child = std::process::Command::new("script")
        .args(["-qefc", &cmd, "/dev/null"])
        .env("SLUICE_PAUSE_AT", "read")
        .env("SLUICE_PAUSE_FILE", &pause)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_held(&p, "the run, after reading its files");
    // A few ticks of the display.
    std::thread::sleep(std::time::Duration::from_millis(600));
    std::fs::remove_file(&pause).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let drawn = String::from_utf8_lossy(&out.stdout);
    let total: u64 = std::fs::read_dir(repo().join("fixtures/raw/app_logs"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    let bytes = indicatif::BinaryBytes(total).to_string();
    assert!(drawn.contains("app_logs: reading 3/3 files"), "{drawn}");
    assert!(
        drawn.contains(&format!("{bytes}/{bytes}")),
        "{bytes}: {drawn}"
    );
    // The summary is still printed, and the display is cleared before it.
    assert!(drawn.contains("app_logs"), "{drawn}");

    // Piped: no display at all, only the summary.
    let q = Project::with_fixtures();
    let out = q.sluice(&["run"]);
    assert!(out.status.success());
    let all = text(&out);
    assert!(!all.contains("reading") && !all.contains("iB/"), "{all}");
}
