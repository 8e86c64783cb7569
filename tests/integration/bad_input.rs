//! Bad input: malformed records, unreadable files, empty files, broken config and SQL.

use std::io::Write;

use crate::support::*;

#[test]
fn malformed_records_are_rejected_with_file_line_reason_and_raw_text() {
    let p = Project::with_fixtures();
    assert_eq!(p.run().0, 0);
    let out = p.sluice(&[
        "query",
        "SELECT _source_file, _source_row, _reject_reason, _raw_record FROM app_logs_rejected \
         WHERE _raw_record IS NOT NULL ORDER BY _source_row",
        "--format",
        "json",
    ]);
    let rows: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out)));
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!(rows[0]["_source_file"], "raw/app_logs/2024-03-01.jsonl");
    let lines: Vec<i64> = rows
        .iter()
        .map(|r| r["_source_row"].as_i64().unwrap())
        .collect();
    assert_eq!(lines, vec![101, 202, 303]);
    assert!(
        rows[0]["_reject_reason"]
            .as_str()
            .unwrap()
            .contains("invalid JSON")
    );
    assert!(
        rows[0]["_raw_record"]
            .as_str()
            .unwrap()
            .starts_with("{\"ts\":\"2024-03-01T10:00:00Z\"")
    );
    assert_eq!(rows[1]["_reject_reason"], "not a JSON object");
    assert!(
        rows[2]["_reject_reason"]
            .as_str()
            .unwrap()
            .contains("UTF-8")
    );

    let out = p.sluice(&[
        "query",
        "SELECT _source_row, _reject_reason FROM support_tickets_rejected \
         WHERE _raw_record IS NOT NULL ORDER BY _source_row",
        "--format",
        "csv",
    ]);
    let text_out = String::from_utf8_lossy(&out.stdout);
    assert!(
        text_out.contains("114,\"expected 9 fields, found 7\""),
        "{text_out}"
    );
    assert!(
        text_out.contains("226,invalid UTF-8 in column subject"),
        "{text_out}"
    );

    // Rows rejected by the query carry the reason and the typed columns.
    let out = p.sluice(&[
        "query",
        "SELECT count(*) AS n FROM support_tickets_rejected WHERE _reject_reason = 'missing ticket_id'",
        "--format",
        "csv",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "n\n9");
}

