//! Hive partition folders: values escaped exactly as Hive escapes them (`c:d=e` ->
//! `c%3Ad%3De`, non-ASCII kept), and read back exactly by DuckDB, pyarrow and sluice.

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::{Value, json};

use crate::support::*;

/// Partition values with each character Hive escapes, and some it does not.
pub const VALUES: &[&str] = &[
    "c:d=e", "a/b", "é#1?", "50%", "x y", "t\u{1}ab", "q\"q", "s'q", "st*r", "[br]", "{c}", "ca^t",
    "b\\s", "a<b>|~}`", "plain",
];

/// The folder Hive (and Spark) names for each of [`VALUES`].
const FOLDERS: &[&str] = &[
    "tag=c%3Ad%3De",
    "tag=a%2Fb",
    "tag=é%231%3F",
    "tag=50%25",
    "tag=x y",
    "tag=t%01ab",
    "tag=q%22q",
    "tag=s%27q",
    "tag=st%2Ar",
    "tag=%5Bbr%5D",
    "tag=%7Bc}",
    "tag=ca%5Et",
    "tag=b%5Cs",
    "tag=a<b>|~}`",
    "tag=plain",
];

/// A table `events_clean` partitioned by a string `tag`, one row (`id` = its index) for each
/// of [`VALUES`] in `raw/`.
pub fn tagged_project(extra: &str) -> Project {
    let p = Project::single_table(
        "events",
        "jsonl",
        r#"[{ name = "id", type = "int64" }, { name = "tag", type = "string" }]"#,
        "SELECT id, tag, _source_file, _source_row FROM events",
    );
    p.edit_config(
        "source = \"events\"",
        &format!("source = \"events\"\npartition_by = [\"tag\"]{extra}"),
    );
    let lines: String = VALUES
        .iter()
        .enumerate()
        .map(|(i, v)| format!("{}\n", json!({"id": i, "tag": v})))
        .collect();
    p.add_raw("events", "e.jsonl", lines.as_bytes());
    p
}

/// Rows `[id, tag]` as JSON, checked to be exactly one per value, each with its own tag.
pub fn assert_tags(reader: &str, rows: &Value) {
    let mut got: Vec<(u64, String)> = rows
        .as_array()
        .unwrap_or_else(|| panic!("{reader}: {rows}"))
        .iter()
        .map(|r| (r[0].as_u64().unwrap(), r[1].as_str().unwrap().to_string()))
        .collect();
    got.sort();
    let want: Vec<(u64, String)> = VALUES
        .iter()
        .enumerate()
        .map(|(i, v)| (i as u64, v.to_string()))
        .collect();
    assert_eq!(got, want, "{reader} reads these partition values");
}

/// `sluice query` as JSON rows.
pub fn query(p: &Project, sql: &str) -> Vec<Value> {
    let out = p.sluice(&["query", sql, "--format", "json"]);
    assert!(out.status.success(), "{sql}: {}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every value reads back from `sluice query`, whole and by `tag = '...'` (a filter DataFusion
/// may turn into a listing of the value's folder).
pub fn assert_sluice_reads_tags(p: &Project) {
    let rows: Vec<Value> = query(p, "SELECT id, tag FROM events_clean")
        .iter()
        .map(|r| json!([r["id"], r["tag"]]))
        .collect();
    assert_tags("sluice", &Value::Array(rows));
    for (i, v) in VALUES.iter().enumerate() {
        let sql = format!(
            "SELECT id FROM events_clean WHERE tag = '{}'",
            v.replace('\'', "''")
        );
        let ids: Vec<Value> = query(p, &sql)
            .into_iter()
            .map(|r| r["id"].clone())
            .collect();
        assert_eq!(ids, vec![json!(i)], "{sql}");
    }
}

#[test]
fn partition_values_are_hive_escaped_and_read_back_by_duckdb_pyarrow_and_sluice() {
    let p = tagged_project("");
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(
        report["tables"]["events_clean"]["rows_written"],
        VALUES.len(),
        "{report:#}"
    );
    // The folders on disk are Hive's names, nothing more, nothing less.
    let root = p.lake().join("processed/events_clean");
    let folders: BTreeSet<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let want: BTreeSet<String> = FOLDERS.iter().map(|f| f.to_string()).collect();
    assert_eq!(folders, want);

    let script = "import json, sys\n\
        import duckdb, pyarrow.dataset as ds\n\
        root = sys.argv[1]\n\
        con = duckdb.connect()\n\
        d = con.execute(\"SELECT id, tag FROM read_parquet(? || '/**/*.parquet', \
          hive_partitioning = true)\", [root]).fetchall()\n\
        t = ds.dataset(root, format='parquet', partitioning='hive').to_table()\n\
        a = list(zip(t.column('id').to_pylist(), t.column('tag').to_pylist()))\n\
        print(json.dumps({'duckdb': d, 'pyarrow': a}))\n";
    let out = Command::new(python())
        .arg("-c")
        .arg(script)
        .arg(&root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python with duckdb and pyarrow (`bash .ci/run` installs them): {}",
        text(&out)
    );
    let read: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_tags("DuckDB", &read["duckdb"]);
    assert_tags("pyarrow", &read["pyarrow"]);
    assert_sluice_reads_tags(&p);
}
