//! Delta Lake tables (`format = "delta"`): the example pipeline's rows in Delta tables, read
//! back by sluice and by a reader nobody here wrote (the `deltalake` Python package), exactly
//! once across crashes, with symlink manifests, time travel, compaction and vacuum.

use std::process::Command;

use serde_json::Value;

use crate::support::*;

fn delta_project() -> Project {
    let p = Project::with_fixtures();
    let text = std::fs::read_to_string(p.config()).unwrap();
    std::fs::write(
        p.config(),
        text.replace(
            "query = \"queries/app_logs.sql\"",
            "query = \"queries/app_logs.sql\"\nformat = \"delta\"",
        )
        .replace(
            "query = \"queries/support_tickets.sql\"",
            "query = \"queries/support_tickets.sql\"\nformat = \"delta\"",
        ),
    )
    .unwrap();
    p
}

/// What the `deltalake` Python package reads from a table: version, rows, and the values of
/// one column for one key.
fn python_read(table: &std::path::Path, key_col: &str, key: &str, col: &str) -> Value {
    let script = format!(
        "import json, sys\n\
         from deltalake import DeltaTable\n\
         dt = DeltaTable(sys.argv[1])\n\
         t = dt.to_pyarrow_table()\n\
         keys = t.column('{key_col}').to_pylist()\n\
         vals = t.column('{col}').to_pylist()\n\
         txns = [a for a in dt.transaction_versions().items()] if hasattr(dt, 'transaction_versions') else []\n\
         print(json.dumps({{'version': dt.version(), 'rows': t.num_rows, \
           'values': [str(v) for k, v in zip(keys, vals) if str(k) == '{key}'], \
           'partitions': dt.metadata().partition_columns, 'files': len(dt.file_uris()), \
           'txns': [[k, str(v)] for k, v in txns]}}))\n\
         sys.stdout.flush()\n\
         import os\n\
         os._exit(0)  # delta-rs' runtime threads can abort a normal interpreter exit\n"
    );
    let out = Command::new(python())
        .arg("-c")
        .arg(script)
        .arg(table)
        .output()
        .unwrap();
    assert!(out.status.success(), "python: {}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn count(p: &Project, sql: &str, as_of: Option<u64>) -> Vec<Value> {
    let mut args = vec!["query", sql, "--format", "json"];
    let v;
    if let Some(version) = as_of {
        v = version.to_string();
        args.extend(["--as-of", v.as_str()]);
    }
    let out = p.sluice(&args);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn n(p: &Project, table: &str) -> u64 {
    count(p, &format!("SELECT count(*) AS n FROM {table}"), None)[0]["n"]
        .as_u64()
        .unwrap()
}

/// The manifest lines of every partition of a table, by partition folder.
fn manifests(p: &Project, table: &str) -> std::collections::BTreeMap<String, Vec<String>> {
    let root = p
        .lake()
        .join("processed")
        .join(table)
        .join("_symlink_format_manifest");
    let mut out = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(&root).unwrap() {
        let e = e.unwrap();
        let lines = std::fs::read_to_string(e.path().join("manifest")).unwrap();
        let mut lines: Vec<String> = lines.lines().map(str::to_string).collect();
        lines.sort();
        out.insert(e.file_name().to_string_lossy().into_owned(), lines);
    }
    out
}

#[test]
fn delta_tables_hold_the_example_rows_and_python_reads_them() {
    let p = delta_project();
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report}");
    // The same rows as with Parquet tables, read by sluice.
    assert_eq!(n(&p, "app_logs"), APP_LOGS_ROWS as u64);
    assert_eq!(n(&p, "support_tickets"), TICKETS_ROWS as u64);
    assert_eq!(n(&p, "app_logs_rejected"), APP_LOGS_REJECTED as u64);
    assert_eq!(n(&p, "support_tickets_rejected"), TICKETS_REJECTED as u64);
    assert!(
        p.lake()
            .join("processed/app_logs/_delta_log/00000000000000000001.json")
            .exists()
    );
    // ... and by delta-rs' Python package.
    let table_dir = p.lake().join("processed/support_tickets");
    let first = count(
        &p,
        "SELECT ticket_id, CAST(created_ts AS VARCHAR) AS c FROM support_tickets ORDER BY ticket_id LIMIT 1",
        None,
    );
    let (id, created) = (
        first[0]["ticket_id"].as_str().unwrap().to_string(),
        first[0]["c"].as_str().unwrap().replace('T', " "),
    );
    let py = python_read(&table_dir, "ticket_id", &id, "status");
    assert_eq!(py["rows"], TICKETS_ROWS);
    assert_eq!(py["partitions"], serde_json::json!(["event_date"]));
    let v1 = py["version"].as_u64().unwrap();
    // Every partition has a manifest listing its files.
    let m = manifests(&p, "support_tickets");
    assert_eq!(
        m.values().map(Vec::len).sum::<usize>(),
        py["files"].as_u64().unwrap() as usize
    );
    for lines in m.values() {
        for l in lines {
            assert!(l.starts_with("file:///") && l.ends_with(".parquet"), "{l}");
            assert!(
                std::path::Path::new(l.strip_prefix("file://").unwrap()).exists(),
                "{l}"
            );
        }
    }

    // A newer version of one ticket: its partition's file is replaced in one Delta commit.
    p.add_raw(
        "support_tickets",
        "2024-03-09.csv",
        &tickets(&[&format!(
            "{id},{created},2030-01-01 00:00:00,closed,high,late@example.com,again,reopened,a-1"
        )]),
    );
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["tables"]["support_tickets"]["rows_replaced"], 1);
    let py = python_read(&table_dir, "ticket_id", &id, "status");
    assert_eq!(py["rows"], TICKETS_ROWS, "replaced, not added");
    assert_eq!(py["values"], serde_json::json!(["closed"]));
    assert_eq!(py["version"].as_u64().unwrap(), v1 + 1, "one commit");
    assert_eq!(n(&p, "support_tickets"), TICKETS_ROWS as u64);
    // Time travel: the version before still has the old row.
    let old = count(
        &p,
        &format!("SELECT status FROM support_tickets WHERE ticket_id = '{id}'"),
        Some(v1),
    );
    assert_ne!(old[0]["status"], "closed");
    let new = count(
        &p,
        &format!("SELECT status FROM support_tickets WHERE ticket_id = '{id}'"),
        None,
    );
    assert_eq!(new[0]["status"], "closed");
    // The manifests list only active files: the replaced one is gone from them (not from disk).
    let after = manifests(&p, "support_tickets");
    assert_eq!(
        after.values().map(Vec::len).sum::<usize>(),
        py["files"].as_u64().unwrap() as usize
    );
    let replaced: Vec<&String> = m
        .values()
        .flatten()
        .filter(|l| !after.values().flatten().any(|a| a == *l))
        .collect();
    assert_eq!(replaced.len(), 1, "{replaced:?}");
    assert!(std::path::Path::new(replaced[0].strip_prefix("file://").unwrap()).exists());

    // An older version of the same ticket arriving later loses: no file is rewritten, the
    // newer row stays, and the older one is counted as a duplicate.
    p.add_raw(
        "support_tickets",
        "2024-03-10.csv",
        &tickets(&[&format!(
            "{id},{created},2001-01-01 00:00:00,open,low,old@example.com,stale,old,a-1"
        )]),
    );
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report}");
    let t = &report["tables"]["support_tickets"];
    assert_eq!(t["rows_replaced"], 0, "{report}");
    assert_eq!(t["rows_duplicate"], 1, "{report}");
    assert_eq!(t["rows_written"], 0, "{report}");
    let py = python_read(&table_dir, "ticket_id", &id, "status");
    assert_eq!(py["rows"], TICKETS_ROWS);
    assert_eq!(py["values"], serde_json::json!(["closed"]));
    assert_eq!(manifests(&p, "support_tickets"), after, "no file changed");
}