fn gz(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[test]
fn a_truncated_gzip_fails_alone_and_moves_to_failed_after_max_attempts() {
    let p = Project::empty();
    p.add_fixture("app_logs", "2024-03-01.jsonl");
    let good = std::fs::read(repo().join("fixtures/raw/app_logs/2024-03-02.jsonl.gz")).unwrap();
    p.add_raw("app_logs", "broken.jsonl.gz", &good[..good.len() / 2]);
    let (code, report) = p.run();
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["status"], "failed");
    let f = file_counts(&report);
    assert_eq!(f["app_logs/2024-03-01.jsonl"].0, "processed");
    assert_eq!(f["app_logs/broken.jsonl.gz"].0, "failed");
    let err = report["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["status"] == "failed")
        .unwrap()["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        err.contains("raw/app_logs/broken.jsonl.gz") && err.contains("gzip"),
        "{err}"
    );
    assert_eq!(p.files("raw"), vec!["raw/app_logs/broken.jsonl.gz"]);

    // Retried by the next runs; after max_attempts (3) it moves to failed/ with a report.
    assert_eq!(p.run().0, 1);
    assert_eq!(p.files("raw").len(), 1);
    let (code, report) = p.run();
    assert_eq!(code, 1);
    assert_eq!(
        report["files"][0]["moved_to"],
        "failed/app_logs/broken.jsonl.gz"
    );
    assert!(p.files("raw").is_empty());
    let error_report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(p.lake().join("failed/app_logs/broken.jsonl.gz.error.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(error_report["attempts"], 3);
    assert_eq!(error_report["errors"].as_array().unwrap().len(), 3);
    let status = p.sluice(&["status"]);
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("failed: 1"),
        "{}",
        text(&status)
    );

    // Fixed and dropped back in: processed.
    p.add_raw("app_logs", "broken.jsonl.gz", &good);
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(file_counts(&report)["app_logs/broken.jsonl.gz"].1, 720);
}

#[test]
fn empty_and_header_only_files_succeed_with_no_rows() {
    let p = Project::empty();
    p.add_raw("app_logs", "empty.jsonl", b"");
    p.add_raw("support_tickets", "header.csv", TICKETS_HEADER.as_bytes());
    p.add_raw("support_tickets", "nothing.csv.gz", &gz(b""));
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    for (_, f) in file_counts(&report) {
        assert_eq!(f.0, "processed");
        assert_eq!(f.1, 0);
    }
    assert_eq!(p.files("archive").len(), 3);
}

#[test]
fn a_wrong_json_type_for_a_typed_column_is_a_rejected_row() {
    let p = Project::single_table(
        "events",
        "jsonl",
        "[{ name = \"id\", type = \"int64\" }, { name = \"payload\", type = \"string\" }, { name = \"ok\", type = \"boolean\" }]",
        "SELECT id, payload, ok, _source_file, _source_row FROM events",
    );
    p.add_raw(
        "events",
        "e.json",
        b"{\"id\":1,\"payload\":{\"deep\":[1,{\"x\":null}]},\"ok\":true}\n{\"id\":\"two\",\"payload\":\"p\"}\n{\"id\":\"3\",\"payload\":7,\"ok\":\"false\"}\n",
    );
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(
        file_counts(&report)["events/e.json"],
        ("processed".into(), 3, 2, 1, 0)
    );
    let payloads = p.strings("processed/events_clean", "payload");
    assert_eq!(
        payloads,
        vec![
            Some("{\"deep\":[1,{\"x\":null}]}".to_string()),
            Some("7".to_string())
        ]
    );
    let reasons = p.strings("rejected/events_clean", "_reject_reason");
    assert_eq!(
        reasons,
        vec![Some("column id: \"two\" is not a valid int64".to_string())]
    );
}

#[test]
fn broken_config_is_a_usage_error_naming_the_key_and_line() {
    let p = Project::empty();
    p.edit_config("max_attempts = 3", "max_attempts = 3\nmax_attempt = 4");
    for cmd in [vec!["validate"], vec!["run"]] {
        let out = p.sluice(&cmd);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("max_attempt") && err.contains("line 43"),
            "{err}"
        );
    }
}

#[test]
fn validate_names_the_query_file_and_line_of_a_sql_error() {
    let p = Project::empty();
    let out = p.sluice(&["validate"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("config ok: 2 sources, 2 tables, 2 aggregates")
    );

    let q = p.path().join("queries/support_tickets.sql");
    let sql = std::fs::read_to_string(&q).unwrap();
    std::fs::write(
        &q,
        sql.replace("lower(priority) AS priority", "lower(priorty) AS priority"),
    )
    .unwrap();
    let out = p.sluice(&["validate"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("queries/support_tickets.sql line 10") && err.contains("priorty"),
        "{err}"
    );

    // The same broken query at run time fails its files (kept in raw/), and a rerun after the
    // fix processes them.
    p.add_fixture("support_tickets", "2024-03-01.csv");
    let (code, report) = p.run();
    assert_eq!(code, 1);
    assert!(
        report["files"][0]["error"]
            .as_str()
            .unwrap()
            .contains("support_tickets.sql")
    );
    assert_eq!(p.files("raw").len(), 1);
    std::fs::write(&q, sql).unwrap();
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(
        file_counts(&report)["support_tickets/2024-03-01.csv"].0,
        "processed"
    );
}

#[test]
fn a_query_that_filters_rows_out_fails_the_accounting() {
    let p = Project::empty();
    let q = p.path().join("queries/app_logs.sql");
    let sql = std::fs::read_to_string(&q).unwrap();
    std::fs::write(&q, format!("{sql}\nWHERE log_level = 'error'")).unwrap();
    p.add_fixture("app_logs", "2024-03-01.jsonl");
    let (code, report) = p.run();
    assert_eq!(code, 1);
    let err = report["files"][0]["error"].as_str().unwrap();
    assert!(
        err.contains("row accounting does not balance") && err.contains("dropped"),
        "{err}"
    );
    assert!(p.files("processed").is_empty());
}

#[test]
fn validate_catches_a_missing_partition_column_and_a_bad_schema_file() {
    let p = Project::empty();
    p.edit_config(
        "partition_by = [\"event_date\"]\nunique_key = [\"request_id\"]",
        "partition_by = [\"day\"]\nunique_key = [\"request_id\"]",
    );
    let out = p.sluice(&["validate"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs column \"day\""),
        "{}",
        text(&out)
    );

    let p = Project::empty();
    std::fs::write(
        p.path().join("schemas/app_logs.toml"),
        "columns = [{ name = \"ts\", type = \"timestampz\" }]",
    )
    .unwrap();
    let out = p.sluice(&["validate"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("schemas/app_logs.toml") && err.contains("timestampz"),
        "{err}"
    );
}

/// A log source read with `to_timestamp` on a `%a %b %d` format (as syslog-style exports
/// carry), which fails the query on a value that does not parse.
fn strict_logs() -> Project {
    let p = Project::single_table(
        "logs",
        "csv",
        r#"[{ name = "line", type = "int64" }, { name = "t", type = "string" }]"#,
        "SELECT line, to_timestamp(t, '%a %b %d %H:%M:%S %Y') AS ts, _source_file, _source_row FROM logs",
    );
    let mut config = std::fs::read_to_string(p.config()).unwrap();
    config.push_str("\n[retry]\nmax_attempts = 1\n");
    std::fs::write(p.config(), config).unwrap();
    p
}

fn log_file(first: i64, bad_at: Option<i64>) -> Vec<u8> {
    let mut s = String::from("line,t\n");
    for i in first..first + 50 {
        let hour = if Some(i) == bad_at { 25 } else { 4 };
        s.push_str(&format!("{i},Sun Dec 04 {hour:02}:47:44 2005\n"));
    }
    s.into_bytes()
}

#[test]
fn a_query_error_fails_only_the_files_whose_values_cause_it() {
    let p = strict_logs();
    for k in 0..5 {
        let bad = (k == 3).then_some(k * 100 + 17);
        p.add_raw("logs", &format!("f{k}.csv"), &log_file(k * 100, bad));
    }
    let (code, r) = p.run();
    assert_eq!(code, 1, "{r:#}");
    let counts = file_counts(&r);
    for k in [0, 1, 2, 4] {
        let c = &counts[&format!("logs/f{k}.csv")];
        assert_eq!(c.0, "processed", "f{k}: {r:#}");
        assert_eq!(c.2, 50, "f{k}: {r:#}");
    }
    assert_eq!(counts["logs/f3.csv"].0, "failed", "{r:#}");
    assert_eq!(p.rows("processed/logs_clean"), 200);
    let failed: Vec<&serde_json::Value> = r["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["status"] == "failed")
        .collect();
    assert_eq!(failed.len(), 1, "{r:#}");
    let error = failed[0]["error"].as_str().unwrap();
    assert!(error.contains("25:47:44"), "the file's own value: {error}");
    // After max_attempts (1 here) it is in failed/ beside its error.
    assert!(p.lake().join("failed/logs/f3.csv").exists());
    let error_json = p.lake().join("failed/logs/f3.csv.error.json");
    assert!(error_json.exists());

    // The query fixed with try_to_timestamp (NULL where no format matches) and a reason, the
    // file put back: it is processed, its bad row rejected, and its old error goes.
    std::fs::write(
        p.path().join("logs.sql"),
        "SELECT line, try_to_timestamp(t, '%a %b %d %H:%M:%S %Y') AS ts, \
         CASE WHEN try_to_timestamp(t, '%a %b %d %H:%M:%S %Y') IS NULL THEN 'invalid t: ' || t END AS _reject_reason, \
         _source_file, _source_row FROM logs",
    )
    .unwrap();
    std::fs::rename(
        p.lake().join("failed/logs/f3.csv"),
        p.lake().join("raw/logs/f3.csv"),
    )
    .unwrap();
    let (code, r) = p.run();
    assert_eq!(code, 0, "{r:#}");
    let c = &file_counts(&r)["logs/f3.csv"];
    assert_eq!((c.0.as_str(), c.2, c.3), ("processed", 49, 1), "{r:#}");
    assert!(!error_json.exists(), "the stale error.json is removed");
    assert!(p.files("failed").is_empty(), "{:?}", p.files("failed"));
    let out = p.sluice(&[
        "query",
        "SELECT _source_row, _reject_reason FROM logs_clean_rejected",
        "--format",
        "csv",
    ]);
    let got = String::from_utf8_lossy(&out.stdout);
    assert!(
        got.contains("19,invalid t: Sun Dec 04 25:47:44 2005"),
        "{got}"
    );
}

#[test]
fn a_query_error_over_one_file_fails_it_alone_and_a_mismatching_weekday_is_null() {
    let p = strict_logs();
    p.add_raw("logs", "good.csv", &log_file(0, None));
    p.add_raw("logs", "bad.csv", &log_file(100, Some(101)));
    let (code, r) = p.run();
    assert_eq!(code, 1, "{r:#}");
    let counts = file_counts(&r);
    assert_eq!(counts["logs/good.csv"].0, "processed", "{r:#}");
    assert_eq!(counts["logs/bad.csv"].0, "failed", "{r:#}");
    let bad = r["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["status"] == "failed")
        .unwrap();
    assert!(
        bad["key"].as_str().unwrap().ends_with("bad.csv")
            && !bad["error"].as_str().unwrap().contains("good.csv"),
        "{bad:#}"
    );

    // `Mon Dec 04 2005` names the wrong weekday: NULL from try_to_timestamp, a rejected row.
    let p = Project::single_table(
        "logs",
        "csv",
        r#"[{ name = "line", type = "int64" }, { name = "t", type = "string" }]"#,
        "SELECT line, try_to_timestamp(t, '%a %b %d %H:%M:%S %Y') AS ts, \
         CASE WHEN try_to_timestamp(t, '%a %b %d %H:%M:%S %Y') IS NULL THEN 'invalid t: ' || t END AS _reject_reason, \
         NULL AS _duplicate, _source_file, _source_row FROM logs",
    );
    p.add_raw(
        "logs",
        "w.csv",
        b"line,t\n1,Sun Dec 04 04:47:44 2005\n2,Mon Dec 04 04:47:44 2005\n",
    );
    let (code, r) = p.run();
    assert_eq!(code, 0, "{r:#}");
    let c = &file_counts(&r)["logs/w.csv"];
    assert_eq!((c.2, c.3), (1, 1), "{r:#}");
}

#[test]
fn a_null_literal_reject_reason_is_accepted() {
    let p = Project::single_table(
        "events",
        "jsonl",
        r#"[{ name = "id", type = "int64" }]"#,
        "SELECT id, NULL AS _reject_reason, _source_file, _source_row FROM events",
    );
    p.add_raw("events", "e.jsonl", b"{\"id\": 1}\n{\"id\": 2}\n");
    let (code, r) = p.run();
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(p.rows("processed/events_clean"), 2);
}
