//! The embedded warehouse's aggregates: incremental ones (grouped by their input's partition
//! column) recomputed only for the partitions new commits touched, always equal to a full
//! rebuild; any other rebuilt whole.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::support::*;

/// The aggregate's output columns, floats rounded (a sum's last bits depend on the order rows
/// are added in, which differs between a full and a per-partition run).
fn columns(agg: &str) -> &'static str {
    match agg {
        "daily_ticket_stats" => {
            "event_date, status, tickets, round(avg_hours_open, 6) AS hours, customers"
        }
        "daily_service_health" => {
            "event_date, service_name, requests, errors, round(error_rate, 9) AS rate, \
             round(avg_latency_ms, 6) AS latency, max_latency_ms, users"
        }
        "ticket_status" => "status, tickets",
        _ => "*",
    }
}

/// `sluice query --format csv`.
fn query(p: &Project, sql: &str) -> String {
    let out = p.sluice(&["query", sql, "--format", "csv"]);
    assert!(out.status.success(), "{sql}\n{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The warehouse table, in order.
fn stored(p: &Project, agg: &str) -> String {
    query(
        p,
        &format!("SELECT {} FROM {agg} ORDER BY 1, 2", columns(agg)),
    )
}

/// A full rebuild: the aggregate's own query over the processed tables now.
fn full_rebuild(p: &Project, agg: &str, file: &str) -> String {
    let sql = std::fs::read_to_string(p.path().join(file)).unwrap();
    query(
        p,
        &format!(
            "SELECT {} FROM (\n{sql}\n) AS full_rebuild ORDER BY 1, 2",
            columns(agg)
        ),
    )
}

fn assert_equals_full_rebuild(p: &Project, agg: &str, file: &str, step: &str) {
    let (have, want) = (stored(p, agg), full_rebuild(p, agg, file));
    assert!(want.lines().count() > 1, "{step}: {agg} is empty");
    assert_eq!(
        have, want,
        "{step}: {agg} differs from a full rebuild (left: stored)"
    );
}

fn ticket_stats(p: &Project, step: &str) {
    assert_equals_full_rebuild(
        p,
        "daily_ticket_stats",
        "queries/aggregates/daily_ticket_stats.sql",
        step,
    );
}

fn service_health(p: &Project, step: &str) {
    assert_equals_full_rebuild(
        p,
        "daily_service_health",
        "queries/aggregates/daily_service_health.sql",
        step,
    );
}

/// The report's entry of an aggregate.
fn built<'a>(report: &'a Value, agg: &str) -> &'a Value {
    report["warehouse"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == agg)
        .unwrap_or_else(|| panic!("{agg} was not built: {report:#}"))
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// The partition values a run's commit touched in a table (`event_date=2024-03-01` ->
/// `2024-03-01`).
fn touched(report: &Value, table: &str) -> BTreeSet<String> {
    strings(&report["tables"][table]["partitions"])
        .into_iter()
        .map(|d| d.strip_prefix("event_date=").unwrap().to_string())
        .collect()
}

/// Runs and checks that each aggregate was recomputed incrementally for exactly the
/// partitions its input's commit touched.
fn run_incremental(p: &Project, step: &str) -> Value {
    let (code, report) = p.run();
    assert_eq!(code, 0, "{step}: {report:#}");
    for (agg, table) in [
        ("daily_ticket_stats", "support_tickets"),
        ("daily_service_health", "app_logs"),
    ] {
        if report["tables"].get(table).is_none() {
            continue;
        }
        let a = built(&report, agg);
        assert_eq!(a["mode"], "incremental", "{step}: {a}");
        assert_eq!(a["partition_column"], "event_date", "{step}: {a}");
        assert!(a["rebuilt_whole"].is_null(), "{step}: {a}");
        assert_eq!(
            strings(&a["partitions"]),
            touched(&report, table),
            "{step}: {agg}"
        );
    }
    report
}

/// The days of the processed tickets (their partition folders holding files).
fn days(p: &Project) -> Vec<String> {
    let mut out: Vec<String> = p
        .files("processed/support_tickets")
        .iter()
        .map(|f| {
            let rest = f
                .strip_prefix("processed/support_tickets/event_date=")
                .unwrap();
            rest.split_once('/').unwrap().0.to_string()
        })
        .collect();
    out.dedup();
    out
}

/// Every file of an incremental aggregate is its partition's `data.parquet`, without the
/// partition column inside.
fn assert_partitioned(p: &Project, agg: &str) -> Vec<String> {
    let files = p.files(&format!("warehouse/{agg}"));
    let mut days = Vec::new();
    for f in &files {
        let rest = f
            .strip_prefix(&format!("warehouse/{agg}/event_date="))
            .unwrap_or_else(|| panic!("{f}"));
        let (day, file) = rest.split_once('/').unwrap();
        assert_eq!(file, "data.parquet", "{f}");
        days.push(day.to_string());
    }
    for b in p.read(&format!("warehouse/{agg}")) {
        assert!(b.schema().field_with_name("event_date").is_err());
    }
    days
}

const TICKET_UPDATES: [&str; 4] = [
    // Same day (2024-03-01), a newer version: closed now.
    "TCK-00000000,2024-03-01 00:00:09,2024-03-10 08:00:00,closed,low,carol.85217@gmail.test,Feature request: dark mode,b,agent080",
    // Created on another day now: leaves 2024-03-01 for 2024-03-04.
    "TCK-00000018,2024-03-04 01:14:10,2024-03-10 09:00:00,resolved,urgent,dave.49177@example.com,Billing question,b,agent003",
    // A ticket of 2024-03-02, newer.
    "TCK-00000357,2024-03-02 00:28:55,2024-03-10 10:00:00,closed,medium,frank.33911@example.com,s,b,agent001",
    // Older than the version held: loses, changes nothing.
    "TCK-00000358,2024-03-02 00:33:04,2024-03-02 00:40:00,pending,high,peggy@example.com,s,b,",
];

const LOG_UPDATES: &str = concat!(
    // A newer version of a request of 2024-03-01, now on 2024-03-05.
    r#"{"ts":"2024-03-05T10:00:00Z","level":"error","service":"shipping","host":"h","request_id":"c79d5a8b-2c98-433a-ad5a-f71aa5c30852","latency_ms":5000,"message":"m","user_id":"u_1"}"#,
    "\n",
    // A newer version of another one, same day.
    r#"{"ts":"2024-03-01 23:59:00","level":"fatal","service":"profile","host":"h","request_id":"6cf867cb-4048-4b2f-a6c0-852d36fe222e","latency_ms":7,"message":"m","user_id":"u_2"}"#,
    "\n",
);

#[test]
fn incremental_aggregates_equal_a_full_rebuild_after_every_run() {
    let p = Project::empty();
    let out = p.sluice(&["validate"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("daily_ticket_stats.sql): incremental by event_date"),
        "{said}"
    );
    assert!(
        said.contains("daily_service_health.sql): incremental by event_date"),
        "{said}"
    );

    // First build: whole, in the partitioned layout.
    p.add_fixture("support_tickets", "2024-03-01.csv");
    p.add_fixture("app_logs", "2024-03-01.jsonl");
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    for (agg, table) in [
        ("daily_ticket_stats", "support_tickets"),
        ("daily_service_health", "app_logs"),
    ] {
        let a = built(&report, agg);
        assert_eq!(a["mode"], "incremental");
        assert_eq!(a["rebuilt_whole"], "its first build");
        assert_eq!(strings(&a["partitions"]), touched(&report, table));
    }
    let out = p.sluice(&["run"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("nothing"),
        "{}",
        text(&out)
    );
    ticket_stats(&p, "first run");
    service_health(&p, "first run");
    assert_eq!(assert_partitioned(&p, "daily_ticket_stats"), days(&p));

    // New days.
    p.add_fixture("support_tickets", "2024-03-02.csv");
    p.add_fixture("app_logs", "2024-03-02.jsonl.gz");
    let report = run_incremental(&p, "second run");
    assert!(touched(&report, "support_tickets").contains("2024-03-02"));
    let before = stored(&p, "daily_ticket_stats");
    let first_day: Vec<&str> = before
        .lines()
        .filter(|l| l.starts_with("2024-03-01"))
        .collect();
    ticket_stats(&p, "second run");
    service_health(&p, "second run");

    // Newer versions of keys of earlier partitions, one moving to another day.
    p.add_raw("support_tickets", "updates.csv", &tickets(&TICKET_UPDATES));
    p.add_raw("app_logs", "updates.jsonl", LOG_UPDATES.as_bytes());
    let report = run_incremental(&p, "updates");
    assert_eq!(report["tables"]["support_tickets"]["rows_replaced"], 3);
    assert_eq!(
        touched(&report, "support_tickets"),
        BTreeSet::from([
            "2024-03-01".into(),
            "2024-03-02".into(),
            "2024-03-04".into()
        ])
    );
    assert_eq!(
        touched(&report, "app_logs"),
        BTreeSet::from(["2024-03-01".into(), "2024-03-05".into()])
    );
    ticket_stats(&p, "updates");
    service_health(&p, "updates");
    let after = stored(&p, "daily_ticket_stats");
    assert_ne!(
        first_day,
        after
            .lines()
            .filter(|l| l.starts_with("2024-03-01"))
            .collect::<Vec<_>>(),
        "2024-03-01 was recomputed"
    );
    assert!(after.contains("2024-03-04,resolved,1,"), "{after}");
    assert_eq!(assert_partitioned(&p, "daily_ticket_stats"), days(&p));
    assert!(days(&p).contains(&"2024-03-04".to_string()));

    // The rest of the fixtures.
    p.add_fixture("support_tickets", "2024-03-03.csv.gz");
    p.add_fixture("app_logs", "2024-03-03.jsonl.zst");
    run_incremental(&p, "third day");
    ticket_stats(&p, "third day");
    service_health(&p, "third day");

    // The only ticket of 2024-03-04 moves back: that partition is left without rows.
    p.add_raw(
        "support_tickets",
        "back.csv",
        &tickets(&["TCK-00000018,2024-03-01 01:14:10,2024-03-11 09:00:00,closed,urgent,dave.49177@example.com,Billing question,b,agent003"]),
    );
    let report = run_incremental(&p, "partition emptied");
    assert_eq!(
        strings(&built(&report, "daily_ticket_stats")["partitions"]),
        BTreeSet::from(["2024-03-01".into(), "2024-03-04".into()])
    );
    ticket_stats(&p, "partition emptied");
    assert_eq!(assert_partitioned(&p, "daily_ticket_stats"), days(&p));
    assert!(!days(&p).contains(&"2024-03-04".to_string()));

    // A commit of rejected rows only: nothing to recompute, the state moves on.
    p.add_raw(
        "support_tickets",
        "bad.csv",
        &tickets(&[",2024-03-01 00:00:00,x,open,low,a@b.c,s,b,"]),
    );
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    let a = built(&report, "daily_ticket_stats");
    assert_eq!(
        (
            a["mode"].as_str(),
            a["partitions"].as_array().unwrap().len()
        ),
        (Some("incremental"), 0)
    );
    let out = p.sluice(&["run"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("nothing"),
        "{}",
        text(&out)
    );

    // Its files deleted, its state kept: built whole again.
    let have = stored(&p, "daily_ticket_stats");
    std::fs::remove_dir_all(p.lake().join("warehouse/daily_ticket_stats")).unwrap();
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(
        built(&report, "daily_ticket_stats")["rebuilt_whole"],
        "its files are missing"
    );
    assert_eq!(stored(&p, "daily_ticket_stats"), have);

    // The same from scratch: the warehouse and its state deleted, then a full build.
    let have = (
        stored(&p, "daily_ticket_stats"),
        stored(&p, "daily_service_health"),
    );
    std::fs::remove_dir_all(p.lake().join("warehouse")).unwrap();
    std::fs::remove_dir_all(p.lake().join("_sluice/warehouse")).unwrap();
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(
        built(&report, "daily_ticket_stats")["rebuilt_whole"],
        "its first build"
    );
    assert_eq!(
        have,
        (
            stored(&p, "daily_ticket_stats"),
            stored(&p, "daily_service_health")
        )
    );
}

/// The rows of the stored aggregate by partition (first CSV field).
fn by_day(csv: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for l in csv.lines().skip(1) {
        let day = l.split(',').next().unwrap().to_string();
        out.entry(day).or_default().push(l.to_string());
    }
    out
}

#[test]
fn a_crash_between_the_partition_swap_and_the_state_leaves_whole_partitions_and_the_rerun_converges()
 {
    let p = Project::empty();
    p.add_fixture("support_tickets", "2024-03-01.csv");
    p.add_fixture("support_tickets", "2024-03-02.csv");
    assert_eq!(p.run().0, 0);
    let before = by_day(&stored(&p, "daily_ticket_stats"));
    p.add_raw("support_tickets", "updates.csv", &tickets(&TICKET_UPDATES));
    let out = p.sluice(&["run", "--crash-at", "aggregate-swapped"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("injected crash at aggregate-swapped"));
    // The ticket commit is in; each partition of the aggregate is the old one or the new one.
    let full = by_day(&full_rebuild(
        &p,
        "daily_ticket_stats",
        "queries/aggregates/daily_ticket_stats.sql",
    ));
    let now = by_day(&stored(&p, "daily_ticket_stats"));
    assert!(
        now.keys()
            .all(|d| full.contains_key(d) || before.contains_key(d))
    );
    for (day, rows) in &now {
        assert!(
            Some(rows) == before.get(day) || Some(rows) == full.get(day),
            "{day}: {rows:?}"
        );
    }
    assert!(p.files("_sluice/warehouse/staging").is_empty());
    // The rerun recomputes the same partitions and records them.
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    let a = built(&report, "daily_ticket_stats");
    assert_eq!(
        strings(&a["partitions"]),
        BTreeSet::from([
            "2024-03-01".into(),
            "2024-03-02".into(),
            "2024-03-04".into()
        ])
    );
    ticket_stats(&p, "after the crash");
    assert_eq!(by_day(&stored(&p, "daily_ticket_stats")), full);
    let (code, report) = p.run();
    assert_eq!(
        (code, report["status"].as_str()),
        (0, Some("nothing_to_do"))
    );
}

#[test]
fn aggregates_that_mix_partitions_are_rebuilt_whole_and_validate_says_why() {
    let p = Project::empty();
    std::fs::write(
        p.path().join("queries/aggregates/busy_days.sql"),
        "SELECT t.event_date, count(*) AS pairs\n\
         FROM support_tickets t JOIN app_logs l ON t.event_date = l.event_date AND t.status = 'open'\n\
         WHERE l.log_level = 'error'\n\
         GROUP BY t.event_date\nORDER BY 1\n",
    )
    .unwrap();
    std::fs::write(
        p.path().join("queries/aggregates/ticket_status.sql"),
        "SELECT status, count(*) AS tickets FROM support_tickets GROUP BY status ORDER BY 1\n",
    )
    .unwrap();
    let text_of = std::fs::read_to_string(p.config()).unwrap();
    std::fs::write(
        p.config(),
        text_of.replace(
            "[retry]",
            "[[aggregate]]\nname = \"busy_days\"\nquery = \"queries/aggregates/busy_days.sql\"\n\n\
             [[aggregate]]\nname = \"ticket_status\"\nquery = \"queries/aggregates/ticket_status.sql\"\n\n[retry]",
        ),
    )
    .unwrap();
    let out = p.sluice(&["validate"]);
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    for line in [
        "busy_days.sql): rebuilt whole: joins two tables (support_tickets, app_logs)",
        "ticket_status.sql): rebuilt whole: does not group by its input's partition column (event_date)",
        "daily_ticket_stats.sql): incremental by event_date",
    ] {
        assert!(said.contains(line), "{line}\n{said}");
    }

    let days = [
        ("2024-03-01.csv", "2024-03-01.jsonl"),
        ("2024-03-02.csv", "2024-03-02.jsonl.gz"),
    ];
    for (i, (tickets, logs)) in days.iter().enumerate() {
        p.add_fixture("support_tickets", tickets);
        p.add_fixture("app_logs", logs);
        let (code, report) = p.run();
        assert_eq!(code, 0, "{report:#}");
        for (agg, why) in [
            ("busy_days", "joins two tables (support_tickets, app_logs)"),
            (
                "ticket_status",
                "does not group by its input's partition column (event_date)",
            ),
        ] {
            let a = built(&report, agg);
            assert_eq!(a["mode"], "whole", "{a}");
            assert_eq!(a["rebuilt_whole"], why, "{a}");
            assert!(a["partitions"].as_array().unwrap().is_empty());
            assert_eq!(
                p.files(&format!("warehouse/{agg}")),
                [format!("warehouse/{agg}/{agg}.parquet")]
            );
            assert_equals_full_rebuild(&p, agg, &format!("queries/aggregates/{agg}.sql"), agg);
        }
        if i == 0 {
            let out = p.sluice(&["run"]);
            let s = String::from_utf8_lossy(&out.stdout);
            assert!(s.contains("nothing"), "{s}");
        }
    }
    // The summary says it too.
    p.add_fixture("support_tickets", "2024-03-03.csv.gz");
    let out = p.sluice(&["run"]);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("warehouse ticket_status: 5 rows, rebuilt whole: does not group by"),
        "{s}"
    );
    assert!(
        s.contains("warehouse daily_ticket_stats: 15 rows, incremental by event_date: 3 partitions recomputed (2024-03-01, 2024-03-02, 2024-03-03)"),
        "{s}"
    );

    // The layout follows the mode: grouped by the partition column now, the single file goes...
    std::fs::write(
        p.path().join("queries/aggregates/ticket_status.sql"),
        "SELECT event_date, status, count(*) AS tickets FROM support_tickets GROUP BY 1, 2 ORDER BY 1, 2\n",
    )
    .unwrap();
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(
        built(&report, "ticket_status")["rebuilt_whole"],
        "its first build in the partitioned layout"
    );
    assert_eq!(
        assert_partitioned(&p, "ticket_status"),
        ["2024-03-01", "2024-03-02", "2024-03-03"]
    );
    let grouped = query(&p, "SELECT * FROM ticket_status ORDER BY 1, 2");
    assert!(
        grouped.starts_with("event_date,status,tickets\n2024-03-01,closed,"),
        "{grouped}"
    );
    // ...and back.
    std::fs::write(
        p.path().join("queries/aggregates/ticket_status.sql"),
        "SELECT status, count(*) AS tickets FROM support_tickets GROUP BY status ORDER BY 1\n",
    )
    .unwrap();
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(built(&report, "ticket_status")["mode"], "whole");
    assert_eq!(
        p.files("warehouse/ticket_status"),
        ["warehouse/ticket_status/ticket_status.parquet"]
    );
    assert_equals_full_rebuild(
        &p,
        "ticket_status",
        "queries/aggregates/ticket_status.sql",
        "back",
    );
}