#[test]
fn a_crash_around_the_delta_commit_never_writes_a_batch_twice() {
    for step in ["committed", "published"] {
        let p = delta_project();
        let out = p.sluice(&["run", "--crash-at", step]);
        assert!(!out.status.success(), "{step}: {}", text(&out));
        let (code, report) = p.run();
        assert_eq!(code, 0, "{step}: {report}");
        let (code, report) = p.run();
        assert_eq!(code, 0, "{step}: {report}");
        assert_eq!(n(&p, "app_logs"), APP_LOGS_ROWS as u64, "{step}");
        assert_eq!(n(&p, "support_tickets"), TICKETS_ROWS as u64, "{step}");
        // One Delta commit for the batch: the table's version 1 (0 created it), whatever
        // the crash.
        let py = python_read(
            &p.lake().join("processed/app_logs"),
            "request_id",
            "-",
            "log_level",
        );
        assert_eq!(py["rows"], APP_LOGS_ROWS, "{step}");
        assert_eq!(py["version"], 1, "{step}: {py}");
        let log = std::fs::read_to_string(
            p.lake()
                .join("processed/app_logs/_delta_log/00000000000000000001.json"),
        )
        .unwrap();
        assert!(
            log.contains("\"txn\"") && log.contains("\"appId\":\"sluice:"),
            "{log}"
        );
    }
}

