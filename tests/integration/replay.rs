//! `sluice reprocess`: a table re-derived from its archived raw files with the current query.
//! Exactly the rows (and rejected rows) of the replayed files change; with `unique_key` the
//! replayed rows meet the other files' rows by `order_by`; a replay with an unchanged query
//! gives the same tables; a crash at any step, then a rerun, gives the uninterrupted result;
//! on plain and Delta tables, on a folder and on S3 (moto).

use std::collections::BTreeMap;

use serde_json::Value;

use crate::support::*;

/// `sluice query --format json`, each row as its JSON text, sorted.
fn rows(p: &Project, sql: &str) -> Vec<String> {
    let out = p.sluice(&["query", sql, "--format", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    let v: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut rows: Vec<String> = v.iter().map(|r| r.to_string()).collect();
    rows.sort();
    rows
}

/// `sluice reprocess <args> --json`: the report (the command must succeed).
fn reprocess(p: &Project, args: &[&str]) -> Value {
    let mut all = vec!["reprocess"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = p.sluice(&all);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
}

/// Every replayed file balances: read = written + rejected + duplicate.
fn balanced(report: &Value) {
    for f in report["files"].as_array().unwrap() {
        let n = |k: &str| f[k].as_u64().unwrap();
        assert_eq!(
            n("rows_read"),
            n("rows_written") + n("rows_rejected") + n("rows_duplicate"),
            "{f}"
        );
    }
}

/// The lake's files (not sluice's own state), with their sizes.
fn lake_files(p: &Project) -> BTreeMap<String, u64> {
    ["processed", "rejected", "warehouse", "archive", "raw"]
        .iter()
        .flat_map(|d| p.files(d))
        .map(|f| {
            let size = std::fs::metadata(p.lake().join(&f)).unwrap().len();
            (f, size)
        })
        .collect()
}

/// A keyless table of orders: `id,name,amount`; the first query cannot read amounts with a
/// thousands separator, the fixed one can (and upper-cases names, to tell its rows apart).
const BROKEN: &str = "SELECT id, name, TRY_CAST(amount AS BIGINT) AS amount,
  CASE WHEN TRY_CAST(amount AS BIGINT) IS NULL THEN 'bad amount: ' || amount END AS _reject_reason,
  _source_file, _source_row FROM orders";
const FIXED: &str = "SELECT id, upper(name) AS name, TRY_CAST(replace(amount, ',', '') AS BIGINT) AS amount,
  CASE WHEN TRY_CAST(replace(amount, ',', '') AS BIGINT) IS NULL THEN 'bad amount: ' || amount END AS _reject_reason,
  _source_file, _source_row FROM orders";

fn orders_project(format: &str) -> Project {
    let p = Project::single_table(
        "orders",
        "csv",
        r#"[{ name = "id", type = "int64" }, { name = "name", type = "string" }, { name = "amount", type = "string" }]"#,
        BROKEN,
    );
    if format == "delta" {
        p.edit_config(
            "query = \"orders.sql\"",
            "query = \"orders.sql\"\nformat = \"delta\"",
        );
    }
    p.add_raw(
        "orders",
        "a.csv",
        b"id,name,amount\n1,ann,10\n2,bob,\"1,200\"\n3,cy,30\n4,di,x\n",
    );
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    p.add_raw(
        "orders",
        "b.csv",
        b"id,name,amount\n5,ed,50\n6,flo,\"2,500\"\n",
    );
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    p
}

/// The orders table as `id name amount source`, sorted.
fn orders(p: &Project) -> Vec<String> {
    let mut v = rows(
        p,
        "SELECT id, name, amount, _sluice_source FROM orders_clean",
    );
    v.sort_by_key(|r| serde_json::from_str::<Value>(r).unwrap()["id"].as_i64());
    v
}

fn order(id: i64, name: &str, amount: i64, file: &str) -> String {
    serde_json::json!({"id": id, "name": name, "amount": amount, "_sluice_source": format!("raw/orders/{file}")})
        .to_string()
}

fn rejected(p: &Project) -> Vec<String> {
    rows(
        p,
        "SELECT _source_file, _source_row, _reject_reason FROM orders_clean_rejected",
    )
}

/// Expected rows, sorted as [`rows`] sorts them.
fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn reject(file: &str, row: i64, reason: &str) -> String {
    serde_json::json!({"_source_file": format!("raw/orders/{file}"), "_source_row": row, "_reject_reason": reason})
        .to_string()
}

fn replays_only_the_chosen_files(format: &str) {
    let p = orders_project(format);
    let before_rows = orders(&p);
    assert_eq!(
        before_rows,
        vec![
            order(1, "ann", 10, "a.csv"),
            order(3, "cy", 30, "a.csv"),
            order(5, "ed", 50, "b.csv")
        ]
    );
    std::fs::write(p.path().join("orders.sql"), FIXED).unwrap();

    // A dry run computes what would change and writes nothing.
    let files = lake_files(&p);
    let dry = reprocess(&p, &["orders_clean", "--files", "a.csv", "--dry-run"]);
    assert_eq!(lake_files(&p), files, "a dry run writes nothing");
    assert_eq!(orders(&p), before_rows);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["files"].as_array().unwrap().len(), 1, "{dry:#}");
    assert_eq!(dry["files"][0]["key"], "raw/orders/a.csv");
    assert_eq!(dry["rows_removed"], 2, "{dry:#}");
    assert_eq!(dry["rows_added"], 3, "{dry:#}");
    assert_eq!(dry["rejected_removed"], 2, "{dry:#}");
    assert_eq!(dry["rejected_added"], 1, "{dry:#}");
    balanced(&dry);

    // The replay: a.csv's rows by the fixed query, b.csv's untouched.
    let done = reprocess(&p, &["orders_clean", "--files", "a.csv"]);
    assert!(done["commit"].is_string(), "{done:#}");
    for k in [
        "rows_removed",
        "rows_added",
        "rejected_removed",
        "rejected_added",
    ] {
        assert_eq!(done[k], dry[k], "{k}: the dry run said what the replay did");
    }
    balanced(&done);
    assert_eq!(
        orders(&p),
        vec![
            order(1, "ANN", 10, "a.csv"),
            order(2, "BOB", 1200, "a.csv"),
            order(3, "CY", 30, "a.csv"),
            order(5, "ed", 50, "b.csv")
        ]
    );
    assert_eq!(
        rejected(&p),
        sorted(vec![
            reject("a.csv", 5, "bad amount: x"),
            reject("b.csv", 3, "bad amount: 2,500")
        ])
    );
    // The raw files stay archived; a run after it finds nothing to do.
    assert_eq!(p.files("archive").len(), 2);
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    assert!(report["files"].as_array().unwrap().is_empty(), "{report:#}");

    // Every file: b.csv's rows too.
    let all = reprocess(&p, &["orders_clean"]);
    balanced(&all);
    assert_eq!(all["files"].as_array().unwrap().len(), 2);
    assert_eq!(
        orders(&p),
        vec![
            order(1, "ANN", 10, "a.csv"),
            order(2, "BOB", 1200, "a.csv"),
            order(3, "CY", 30, "a.csv"),
            order(5, "ED", 50, "b.csv"),
            order(6, "FLO", 2500, "b.csv")
        ]
    );
    assert_eq!(rejected(&p), vec![reject("a.csv", 5, "bad amount: x")]);
    // New files still go their normal way.
    p.add_raw("orders", "c.csv", b"id,name,amount\n7,gus,\"7,000\"\n");
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(orders(&p).len(), 6);
}

#[test]
fn a_replay_replaces_exactly_the_rows_of_the_chosen_files() {
    replays_only_the_chosen_files("parquet");
}

#[cfg(feature = "delta")]
#[test]
fn a_replay_of_a_delta_table_is_one_delta_commit() {
    replays_only_the_chosen_files("delta");
    // One more commit per replay, each with the pipeline's transaction.
    let p = orders_project("delta");
    let log = p.lake().join("processed/orders_clean/_delta_log");
    let versions = |dir: &std::path::Path| {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".json")
            })
            .count()
    };
    let before = versions(&log);
    std::fs::write(p.path().join("orders.sql"), FIXED).unwrap();
    reprocess(&p, &["orders_clean"]);
    assert_eq!(versions(&log), before + 1, "one Delta commit");
    let last = std::fs::read_to_string(log.join(format!("{:020}.json", before))).unwrap();
    assert!(last.contains("\"txn\""), "{last}");
    assert!(last.contains("\"remove\""), "{last}");
    // The deltalake package reads the replayed table.
    let script = "import json, sys\nfrom deltalake import DeltaTable\n\
                  t = DeltaTable(sys.argv[1]).to_pyarrow_table()\n\
                  print(json.dumps(sorted([[i, n, a] for i, n, a in zip(t.column('id').to_pylist(), t.column('name').to_pylist(), t.column('amount').to_pylist())])))\n\
                  sys.stdout.flush()\nimport os\nos._exit(0)\n";
    let out = std::process::Command::new(python())
        .arg("-c")
        .arg(script)
        .arg(p.lake().join("processed/orders_clean"))
        .output()
        .unwrap();
    assert!(out.status.success(), "python: {}", text(&out));
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        got,
        serde_json::json!([
            [1, "ANN", 10],
            [2, "BOB", 1200],
            [3, "CY", 30],
            [5, "ED", 50],
            [6, "FLO", 2500]
        ])
    );
}

