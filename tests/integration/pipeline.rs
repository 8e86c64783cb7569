//! The example pipeline end to end: counts, layout, reruns, duplicate files, new versions.

use datafusion::arrow::datatypes::{DataType, TimeUnit};

use crate::support::*;

#[test]
fn example_pipeline_gives_the_expected_tables() {
    let p = Project::with_fixtures();
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["status"], "succeeded");
    let files = file_counts(&report);
    let expect = [
        ("app_logs/2024-03-01.jsonl", (724, 682, 17, 25)),
        ("app_logs/2024-03-02.jsonl.gz", (720, 698, 8, 14)),
        ("app_logs/2024-03-03.jsonl.zst", (721, 683, 19, 19)),
        ("support_tickets/2024-03-01.csv", (359, 344, 8, 7)),
        ("support_tickets/2024-03-02.csv", (361, 344, 7, 10)),
        ("support_tickets/2024-03-03.csv.gz", (359, 345, 4, 10)),
    ];
    assert_eq!(files.len(), expect.len(), "{files:?}");
    for (key, (read, written, rejected, dup)) in expect {
        let got = &files[key];
        assert_eq!(got.0, "processed", "{key}");
        assert_eq!(
            (got.1, got.2, got.3, got.4),
            (read, written, rejected, dup),
            "{key}"
        );
    }
    let t = &report["tables"]["app_logs"];
    assert_eq!(t["rows_written"], 2063);
    assert_eq!(t["rows_rejected"], 44);
    assert_eq!(t["rows_duplicate"], 58);
    assert_eq!(t["partitions"].as_array().unwrap().len(), 3);
    assert_eq!(report["tables"]["support_tickets"]["rows_written"], 1033);
    assert_example_tables(&p);

    // Hive layout, partition column not inside the files, Spectrum types.
    let parts = p.files("processed/app_logs");
    assert_eq!(parts.len(), 3, "{parts:?}");
    for (f, day) in parts.iter().zip(["2024-03-01", "2024-03-02", "2024-03-03"]) {
        assert!(
            f.starts_with(&format!("processed/app_logs/event_date={day}/part-")),
            "{f}"
        );
    }
    let batch = &p.read("processed/app_logs")[0];
    let schema = batch.schema();
    assert!(schema.field_with_name("event_date").is_err());
    assert!(schema.field_with_name("_source_file").is_err());
    assert_eq!(
        schema.field_with_name("event_ts").unwrap().data_type(),
        &DataType::Timestamp(TimeUnit::Microsecond, None)
    );
    assert_eq!(
        schema.field_with_name("latency_ms").unwrap().data_type(),
        &DataType::Float64
    );

    // Nested JSON kept as text, offsets converted to UTC.
    let out = p.sluice(&[
        "query",
        "SELECT message FROM app_logs WHERE request_id = '00000000-0000-4000-a000-00000000000a'",
        "--format",
        "csv",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("{\"\"a\"\":1,\"\"b\"\":[1,2]}"),
        "{}",
        text(&out)
    );

    // Warehouse aggregates over the processed tables.
    assert_example_warehouse(&p);
    let out = p.sluice(&[
        "query",
        "SELECT sum(tickets) AS n FROM daily_ticket_stats",
        "--format",
        "csv",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "n\n1033",
        "{}",
        text(&out)
    );
    let out = p.sluice(&[
        "query",
        "SELECT sum(requests) AS n, count(*) AS g FROM daily_service_health",
        "--format",
        "csv",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "n,g\n2063,30",
        "{}",
        text(&out)
    );

    // The run report is kept in the lake.
    let runs = p.files("_sluice/runs");
    assert_eq!(runs.len(), 1);
}

#[test]
fn a_rerun_does_nothing() {
    let p = Project::with_fixtures();
    assert_eq!(p.run().0, 0);
    let before = p.files("processed");
    let (code, report) = p.run();
    assert_eq!(code, 0);
    assert_eq!(report["status"], "nothing_to_do");
    assert!(report["files"].as_array().unwrap().is_empty());
    assert_eq!(p.files("processed"), before);
    assert_example_tables(&p);
}

#[test]
fn the_same_content_under_another_name_is_a_duplicate_file() {
    let p = Project::with_fixtures();
    assert_eq!(p.run().0, 0);
    // The same bytes again, under a new name, and twice within one run.
    let data = std::fs::read(repo().join("fixtures/raw/support_tickets/2024-03-01.csv")).unwrap();
    p.add_raw("support_tickets", "copy-of-03-01.csv", &data);
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    let files = file_counts(&report);
    assert_eq!(files["support_tickets/copy-of-03-01.csv"].0, "duplicate");
    assert!(
        report["files"][0]["error"]
            .as_str()
            .unwrap()
            .contains("2024-03-01.csv")
    );
    assert_example_tables_but_archive(&p, 7);

    let fresh = tickets(&["TCK-77,2024-03-05 10:00:00,2024-03-05 11:00:00,open,low,a@b.c,s,b,"]);
    p.add_raw("support_tickets", "a.csv", &fresh);
    p.add_raw("support_tickets", "b.csv", &fresh);
    let (code, report) = p.run();
    assert_eq!(code, 0);
    let files = file_counts(&report);
    assert_eq!(files["support_tickets/a.csv"].0, "processed");
    assert_eq!(files["support_tickets/b.csv"].0, "duplicate");
    assert_eq!(p.rows("processed/support_tickets"), TICKETS_ROWS + 1);
}

fn assert_example_tables_but_archive(p: &Project, archived: usize) {
    assert_eq!(p.rows("processed/app_logs"), APP_LOGS_ROWS);
    assert_eq!(p.rows("processed/support_tickets"), TICKETS_ROWS);
    assert_eq!(p.files("archive").len(), archived);
    assert!(p.files("raw").is_empty());
}

#[test]
fn a_newer_version_of_a_ticket_replaces_the_older_row_and_only_its_partition() {
    let p = Project::empty();
    p.add_raw(
        "support_tickets",
        "day1.csv",
        &tickets(&[
            "T-1,2024-03-01 10:00:00,2024-03-01 11:00:00,Open,High,A@X.COM,Login,\"can't, log in\",agent001",
            "T-2,2024-03-02 10:00:00,2024-03-02 11:00:00,open,low,b@x.com,Refund,money,",
        ]),
    );
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    let day2_before = p.files("processed/support_tickets/event_date=2024-03-02");
    let mtime = |f: &str| {
        std::fs::metadata(p.lake().join(f))
            .unwrap()
            .modified()
            .unwrap()
    };
    let day2_mtime = mtime(&day2_before[0]);

    // A later file with a newer version of T-1 (status change) and an older one of T-2.
    p.add_raw(
        "support_tickets",
        "day2.csv",
        &tickets(&[
            "T-1,2024-03-01 10:00:00,2024-03-03 09:00:00,Resolved,High,a@x.com,Login,fixed,agent002",
            "T-2,2024-03-02 10:00:00,2024-03-02 10:30:00,pending,low,b@x.com,Refund,older,",
        ]),
    );
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    let f = file_counts(&report);
    assert_eq!(
        f["support_tickets/day2.csv"],
        ("processed".to_string(), 2, 1, 0, 1)
    );
    assert_eq!(report["tables"]["support_tickets"]["rows_replaced"], 1);
    assert_eq!(p.rows("processed/support_tickets"), 2);
    let statuses = p.strings("processed/support_tickets/event_date=2024-03-01", "status");
    assert_eq!(statuses, vec![Some("resolved".to_string())]);
    let agents = p.strings(
        "processed/support_tickets/event_date=2024-03-01",
        "agent_id",
    );
    assert_eq!(agents, vec![Some("agent002".to_string())]);
    // The untouched partition was not rewritten.
    assert_eq!(
        p.files("processed/support_tickets/event_date=2024-03-02"),
        day2_before
    );
    assert_eq!(mtime(&day2_before[0]), day2_mtime);
    assert_eq!(
        p.strings("processed/support_tickets/event_date=2024-03-02", "status"),
        vec![Some("open".to_string())]
    );
}

#[test]
fn a_changed_object_under_the_same_key_is_a_new_version() {
    let p = Project::empty();
    p.add_raw(
        "support_tickets",
        "feed.csv",
        &tickets(&["T-1,2024-03-01 10:00:00,2024-03-01 11:00:00,open,low,a@x.com,s,b,"]),
    );
    assert_eq!(p.run().0, 0);
    p.add_raw(
        "support_tickets",
        "feed.csv",
        &tickets(&[
            "T-1,2024-03-01 10:00:00,2024-03-01 12:00:00,closed,low,a@x.com,s,b,",
            "T-3,2024-03-01 10:00:00,2024-03-01 12:00:00,closed,low,c@x.com,s,b,",
        ]),
    );
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(
        file_counts(&report)["support_tickets/feed.csv"].0,
        "processed"
    );
    assert_eq!(p.rows("processed/support_tickets"), 2);
    assert_eq!(p.files("archive").len(), 2, "{:?}", p.files("archive"));
}

#[test]
fn an_aggregate_whose_input_has_no_data_yet_is_a_warning_and_no_scratch_is_left() {
    let p = Project::empty();
    p.add_fixture("app_logs", "2024-03-01.jsonl");
    let (code, r) = p.run();
    assert_eq!(code, 0, "{r:#}");
    let warnings = r["warnings"].to_string();
    assert!(
        warnings.contains(
            "aggregate daily_ticket_stats not built yet: its input table support_tickets has no data"
        ),
        "{r:#}"
    );
    let out = p.sluice(&["run"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("warning: aggregate daily_ticket_stats"),
        "{}",
        text(&out)
    );
    let out = p.sluice(&["query", "SELECT * FROM daily_ticket_stats"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("see the last run's warnings"),
        "{}",
        text(&out)
    );
    // Each run's scratch folder goes with it.
    let tmp = p.lake().join("_sluice/tmp");
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}