fn append_project() -> Project {
    let p = Project::single_table(
        "events",
        "jsonl",
        r#"[{ name = "id", type = "int64" }, { name = "day", type = "string" }]"#,
        "SELECT id, day, _source_file, _source_row FROM events",
    );
    p.edit_config(
        "source = \"events\"",
        "source = \"events\"\nformat = \"delta\"\npartition_by = [\"day\"]",
    );
    p
}

#[test]
fn compact_merges_small_files_and_vacuum_deletes_them_only_when_told() {
    let p = append_project();
    for i in 0..3 {
        p.add_raw(
            "events",
            &format!("e{i}.jsonl"),
            format!(
                "{{\"id\": {i}, \"day\": \"d1\"}}\n{{\"id\": {}, \"day\": \"d2\"}}\n",
                i + 10
            )
            .as_bytes(),
        );
        let (code, report) = p.run();
        assert_eq!(code, 0, "{report}");
    }
    let m = manifests(&p, "events_clean");
    assert_eq!(m["day=d1"].len(), 3);
    let out = p.sluice(&["compact", "events_clean"]);
    assert!(out.status.success(), "{}", text(&out));
    let printed = text(&out);
    assert!(
        printed.contains("compact processed/events_clean: 2 files added, 6 files removed"),
        "{printed}"
    );
    assert_eq!(n(&p, "events_clean"), 6);
    let m = manifests(&p, "events_clean");
    assert_eq!(m["day=d1"].len(), 1, "{m:?}");
    assert_eq!(m["day=d2"].len(), 1, "{m:?}");

    // Vacuum keeps what a recent version needs unless forced.
    let out = p.sluice(&["vacuum", "events_clean", "--retain", "0h"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--force"), "{}", text(&out));
    let before = p
        .files("processed/events_clean")
        .iter()
        .filter(|f| f.ends_with(".parquet"))
        .count();
    let out = p.sluice(&["vacuum", "events_clean", "--retain", "168h"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("0 files removed"), "{}", text(&out));
    let out = p.sluice(&["vacuum", "events_clean", "--retain", "0h", "--force"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("vacuum processed/events_clean: 0 files added, 6 files removed"),
        "{}",
        text(&out)
    );
    let after = p
        .files("processed/events_clean")
        .iter()
        .filter(|f| f.ends_with(".parquet"))
        .count();
    assert_eq!(before - after, 6);
    assert_eq!(n(&p, "events_clean"), 6);
    let py = python_read(&p.lake().join("processed/events_clean"), "id", "1", "day");
    assert_eq!(py["rows"], 6);
}

#[test]
fn two_concurrent_writers_both_land_in_one_delta_table() {
    let p = append_project();
    for i in 0..8 {
        p.add_raw(
            "events",
            &format!("e{i}.jsonl"),
            format!("{{\"id\": {i}, \"day\": \"d{}\"}}\n", i % 3).as_bytes(),
        );
    }
    let spawn = || {
        p.cmd(&["run", "--json"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success(), "{}", text(&a));
    assert!(b.status.success(), "{}", text(&b));
    assert_eq!(n(&p, "events_clean"), 8);
    let py = python_read(&p.lake().join("processed/events_clean"), "id", "3", "day");
    assert_eq!(py["rows"], 8);
    assert_eq!(py["values"], serde_json::json!(["d0"]));
}

#[test]
fn delta_on_s3_commits_conditionally_and_glue_reads_it_through_symlink_manifests() {
    use crate::aws::{Moto, run_json, s3_project, sluice};
    let moto = Moto::start();
    let p = s3_project(&moto, "lake", "kind = \"glue\"\ndatabase = \"analytics\"");
    p.edit_config(
        "query = \"queries/support_tickets.sql\"",
        "query = \"queries/support_tickets.sql\"\nformat = \"delta\"",
    );
    let (code, report) = run_json(&moto, &p, &[]);
    assert_eq!(code, 0, "{report}");
    let logs = moto.keys("lake", "data/processed/support_tickets/_delta_log");
    assert!(
        logs.iter()
            .any(|k| k.ends_with("00000000000000000001.json")),
        "{logs:?}"
    );
    // Each add's statistics, from its footer read with ranged GETs of the bucket.
    let log = moto.get(
        "lake",
        "data/processed/support_tickets/_delta_log/00000000000000000001.json",
    );
    let mut rows = 0;
    for line in String::from_utf8_lossy(&log).lines() {
        let action: Value = serde_json::from_str(line).unwrap();
        if let Some(add) = action.get("add") {
            let stats: Value = serde_json::from_str(add["stats"].as_str().unwrap()).unwrap();
            assert!(stats["minValues"]["ticket_id"].is_string(), "{stats}");
            rows += stats["numRecords"].as_u64().unwrap();
        }
    }
    assert_eq!(rows, TICKETS_ROWS as u64);
    let (_, out, err) = sluice(
        &moto,
        &p,
        &[
            "query",
            "SELECT count(*) AS n FROM support_tickets",
            "--format",
            "csv",
        ],
    );
    assert!(out.contains(&format!("\n{TICKETS_ROWS}")), "{out}{err}");

    // Glue: the Delta table over its manifests, as Spectrum and Athena read it.
    let t = moto
        .glue_table("analytics", "support_tickets")
        .expect("support_tickets in Glue");
    let sd = t.storage_descriptor().unwrap();
    assert_eq!(
        sd.input_format(),
        Some("org.apache.hadoop.hive.ql.io.SymlinkTextInputFormat")
    );
    assert_eq!(
        sd.location(),
        Some("s3://lake/data/processed/support_tickets/_symlink_format_manifest/")
    );
    let manifests = moto.keys(
        "lake",
        "data/processed/support_tickets/_symlink_format_manifest",
    );
    let partitions = moto.partitions("analytics", "support_tickets");
    assert_eq!(manifests.len(), partitions.len());
    assert!(!manifests.is_empty());
    for key in &manifests {
        let body = moto.get("lake", key);
        for line in String::from_utf8_lossy(&body).lines() {
            assert!(
                line.starts_with("s3://lake/data/processed/support_tickets/event_date="),
                "{line}"
            );
            let data_key = line.strip_prefix("s3://lake/").unwrap();
            let dir = data_key.rsplit_once('/').unwrap().0;
            assert!(
                moto.keys("lake", dir).contains(&data_key.to_string()),
                "{line}"
            );
        }
    }
    // A plain Parquet table beside it keeps the Parquet input format.
    let logs = moto.glue_table("analytics", "app_logs").unwrap();
    assert_eq!(
        logs.storage_descriptor().unwrap().input_format(),
        Some("org.apache.hadoop.hive.ql.io.parquet.MapredParquetInputFormat")
    );
}

#[test]
fn a_row_moving_partition_deregisters_the_emptied_one_of_a_delta_table() {
    crate::aws::a_row_moving_partition_deregisters_the_emptied_one(true);
}

#[test]
fn delta_partition_values_are_unescaped_in_the_log_and_read_back_exactly() {
    use crate::hive::{VALUES, assert_sluice_reads_tags, assert_tags, tagged_project};
    let p = tagged_project("\nformat = \"delta\"");
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    let table = p.lake().join("processed/events_clean");
    // The log holds each value as it is, and the path of its file escaped twice: the folder
    // is Hive-escaped, and the path a URI (as Spark writes it).
    let log = std::fs::read_to_string(table.join("_delta_log/00000000000000000001.json")).unwrap();
    let adds: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter_map(|a| a.get("add").cloned())
        .collect();
    assert_eq!(adds.len(), VALUES.len());
    for a in &adds {
        let tag = a["partitionValues"]["tag"].as_str().unwrap();
        assert!(VALUES.contains(&tag), "{a}");
    }
    let colon = adds
        .iter()
        .find(|a| a["partitionValues"]["tag"] == "c:d=e")
        .unwrap();
    assert!(
        colon["path"]
            .as_str()
            .unwrap()
            .starts_with("tag=c%253Ad%253De/"),
        "{colon}"
    );
    assert_sluice_reads_tags(&p);
    // The deltalake Python package reads every value back.
    let script = "import json, sys, os\n\
        from deltalake import DeltaTable\n\
        t = DeltaTable(sys.argv[1]).to_pyarrow_table()\n\
        print(json.dumps(list(zip(t.column('id').to_pylist(), t.column('tag').to_pylist()))))\n\
        sys.stdout.flush()\n\
        os._exit(0)\n";
    let out = Command::new(python())
        .arg("-c")
        .arg(script)
        .arg(&table)
        .output()
        .unwrap();
    assert!(out.status.success(), "python: {}", text(&out));
    assert_tags("deltalake", &serde_json::from_slice(&out.stdout).unwrap());
}

/// The actions of one commit of the table at `table`: each line of its log file, parsed.
fn log_actions(table: &std::path::Path, version: u64) -> Vec<Value> {
    let path = table.join(format!("_delta_log/{version:020}.json"));
    let log = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    log.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .collect()
}

/// The `add` actions of a commit, each with its `stats` parsed.
fn adds(table: &std::path::Path, version: u64) -> Vec<Value> {
    log_actions(table, version)
        .into_iter()
        .filter_map(|a| a.get("add").cloned())
        .map(|mut a| {
            let stats = a["stats"].as_str().expect("stats in every add").to_string();
            a["stats"] = serde_json::from_str(&stats).unwrap();
            a
        })
        .collect()
}

/// A commit's operation and its parameters (`commitInfo`).
fn operation(table: &std::path::Path, version: u64) -> (String, Value) {
    let info = log_actions(table, version)
        .into_iter()
        .find_map(|a| a.get("commitInfo").cloned())
        .unwrap();
    (
        info["operation"].as_str().unwrap().to_string(),
        info["operationParameters"].clone(),
    )
}

#[test]
fn delta_adds_carry_the_statistics_readers_skip_files_by() {
    let p = delta_project();
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report}");
    let table = p.lake().join("processed/support_tickets");
    let added = adds(&table, 1);
    // What the data holds, partition by partition (one file each in this batch).
    let held = count(
        &p,
        "SELECT CAST(event_date AS VARCHAR) AS d, count(*) AS n, min(ticket_id) AS min_id, \
         max(ticket_id) AS max_id, CAST(min(created_ts) AS VARCHAR) AS min_created, \
         CAST(max(updated_ts) AS VARCHAR) AS max_updated, count(*) - count(agent_id) AS no_agent \
         FROM support_tickets GROUP BY event_date ORDER BY d",
        None,
    );
    assert_eq!(added.len(), held.len(), "{added:?}");
    for h in &held {
        let d = h["d"].as_str().unwrap();
        let a = added
            .iter()
            .find(|a| a["partitionValues"]["event_date"] == d)
            .unwrap_or_else(|| panic!("no add for {d}: {added:?}"));
        let s = &a["stats"];
        assert_eq!(s["numRecords"], h["n"], "{a}");
        assert_eq!(s["minValues"]["ticket_id"], h["min_id"], "{a}");
        assert_eq!(s["maxValues"]["ticket_id"], h["max_id"], "{a}");
        // Timestamps (without time zone here) at millisecond precision, as the protocol has them.
        let min_created = format!("{}.000", h["min_created"].as_str().unwrap());
        assert_eq!(s["minValues"]["created_ts"], min_created.as_str(), "{a}");
        let max_updated = format!("{}.000", h["max_updated"].as_str().unwrap());
        assert_eq!(s["maxValues"]["updated_ts"], max_updated.as_str(), "{a}");
        assert_eq!(s["nullCount"]["agent_id"], h["no_agent"], "{a}");
        assert_eq!(s["nullCount"]["status"], 0, "{a}");
        // The partition column is in partitionValues, not in the statistics.
        for part in ["minValues", "maxValues", "nullCount"] {
            assert!(s[part].get("event_date").is_none(), "{a}");
        }
        // Long strings are cut to a 32-character prefix; a cut maximum gets a tie-breaker
        // above what it cut off.
        let body_min = s["minValues"]["body"].as_str().unwrap();
        let body_max = s["maxValues"]["body"].as_str().unwrap();
        assert!(body_min.chars().count() <= 32, "{body_min:?}");
        assert!(
            body_max.chars().count() <= 32 || body_max.ends_with('\u{7f}'),
            "{body_max:?}"
        );
    }
    assert!(
        held.iter().any(|h| h["no_agent"].as_u64().unwrap() > 0),
        "a null to count: {held:?}"
    );
    // The rejected table's files have statistics too.
    let rejected = adds(&p.lake().join("rejected/support_tickets"), 1);
    let rows: u64 = rejected
        .iter()
        .map(|a| a["stats"]["numRecords"].as_u64().unwrap())
        .sum();
    assert_eq!(rows, TICKETS_REJECTED as u64);

    // delta-rs' Python package sees them, and its pyarrow dataset skips files by them.
    let first = held[0]["min_id"].as_str().unwrap();
    let script = format!(
        "import json, sys, os\n\
         import pyarrow as pa, pyarrow.dataset as ds\n\
         from deltalake import DeltaTable\n\
         dt = DeltaTable(sys.argv[1])\n\
         a = pa.table(dt.get_add_actions(flatten=True))\n\
         d = dt.to_pyarrow_dataset()\n\
         hit = d.get_fragments(filter=ds.field('ticket_id') == '{first}')\n\
         print(json.dumps({{'records': a.column('num_records').to_pylist(), \
           'min_id': a.column('min.ticket_id').to_pylist(), \
           'max_id': a.column('max.ticket_id').to_pylist(), \
           'files': len(list(d.get_fragments())), 'hit': len(list(hit)), \
           'rows': d.to_table(filter=ds.field('ticket_id') == '{first}').num_rows}}))\n\
         sys.stdout.flush()\n\
         os._exit(0)\n"
    );
    let out = Command::new(python())
        .arg("-c")
        .arg(script)
        .arg(&table)
        .output()
        .unwrap();
    assert!(out.status.success(), "python: {}", text(&out));
    let py: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut records: Vec<u64> = py["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    records.sort();
    let mut expected: Vec<u64> = held.iter().map(|h| h["n"].as_u64().unwrap()).collect();
    expected.sort();
    assert_eq!(records, expected, "{py}");
    let mut min_ids: Vec<&str> = py["min_id"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    min_ids.sort();
    let mut expected: Vec<&str> = held.iter().map(|h| h["min_id"].as_str().unwrap()).collect();
    expected.sort();
    assert_eq!(min_ids, expected, "{py}");
    assert_eq!(py["files"], held.len(), "{py}");
    assert_eq!(py["hit"], 1, "one file can hold {first}: {py}");
    assert_eq!(py["rows"], 1, "{py}");
}

#[test]
fn a_commit_that_replaces_rows_is_a_merge_and_one_that_only_adds_an_append() {
    let p = Project::single_table(
        "events",
        "jsonl",
        r#"[{ name = "id", type = "int64" }, { name = "day", type = "string" }, { name = "v", type = "int64" }]"#,
        "SELECT id, day, v, _source_file, _source_row FROM events",
    );
    p.edit_config(
        "source = \"events\"",
        "source = \"events\"\nformat = \"delta\"\npartition_by = [\"day\"]\n\
         unique_key = [\"id\"]\norder_by = \"v\"",
    );
    p.add_raw(
        "events",
        "e0.jsonl",
        b"{\"id\": 1, \"day\": \"d1\", \"v\": 1}\n{\"id\": 2, \"day\": \"d1\", \"v\": 1}\n\
          {\"id\": 3, \"day\": \"d2\", \"v\": 1}\n",
    );
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report}");
    let table = p.lake().join("processed/events_clean");
    let (op, params) = operation(&table, 1);
    assert_eq!(op, "WRITE", "{params}");
    assert_eq!(params["mode"], "Append", "{params}");
    // A new key only: another append.
    p.add_raw(
        "events",
        "e1.jsonl",
        b"{\"id\": 4, \"day\": \"d2\", \"v\": 1}\n",
    );
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report}");
    let (op, params) = operation(&table, 2);
    assert_eq!(op, "WRITE", "{params}");
    assert_eq!(params["mode"], "Append", "{params}");
    assert!(
        log_actions(&table, 2)
            .iter()
            .all(|a| a.get("remove").is_none())
    );
    // A newer row of key 2: the file that held it is rewritten without it (removed, and added
    // again with the row it keeps); the new row goes to a file of its own.
    p.add_raw(
        "events",
        "e2.jsonl",
        b"{\"id\": 2, \"day\": \"d1\", \"v\": 5}\n",
    );
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report}");
    assert_eq!(
        report["tables"]["events_clean"]["rows_replaced"], 1,
        "{report}"
    );
    let actions = log_actions(&table, 3);
    assert!(
        actions.iter().any(|a| a.get("remove").is_some()),
        "{actions:?}"
    );
    let (op, params) = operation(&table, 3);
    assert_eq!(op, "MERGE", "{params}");
    assert!(params.get("mode").is_none(), "{params}");
    // The new files' statistics hold what they have: the new row in a file of its own, the
    // rewritten file the row it kept (rows of other files are never merged in).
    let mut d1: Vec<(u64, u64, u64)> = adds(&table, 3)
        .into_iter()
        .filter(|a| a["partitionValues"]["day"] == "d1")
        .map(|a| {
            let s = &a["stats"];
            (
                s["numRecords"].as_u64().unwrap(),
                s["minValues"]["id"].as_u64().unwrap(),
                s["maxValues"]["v"].as_u64().unwrap(),
            )
        })
        .collect();
    d1.sort();
    assert_eq!(d1, [(1, 1, 1), (1, 2, 5)]);
    // delta-rs' Python package reads the same history.
    let script = "import json, sys, os\n\
        from deltalake import DeltaTable\n\
        h = DeltaTable(sys.argv[1]).history()\n\
        print(json.dumps({str(c['version']): [c['operation'], c.get('operationParameters', {}).get('mode')] for c in h}))\n\
        sys.stdout.flush()\n\
        os._exit(0)\n";
    let out = Command::new(python())
        .arg("-c")
        .arg(script)
        .arg(&table)
        .output()
        .unwrap();
    assert!(out.status.success(), "python: {}", text(&out));
    let h: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(h["1"], serde_json::json!(["WRITE", "Append"]), "{h}");
    assert_eq!(h["2"], serde_json::json!(["WRITE", "Append"]), "{h}");
    assert_eq!(h["3"][0], "MERGE", "{h}");
}