/// Every table of the example pipeline, row for row, with the aggregates.
fn snapshot(p: &Project) -> Vec<Vec<String>> {
    [
        "SELECT * FROM app_logs",
        "SELECT * FROM support_tickets",
        "SELECT * FROM app_logs_rejected",
        "SELECT * FROM support_tickets_rejected",
        "SELECT * FROM daily_ticket_stats",
        "SELECT * FROM daily_service_health",
    ]
    .iter()
    .map(|q| {
        // Aggregates of floats: the sum's order follows the files' (the last bits differ).
        let mut v: Vec<String> = rows(p, q)
            .iter()
            .map(|r| {
                let mut row: serde_json::Map<String, Value> = serde_json::from_str(r).unwrap();
                for x in row.values_mut() {
                    if let Some(f) = x.as_f64().filter(|_| x.is_f64()) {
                        *x = Value::String(format!("{f:.9}"));
                    }
                }
                Value::Object(row).to_string()
            })
            .collect();
        v.sort();
        v
    })
    .collect()
}

#[test]
fn a_replay_with_an_unchanged_query_gives_the_same_tables() {
    let p = Project::with_fixtures();
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    let before = snapshot(&p);
    assert!(
        before[0]
            .iter()
            .all(|r| r.contains("\"_sluice_source\":\"raw/app_logs/"))
    );
    for t in ["app_logs", "support_tickets"] {
        let r = reprocess(&p, &[t]);
        balanced(&r);
        assert!(!r["files"].as_array().unwrap().is_empty(), "{r:#}");
        let read: u64 = r["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["rows_read"].as_u64().unwrap())
            .sum();
        assert!(read > 0);
    }
    let after = snapshot(&p);
    for (i, (a, b)) in after.iter().zip(&before).enumerate() {
        let only_after: Vec<&String> = a.iter().filter(|r| !b.contains(r)).take(3).collect();
        let only_before: Vec<&String> = b.iter().filter(|r| !a.contains(r)).take(3).collect();
        assert!(
            only_after.is_empty() && only_before.is_empty() && a.len() == b.len(),
            "table {i}: after only {only_after:?}\nbefore only {only_before:?}"
        );
    }
    assert_example_tables(&p);
    let (code, out) = index_check(&p);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn replayed_rows_meet_the_rows_of_later_files_by_order_by() {
    let p = Project::empty();
    // old.csv: tickets 0..10 at 09:00, open; new.csv (later): tickets 0..5 at 15:00, resolved.
    p.add_raw("support_tickets", "old.csv", &batch(0, 10, 2, 9, "open"));
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    p.add_raw(
        "support_tickets",
        "new.csv",
        &batch(0, 5, 2, 15, "resolved"),
    );
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    // The fixed query reads "open" as "pending" and rejects ticket 9 (a test account).
    let q = p.path().join("queries/support_tickets.sql");
    let sql = std::fs::read_to_string(&q).unwrap();
    let fixed = sql
        .replace(
            "replace(lower(trim(status)), ' ', '_') AS status",
            "CASE WHEN lower(trim(status)) = 'open' THEN 'pending' ELSE replace(lower(trim(status)), ' ', '_') END AS status",
        )
        .replace(
            "WHEN ticket_id IS NULL THEN 'missing ticket_id'",
            "WHEN ticket_id IS NULL THEN 'missing ticket_id'\n    WHEN ticket_id = 'T00009' THEN 'test account'",
        );
    assert_ne!(fixed, sql);
    std::fs::write(&q, fixed).unwrap();
    let r = reprocess(&p, &["support_tickets", "--files", "old.csv"]);
    balanced(&r);
    // Tickets 0..5 of old.csv lose to new.csv's later versions; 5..9 are re-derived; 9 is
    // rejected now, so it is gone from the table.
    assert_eq!(r["files"][0]["rows_duplicate"], 5, "{r:#}");
    assert_eq!(r["files"][0]["rows_rejected"], 1, "{r:#}");
    assert_eq!(r["rows_removed"], 5, "{r:#}");
    assert_eq!(r["rows_replaced"], 0, "{r:#}");
    let got = table(&p);
    let mut want: Vec<(String, String, String)> = (0..9)
        .map(|i| {
            let day = 1 + i % 2;
            let (status, hour) = if i < 5 {
                ("resolved", 15)
            } else {
                ("pending", 9)
            };
            (
                format!("T{i:05}"),
                status.to_string(),
                format!("2024-03-{day:02}T{hour:02}:00:00"),
            )
        })
        .collect();
    want.sort();
    assert_eq!(got, want);
    let (code, out) = index_check(&p);
    assert_eq!(code, 0, "{out}");
    // A later run replacing keys works on the rebuilt index.
    p.add_raw(
        "support_tickets",
        "later.csv",
        &batch(5, 2, 2, 18, "closed"),
    );
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    let got = table(&p);
    assert_eq!(got.len(), 9);
    assert!(got.iter().any(|(id, s, _)| id == "T00005" && s == "closed"));
    let (code, out) = index_check(&p);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn a_crash_at_any_step_of_a_replay_then_a_rerun_gives_the_uninterrupted_result() {
    let reference = orders_project("parquet");
    std::fs::write(reference.path().join("orders.sql"), FIXED).unwrap();
    reprocess(&reference, &["orders_clean"]);
    let want = (orders(&reference), rejected(&reference));
    for step in ["staged", "committed", "indexed", "published", "archived"] {
        let p = orders_project("parquet");
        std::fs::write(p.path().join("orders.sql"), FIXED).unwrap();
        let out = p.sluice(&["reprocess", "orders_clean", "--crash-at", step]);
        assert!(!out.status.success(), "{step}: the process crashed");
        // Recovery first (rolls the commit forward or throws it away), then the replay again.
        let (code, report) = p.run();
        assert_eq!(code, 0, "{step}: {report:#}");
        reprocess(&p, &["orders_clean"]);
        assert_eq!((orders(&p), rejected(&p)), want, "after a crash at {step}");
        assert!(p.files("_sluice/pending").is_empty(), "{step}");
        assert!(p.files("_sluice/staging").is_empty(), "{step}");
    }
}

#[test]
fn a_run_waits_while_a_replay_holds_the_commit_lock() {
    let p = orders_project("parquet");
    std::fs::write(p.path().join("orders.sql"), FIXED).unwrap();
    let (replay, pause) = held_at(
        &p,
        &["reprocess", "orders_clean", "--json"],
        "replay-planned",
    );
    // A run with a new file, while the replay holds the lock: it waits for it.
    p.add_raw("orders", "c.csv", b"id,name,amount\n7,gus,70\n");
    let run = p
        .cmd(&["run", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(
        orders(&p).len(),
        3,
        "nothing committed while the replay holds the lock"
    );
    std::fs::remove_file(&pause).unwrap();
    let out = replay.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let out = run.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    // The new file by the fixed query (the run came after), the replayed ones replaced.
    assert_eq!(
        orders(&p),
        vec![
            order(1, "ANN", 10, "a.csv"),
            order(2, "BOB", 1200, "a.csv"),
            order(3, "CY", 30, "a.csv"),
            order(5, "ED", 50, "b.csv"),
            order(6, "FLO", 2500, "b.csv"),
            order(7, "GUS", 70, "c.csv")
        ]
    );
}

#[test]
fn replays_that_cannot_be_done_say_why_and_write_nothing() {
    let p = orders_project("parquet");
    let files = lake_files(&p);
    // A table without lineage.
    let out = p.sluice(&["reprocess", "nope"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("no such table"), "{}", text(&out));
    // An archived file gone (a lifecycle rule deleted it).
    let archived = p.files("archive");
    let a = archived.iter().find(|f| f.ends_with("a.csv")).unwrap();
    let data = std::fs::read(p.lake().join(a)).unwrap();
    std::fs::remove_file(p.lake().join(a)).unwrap();
    let out = p.sluice(&["reprocess", "orders_clean"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("missing") && text(&out).contains("a.csv"),
        "{}",
        text(&out)
    );
    // One that changed since its commit.
    std::fs::write(p.lake().join(a), b"id,name,amount\n1,zed,1\n").unwrap();
    let out = p.sluice(&["reprocess", "orders_clean", "--files", "a.csv"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("SHA-256"), "{}", text(&out));
    std::fs::write(p.lake().join(a), data).unwrap();
    assert_eq!(lake_files(&p), files);
    // A bad glob.
    let out = p.sluice(&["reprocess", "orders_clean", "--files", "[a"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("--files"), "{}", text(&out));
    // Nothing selected: nothing to do.
    let r = reprocess(&p, &["orders_clean", "--since", "2999-01-01"]);
    assert!(r["files"].as_array().unwrap().is_empty());
    assert!(r["commit"].is_null());
    let out = p.sluice(&["reprocess", "orders_clean", "--since", "2999-01-01"]);
    assert!(out.status.success());
    assert!(text(&out).contains("nothing to replay"), "{}", text(&out));
    // A glob that matches no committed file is a mistake: said, with what the keys look like.
    let out = p.sluice(&["reprocess", "orders_clean", "--files", "z*.csv"]);
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(
        msg.contains("matches none") && msg.contains("a.csv"),
        "{msg}"
    );
    assert_eq!(lake_files(&p), files);
    // lineage = false.
    p.edit_config(
        "query = \"orders.sql\"",
        "query = \"orders.sql\"\nlineage = false",
    );
    let out = p.sluice(&["reprocess", "orders_clean"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("lineage"), "{}", text(&out));
}

#[test]
fn a_replay_is_audited_by_the_tables_data_checks() {
    let p = orders_project("parquet");
    let before = (orders(&p), rejected(&p));
    std::fs::write(
        p.path().join("no_big.sql"),
        "SELECT id, amount FROM orders_clean WHERE amount > 1000",
    )
    .unwrap();
    p.edit_config(
        "query = \"orders.sql\"",
        "query = \"orders.sql\"\n\n[[table.check]]\nname = \"no big orders\"\nsql = \"no_big.sql\"",
    );
    std::fs::write(p.path().join("orders.sql"), FIXED).unwrap();
    // The dry run shows the failing check; the replay stops before writing anything.
    let dry = reprocess(&p, &["orders_clean", "--dry-run"]);
    let check = &dry["checks"][0];
    assert_eq!(check["passed"], false, "{dry:#}");
    assert_eq!(check["rows"].as_array().unwrap().len(), 2, "{dry:#}");
    let out = p.sluice(&["reprocess", "orders_clean"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("no big orders"), "{}", text(&out));
    assert_eq!((orders(&p), rejected(&p)), before);
    assert!(p.files("_sluice/pending").is_empty());
    // A warn check reports and lets it through.
    p.edit_config(
        "sql = \"no_big.sql\"",
        "sql = \"no_big.sql\"\nseverity = \"warn\"",
    );
    let r = reprocess(&p, &["orders_clean"]);
    assert_eq!(r["checks"][0]["passed"], false);
    assert_eq!(orders(&p).len(), 5);
}

#[test]
fn a_replay_on_s3_replaces_the_rows_of_the_chosen_files() {
    replay_on_s3(false);
}

#[cfg(feature = "delta")]
#[test]
fn a_replay_of_a_delta_table_on_s3_replaces_the_rows_of_the_chosen_files() {
    replay_on_s3(true);
}

fn replay_on_s3(delta: bool) {
    let moto = crate::aws::Moto::start();
    let p = crate::aws::s3_project(&moto, "replay", "kind = \"lake\"");
    if delta {
        p.edit_config(
            "query = \"queries/app_logs.sql\"",
            "query = \"queries/app_logs.sql\"\nformat = \"delta\"",
        );
    }
    let (code, report) = crate::aws::run_json(&moto, &p, &[]);
    assert_eq!(code, 0, "{report:#}");
    let query = |sql: &str| {
        let (code, out, err) = crate::aws::sluice(&moto, &p, &["query", sql, "--format", "json"]);
        assert_eq!(code, 0, "{err}");
        let v: Vec<Value> = serde_json::from_str(&out).unwrap();
        let mut rows: Vec<String> = v.iter().map(|r| r.to_string()).collect();
        rows.sort();
        rows
    };
    let before = query("SELECT * FROM app_logs");
    let q = p.path().join("queries/app_logs.sql");
    let sql = std::fs::read_to_string(&q).unwrap();
    let (code, out, err) = crate::aws::sluice(&moto, &p, &["reprocess", "app_logs", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    balanced(&r);
    assert_eq!(
        query("SELECT * FROM app_logs"),
        before,
        "unchanged query, same table"
    );
    let sources = query("SELECT DISTINCT _sluice_source FROM app_logs");
    assert!(sources.len() >= 2, "{sources:?}");
    // Only one file, with a changed query: its rows change, the others' do not.
    let one = sources[0].clone();
    let one: Value = serde_json::from_str(&one).unwrap();
    let one = one["_sluice_source"].as_str().unwrap().to_string();
    let name = one.rsplit('/').next().unwrap().to_string();
    // The fixed query upper-cases the log level.
    let fixed = sql.replace(
        "  log_level,\n  service_name,",
        "  upper(log_level) AS log_level,\n  service_name,",
    );
    assert_ne!(fixed, sql);
    std::fs::write(&q, fixed).unwrap();
    let (code, out, err) = crate::aws::sluice(
        &moto,
        &p,
        &["reprocess", "app_logs", "--files", &name, "--json"],
    );
    assert_eq!(code, 0, "{out}{err}");
    let levels = query(
        "SELECT _sluice_source, count(*) FILTER (WHERE log_level = upper(log_level)) AS up, \
         count(*) AS n FROM app_logs GROUP BY _sluice_source",
    );
    for l in &levels {
        let v: Value = serde_json::from_str(l).unwrap();
        let want = if v["_sluice_source"] == one.as_str() {
            v["n"].clone()
        } else {
            serde_json::json!(0)
        };
        assert_eq!(v["up"], want, "{levels:?}");
    }
}

#[test]
fn on_an_equal_order_by_replayed_rows_keep_to_the_original_arrival_order() {
    let p = Project::empty();
    // old.csv: tickets 0..4 updated at 09:00; new.csv, later: tickets 0..2 at the same 09:00
    // with another status. On an equal order_by the later file wins: tickets 0, 1 pending.
    p.add_raw("support_tickets", "old.csv", &batch(0, 4, 2, 9, "open"));
    assert_eq!(p.run().0, 0);
    p.add_raw("support_tickets", "new.csv", &batch(0, 2, 2, 9, "pending"));
    assert_eq!(p.run().0, 0);
    let before = table(&p);
    let status: Vec<&str> = before.iter().map(|(_, s, _)| s.as_str()).collect();
    assert_eq!(status, ["pending", "pending", "open", "open"]);
    // Replaying the older file: its rows of tickets 0, 1 still lose to the later file's.
    let r = reprocess(&p, &["support_tickets", "--files", "old.csv"]);
    balanced(&r);
    assert_eq!(r["files"][0]["rows_duplicate"], 2, "{r:#}");
    assert_eq!(r["rows_replaced"], 0, "{r:#}");
    assert_eq!(table(&p), before);
    // Replaying the later file: its rows still win over the older file's.
    let r = reprocess(&p, &["support_tickets", "--files", "new.csv"]);
    balanced(&r);
    assert_eq!(r["files"][0]["rows_written"], 2, "{r:#}");
    assert_eq!(table(&p), before);
    let (code, out) = index_check(&p);
    assert_eq!(code, 0, "{out}");
}
