//! Freshness and gaps: `expect_every`, `expect_at` in a `timezone`, `expect_partitions`, with
//! the clock fixed by `SLUICE_NOW` and the raw files' modification times set by the test.

use std::collections::BTreeSet;
use std::process::Output;
use std::time::SystemTime;

use chrono::{DateTime, Duration, NaiveDate, Utc};
use serde_json::Value;

use crate::support::{Project, text, tickets, webhook_server};

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// Writes a tickets file into `raw/support_tickets/` modified at `at`.
fn add_at(p: &Project, name: &str, rows: &[&str], at: DateTime<Utc>) {
    p.add_raw("support_tickets", name, &tickets(rows));
    let path = p.lake().join("raw/support_tickets").join(name);
    let file = std::fs::File::options().write(true).open(path).unwrap();
    file.set_modified(SystemTime::from(at)).unwrap();
}

fn row(i: usize, day: &str) -> String {
    format!("T{i:05},{day}T08:00:00,{day}T09:00:00,open,high,c{i}@example.com,s,b,agent1")
}

fn sluice_at(p: &Project, now: DateTime<Utc>, args: &[&str]) -> Output {
    p.cmd(args)
        .env("SLUICE_NOW", now.to_rfc3339())
        .output()
        .unwrap()
}

fn run_at(p: &Project, now: DateTime<Utc>) -> Value {
    let out = sluice_at(p, now, &["run", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn status_at(p: &Project, now: DateTime<Utc>) -> Value {
    let out = sluice_at(p, now, &["status", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn tickets_source(p: &Project, settings: &str) {
    p.edit_config(
        "schema = \"schemas/support_tickets.toml\"",
        &format!("schema = \"schemas/support_tickets.toml\"\n{settings}"),
    );
}

fn source<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["freshness"]
        .as_array()
        .unwrap_or_else(|| panic!("no freshness in {status}"))
        .iter()
        .find(|f| f["source"] == name)
        .unwrap_or_else(|| panic!("no {name} in {status}"))
}

fn time(v: &Value) -> DateTime<Utc> {
    t(v.as_str().unwrap_or_else(|| panic!("not a time: {v}")))
}

#[test]
fn status_shows_late_and_on_time_by_the_fixed_clock() {
    let p = Project::empty();
    tickets_source(&p, "expect_every = \"24h\"");
    let arrived = t("2024-03-04T08:00:00Z");
    add_at(&p, "a.csv", &[&row(1, "2024-03-04")], arrived);
    let due = arrived + Duration::hours(24);

    // A file waiting in raw/ is an arrival.
    let s = status_at(&p, due - Duration::hours(1));
    let f = source(&s, "support_tickets");
    assert_eq!(time(&f["last_arrival"]), arrived);
    assert_eq!(f["late"], false);
    assert_eq!(f["expect_every"], "24h");
    // Sources without an expectation are not listed.
    assert_eq!(s["freshness"].as_array().unwrap().len(), 1);

    // So is a committed (archived) one.
    run_at(&p, due - Duration::hours(1));
    assert!(p.files("raw").is_empty());
    let s = status_at(&p, due - Duration::minutes(1));
    assert_eq!(source(&s, "support_tickets")["late"], false);
    assert_eq!(
        time(&source(&s, "support_tickets")["last_arrival"]),
        arrived
    );

    let now = due + Duration::hours(2);
    let s = status_at(&p, now);
    let f = source(&s, "support_tickets");
    assert_eq!(f["late"], true);
    assert_eq!(time(&f["late_since"]), due);
    assert_eq!(time(&s["now"]), now);

    let out = sluice_at(&p, now, &["status"]);
    let human = String::from_utf8_lossy(&out.stdout);
    assert!(
        human.contains(&format!(
            "source support_tickets: last arrival {}, expected every 24h: LATE since {}",
            arrived.to_rfc3339(),
            due.to_rfc3339()
        )),
        "{human}"
    );
}

fn bodies(rx: &std::sync::mpsc::Receiver<String>) -> Vec<Value> {
    let mut out = Vec::new();
    while let Ok(b) = rx.try_recv() {
        out.push(serde_json::from_str(&b).unwrap());
    }
    out
}

#[test]
fn one_late_then_one_recovered_notification_over_several_runs() {
    let (url, rx) = webhook_server(200, 10);
    let p = Project::empty();
    tickets_source(&p, "expect_every = \"24h\"");
    p.edit_config(
        "on_failure = [\"log\"]",
        &format!("on_failure = [\"log\"]\non_late = [\"webhook:{url}\"]"),
    );
    let arrived = t("2024-03-04T08:00:00Z");
    add_at(&p, "a.csv", &[&row(1, "2024-03-04")], arrived);
    let due = arrived + Duration::hours(24);

    let r = run_at(&p, due - Duration::hours(1));
    assert!(r["freshness"].get("late").is_none(), "{r}");
    // Late: several runs, one notification.
    for h in [1, 2, 5] {
        let r = run_at(&p, due + Duration::hours(h));
        assert_eq!(
            r["freshness"]["late"],
            serde_json::json!(["support_tickets"])
        );
    }
    // Two runs at the same time: still one (the state is read and written under a lock).
    let both: Vec<_> = (0..2)
        .map(|_| {
            p.cmd(&["run", "--json"])
                .env("SLUICE_NOW", (due + Duration::hours(6)).to_rfc3339())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in both {
        assert!(c.wait_with_output().unwrap().status.success());
    }
    let sent = bodies(&rx);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0]["event"], "late");
    assert_eq!(sent[0]["source"], "support_tickets");
    assert_eq!(time(&sent[0]["late_since"]), due);
    assert_eq!(time(&sent[0]["last_arrival"]), arrived);
    let state: Value = serde_json::from_slice(
        &std::fs::read(p.lake().join("_sluice/freshness/state.json")).unwrap(),
    )
    .unwrap();
    assert!(state["late"]["support_tickets"].is_object(), "{state}");

    // Data arrives: one recovered.
    let again = due + Duration::hours(7);
    add_at(&p, "b.csv", &[&row(2, "2024-03-05")], again);
    let r = run_at(&p, again + Duration::minutes(5));
    assert_eq!(
        r["freshness"]["notified"],
        serde_json::json!(["recovered:support_tickets"])
    );
    run_at(&p, again + Duration::minutes(10));
    let sent = bodies(&rx);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0]["event"], "recovered");
    assert_eq!(time(&sent[0]["last_arrival"]), again);
    // Both files committed, read back.
    let mut ids: Vec<String> = p
        .strings("processed/support_tickets", "ticket_id")
        .into_iter()
        .flatten()
        .collect();
    ids.sort();
    assert_eq!(ids, ["T00001", "T00002"]);
}

/// Waits (generously) until the lake holds `n` more run reports than `before`.
fn wait_for_runs(p: &Project, before: usize, n: usize) {
    let start = std::time::Instant::now();
    while p.files("_sluice/runs").len() < before + n {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(90),
            "watch did not poll"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn watch_sends_one_late_and_one_recovered_across_its_polls() {
    let (url, rx) = webhook_server(200, 10);
    let p = Project::empty();
    tickets_source(&p, "expect_every = \"24h\"");
    p.edit_config(
        "on_failure = [\"log\"]",
        &format!("on_failure = [\"log\"]\non_late = [\"webhook:{url}\"]"),
    );
    let arrived = t("2024-03-04T08:00:00Z");
    add_at(&p, "a.csv", &[&row(1, "2024-03-04")], arrived);
    let now = arrived + Duration::hours(30);
    let mut child = p
        .cmd(&["watch", "--interval", "1"])
        .env("SLUICE_NOW", now.to_rfc3339())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let first = rx.recv_timeout(std::time::Duration::from_secs(90));
    // Several more polls while late.
    wait_for_runs(&p, p.files("_sluice/runs").len(), 3);
    add_at(
        &p,
        "b.csv",
        &[&row(2, "2024-03-05")],
        now - Duration::hours(1),
    );
    let second = rx.recv_timeout(std::time::Duration::from_secs(90));
    wait_for_runs(&p, p.files("_sluice/runs").len(), 3);
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let first: Value = serde_json::from_str(&first.unwrap()).unwrap();
    let second: Value = serde_json::from_str(&second.unwrap()).unwrap();
    assert_eq!(
        (&first["event"], &second["event"]),
        (&"late".into(), &"recovered".into())
    );
    assert_eq!(time(&first["late_since"]), arrived + Duration::hours(24));
    assert!(bodies(&rx).is_empty());
    assert_eq!(p.rows("processed/support_tickets"), 2);
}

#[test]
fn expect_at_is_judged_in_the_sources_timezone() {
    let (url, rx) = webhook_server(200, 10);
    let p = Project::empty();
    tickets_source(&p, "expect_at = \"06:00\"\ntimezone = \"Europe/Berlin\"");
    p.edit_config(
        "on_failure = [\"log\"]",
        &format!("on_failure = [\"log\", \"webhook:{url}\"]"),
    );
    // Berlin is UTC+2 in July (CEST): 06:00 there is 04:00 UTC.
    let six = |day: u32| t(&format!("2024-07-{day:02}T04:00:00Z"));
    // Arrived at 05:30 Berlin on the 3rd, before that day's 06:00: it counts for the 3rd.
    let arrived = six(3) - Duration::minutes(30);
    add_at(&p, "a.csv", &[&row(1, "2024-07-03")], arrived);

    // Any time up to 06:00 on the 4th: the arrival is after the 2nd's 06:00, on time.
    let s = status_at(&p, six(4) - Duration::minutes(1));
    let f = source(&s, "support_tickets");
    assert_eq!(f["late"], false, "{s}");
    assert_eq!(f["timezone"], "Europe/Berlin");
    // After 06:00 Berlin on the 4th nothing arrived since the 3rd's 06:00: late since then.
    let s = status_at(&p, six(4) + Duration::minutes(1));
    let f = source(&s, "support_tickets");
    assert_eq!(f["late"], true, "{s}");
    assert_eq!(time(&f["late_since"]), six(4));
    // In UTC, 06:00 is two hours later: still on time at 05:01 UTC.
    let utc = Project::empty();
    tickets_source(&utc, "expect_at = \"06:00\"");
    add_at(&utc, "a.csv", &[&row(1, "2024-07-03")], arrived);
    let s = status_at(&utc, six(4) + Duration::minutes(61));
    assert_eq!(source(&s, "support_tickets")["late"], false, "{s}");

    // The run notifies through on_failure (no on_late), once.
    run_at(&p, six(4) + Duration::minutes(1));
    run_at(&p, six(4) + Duration::minutes(30));
    let sent = bodies(&rx);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0]["event"], "late");
    assert_eq!(sent[0]["expect_at"], "06:00");
    assert_eq!(time(&sent[0]["late_since"]), six(4));
}

#[test]
fn missing_daily_partitions_in_status_and_the_run_report() {
    let p = Project::empty();
    p.edit_config(
        "unique_key = [\"ticket_id\"]",
        "unique_key = [\"ticket_id\"]\nexpect_partitions = \"daily\"",
    );
    let days = ["2024-03-01", "2024-03-02", "2024-03-05", "2024-03-07"];
    let rows: Vec<String> = days.iter().enumerate().map(|(i, d)| row(i, d)).collect();
    let refs: Vec<&str> = rows.iter().map(String::as_str).collect();
    p.add_raw("support_tickets", "a.csv", &tickets(&refs));

    // Expected: every date between the first and the last that has no row.
    let have: BTreeSet<NaiveDate> = days.iter().map(|d| d.parse().unwrap()).collect();
    let (first, last) = (*have.first().unwrap(), *have.last().unwrap());
    let expect: Vec<String> = first
        .iter_days()
        .take_while(|d| *d <= last)
        .filter(|d| !have.contains(d))
        .map(|d| d.to_string())
        .collect();
    assert_eq!(expect, ["2024-03-03", "2024-03-04", "2024-03-06"]);

    let now = Utc::now();
    let r = run_at(&p, now);
    assert_eq!(
        r["freshness"]["missing_partitions"]["support_tickets"],
        serde_json::json!(expect)
    );
    // The partitions the table has, read back from the lake.
    let dirs: BTreeSet<String> = p
        .files("processed/support_tickets")
        .iter()
        .filter_map(|f| {
            f.split('/')
                .nth(2)?
                .strip_prefix("event_date=")
                .map(String::from)
        })
        .collect();
    let days_set: BTreeSet<String> = days.iter().map(|d| d.to_string()).collect();
    assert_eq!(dirs, days_set);
    let saved: Value = serde_json::from_slice(
        &std::fs::read(p.lake().join(format!(
            "_sluice/runs/{}.json",
            r["run_id"].as_str().unwrap()
        )))
        .unwrap(),
    )
    .unwrap();
    assert_eq!(saved["freshness"], r["freshness"]);

    let s = status_at(&p, now);
    let g = &s["partitions"][0];
    assert_eq!(g["table"], "support_tickets");
    assert_eq!(g["column"], "event_date");
    assert_eq!(g["first"], "2024-03-01");
    assert_eq!(g["last"], "2024-03-07");
    assert_eq!(g["partitions"], 4);
    assert_eq!(g["missing"], serde_json::json!(expect));

    // A file filling a gap: one fewer.
    p.add_raw(
        "support_tickets",
        "b.csv",
        &tickets(&[&row(9, "2024-03-04")]),
    );
    let r = run_at(&p, now);
    assert_eq!(
        r["freshness"]["missing_partitions"]["support_tickets"],
        serde_json::json!(["2024-03-03", "2024-03-06"])
    );
    let out = sluice_at(&p, now, &["status"]);
    let human = String::from_utf8_lossy(&out.stdout);
    assert!(
        human.contains(
            "table support_tickets (event_date daily, 2024-03-01 to 2024-03-07): 2 missing"
        ),
        "{human}"
    );
}

/// A Delta table's gaps are judged by its active files: a partition whose only row moved away
/// keeps its (removed) file on disk but is missing.
#[cfg(feature = "delta")]
#[test]
fn missing_partitions_of_a_delta_table_follow_its_active_files() {
    let p = Project::empty();
    p.edit_config(
        "unique_key = [\"ticket_id\"]",
        "unique_key = [\"ticket_id\"]\nexpect_partitions = \"daily\"\nformat = \"delta\"",
    );
    p.add_raw(
        "support_tickets",
        "a.csv",
        &tickets(&[
            &row(0, "2024-03-01"),
            &row(1, "2024-03-02"),
            &row(2, "2024-03-04"),
        ]),
    );
    let now = Utc::now();
    let r = run_at(&p, now);
    assert_eq!(
        r["freshness"]["missing_partitions"]["support_tickets"],
        serde_json::json!(["2024-03-03"])
    );
    // Ticket 1 is re-created on 2024-03-03 (a later update): its row leaves 2024-03-02.
    p.add_raw(
        "support_tickets",
        "b.csv",
        &tickets(&[
            "T00001,2024-03-03T08:00:00,2024-03-05T09:00:00,open,high,c1@example.com,s,b,agent1",
        ]),
    );
    let r = run_at(&p, now);
    assert_eq!(
        r["freshness"]["missing_partitions"]["support_tickets"],
        serde_json::json!(["2024-03-02"]),
        "{r:#}"
    );
    assert!(
        p.files("processed/support_tickets/event_date=2024-03-02")
            .iter()
            .any(|f| f.ends_with(".parquet")),
        "the removed file stays on disk for time travel"
    );
    let g = &status_at(&p, now)["partitions"][0];
    assert_eq!(g["partitions"], 3);
    assert_eq!(g["missing"], serde_json::json!(["2024-03-02"]));
}

#[test]
fn bad_freshness_settings_are_config_errors_naming_the_source() {
    for (settings, says) in [
        ("expect_every = \"soon\"", "expect_every"),
        ("expect_every = \"0s\"", "expect_every"),
        ("expect_at = \"25:00\"", "expect_at"),
        (
            "expect_at = \"06:00\"\ntimezone = \"Mars/Olympus\"",
            "timezone",
        ),
        ("timezone = \"Europe/Berlin\"", "timezone"),
    ] {
        let p = Project::empty();
        tickets_source(&p, settings);
        let out = p.sluice(&["status"]);
        assert_eq!(out.status.code(), Some(2), "{settings}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("source \"support_tickets\"") && err.contains(says),
            "{settings}: {err}"
        );
    }
    let cases = [
        (
            "unique_key = [\"ticket_id\"]",
            "unique_key = [\"ticket_id\"]\nexpect_partitions = \"hourly\"",
            "hourly",
        ),
        (
            "partition_by = [\"event_date\"]\nunique_key = [\"ticket_id\"]",
            "unique_key = [\"ticket_id\"]\nexpect_partitions = \"daily\"",
            "partition_by",
        ),
    ];
    for (from, to, says) in cases {
        let p = Project::empty();
        p.edit_config(from, to);
        let out = p.sluice(&["status"]);
        assert_eq!(out.status.code(), Some(2), "{to}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("table \"support_tickets\"") && err.contains(says),
            "{to}: {err}"
        );
    }
}

fn s3_at(moto: &crate::aws::Moto, p: &Project, now: DateTime<Utc>, args: &[&str]) -> Value {
    let mut c = p.cmd(args);
    moto.env(&mut c);
    let out = c.env("SLUICE_NOW", now.to_rfc3339()).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn freshness_and_gaps_on_an_s3_lake_notify_sns_once() {
    let moto = crate::aws::Moto::start();
    let (topic, inbox) = moto.topic_with_queue("late");
    // S3 sets the objects' modification times: the clock is fixed relative to them.
    let before = Utc::now() - Duration::seconds(2);
    let p = crate::aws::s3_project(&moto, "fresh", "kind = \"lake\"");
    let days = ["2024-03-06"];
    let rows: Vec<String> = days
        .iter()
        .enumerate()
        .map(|(i, d)| row(900 + i, d))
        .collect();
    let refs: Vec<&str> = rows.iter().map(String::as_str).collect();
    moto.put(
        "fresh",
        "data/raw/support_tickets/extra.csv",
        tickets(&refs),
    );
    let after = Utc::now() + Duration::seconds(2);
    tickets_source(&p, "expect_every = \"1h\"");
    p.edit_config(
        "unique_key = [\"ticket_id\"]",
        "unique_key = [\"ticket_id\"]\nexpect_partitions = \"daily\"",
    );
    p.edit_config(
        "on_failure = [\"log\"]",
        &format!("on_failure = [\"log\"]\non_late = [\"sns:{topic}\"]"),
    );

    let r = s3_at(&moto, &p, after + Duration::minutes(30), &["run", "--json"]);
    assert!(r["freshness"].get("late").is_none(), "{r}");
    // The fixtures' tickets are of 2024-03-01..03, the extra file's of the 6th.
    let mut have: BTreeSet<NaiveDate> = p
        .strings("processed/support_tickets", "event_date")
        .into_iter()
        .flatten()
        .map(|d| d.parse().unwrap())
        .collect();
    assert!(
        have.is_empty(),
        "the lake is in S3, not in the project folder"
    );
    let (code, out, err) = crate::aws::sluice(
        &moto,
        &p,
        &[
            "query",
            "SELECT DISTINCT CAST(event_date AS VARCHAR) AS d FROM support_tickets",
            "--format",
            "csv",
        ],
    );
    assert_eq!(code, 0, "{err}");
    have.extend(out.lines().skip(1).filter(|d| !d.is_empty()).map(|d| {
        d.parse::<NaiveDate>()
            .unwrap_or_else(|e| panic!("{e}: {d:?} in {out}"))
    }));
    let (first, last) = (*have.first().unwrap(), *have.last().unwrap());
    let expect: Vec<String> = first
        .iter_days()
        .take_while(|d| *d <= last)
        .filter(|d| !have.contains(d))
        .map(|d| d.to_string())
        .collect();
    assert_eq!(expect, ["2024-03-04", "2024-03-05"]);
    assert_eq!(
        r["freshness"]["missing_partitions"]["support_tickets"],
        serde_json::json!(expect)
    );

    // Late: two runs, one message.
    for h in [2, 3] {
        let r = s3_at(&moto, &p, after + Duration::hours(h), &["run", "--json"]);
        assert_eq!(
            r["freshness"]["late"],
            serde_json::json!(["support_tickets"])
        );
    }
    let s = s3_at(&moto, &p, after + Duration::hours(3), &["status", "--json"]);
    let f = source(&s, "support_tickets");
    assert_eq!(f["late"], true);
    let last_arrival = time(&f["last_arrival"]);
    assert!(last_arrival >= before - Duration::seconds(1) && last_arrival <= after);
    assert_eq!(s["partitions"][0]["missing"], serde_json::json!(expect));
    let sent = moto.drain(&inbox);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(
        sent[0]["Subject"]
            .as_str()
            .unwrap()
            .ends_with(": source support_tickets late"),
        "{sent:?}"
    );
    assert_eq!(sent[0]["MessageAttributes"]["status"]["Value"], "late");

    // A new file: one recovered.
    moto.put(
        "fresh",
        "data/raw/support_tickets/new.csv",
        tickets(&[&row(950, "2024-03-04")]),
    );
    let now = Utc::now() + Duration::minutes(30);
    s3_at(&moto, &p, now, &["run", "--json"]);
    let r = s3_at(&moto, &p, now, &["run", "--json"]);
    assert_eq!(
        r["freshness"]["missing_partitions"]["support_tickets"],
        serde_json::json!(["2024-03-05"])
    );
    let sent = moto.drain(&inbox);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(
        sent[0]["Subject"]
            .as_str()
            .unwrap()
            .ends_with(": source support_tickets recovered"),
        "{sent:?}"
    );
}
