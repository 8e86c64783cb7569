//! Parquet input, schema evolution of a table, and the `--lake` override.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, Int32Array, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;

use crate::support::*;

#[test]
fn parquet_input_is_read_by_name_and_cast_to_the_schema() {
    let p = Project::single_table(
        "scores",
        "parquet",
        "[{ name = \"id\", type = \"int64\" }, { name = \"name\", type = \"string\" }, { name = \"score\", type = \"float64\" }]",
        "SELECT id, upper(name) AS name, score, CASE WHEN name IS NULL THEN 'missing name' END AS _reject_reason, _source_file, _source_row FROM scores",
    );
    // The file has the columns in another order, score as Int32, and an extra column.
    let schema = Arc::new(Schema::new(vec![
        Field::new("score", DataType::Int32, true),
        Field::new("extra", DataType::Utf8, true),
        Field::new("name", DataType::Utf8, true),
        Field::new("id", DataType::Int64, true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int32Array::from(vec![Some(7), None, Some(9)])) as ArrayRef,
            Arc::new(StringArray::from(vec!["x", "y", "z"])),
            Arc::new(StringArray::from(vec![Some("ann"), Some("bo"), None])),
            Arc::new(Int64Array::from(vec![1, 2, 3])),
        ],
    )
    .unwrap();
    let mut buf = Vec::new();
    let mut w = ArrowWriter::try_new(&mut buf, schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    p.add_raw("scores", "part-0.parquet", &buf);
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(
        file_counts(&report)["scores/part-0.parquet"],
        ("processed".into(), 3, 2, 1, 0)
    );
    assert_eq!(
        p.strings("processed/scores_clean", "name"),
        vec![Some("ANN".to_string()), Some("BO".to_string())]
    );
    assert_eq!(
        p.strings("processed/scores_clean", "score"),
        vec![Some("7.0".to_string()), None]
    );
    let rows = p.strings("rejected/scores_clean", "_source_row");
    assert_eq!(rows, vec![Some("3".to_string())]);
}

#[test]
fn a_new_column_evolves_the_table_and_a_type_change_stops_before_writing() {
    let p = Project::empty();
    p.add_fixture("support_tickets", "2024-03-01.csv");
    assert_eq!(p.run().0, 0);
    let q = p.path().join("queries/support_tickets.sql");
    let sql = std::fs::read_to_string(&q).unwrap();
    let wider = sql.replace(
        "  agent_id,\n  CAST",
        "  agent_id,\n  length(body) AS body_length,\n  CAST",
    );
    assert_ne!(wider, sql);
    std::fs::write(&q, &wider).unwrap();
    p.add_fixture("support_tickets", "2024-03-02.csv");
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    let out = p.sluice(&[
        "query",
        "SELECT count(*) AS n, count(body_length) AS with_length FROM support_tickets",
        "--format",
        "json",
    ]);
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out)));
    let n = v[0]["n"].as_u64().unwrap();
    let with_length = v[0]["with_length"].as_u64().unwrap();
    assert!(with_length > 300 && with_length < n, "{v}");

    // priority becomes a number: incompatible, nothing written, the file stays in raw/.
    std::fs::write(
        &q,
        wider.replace(
            "lower(priority) AS priority",
            "length(priority) AS priority",
        ),
    )
    .unwrap();
    let before = p.files("processed");
    p.add_fixture("support_tickets", "2024-03-03.csv.gz");
    let (code, report) = p.run();
    assert_eq!(code, 1);
    let err = report["files"][0]["error"].as_str().unwrap();
    assert!(
        err.contains("column priority changed type from Utf8 to Int32"),
        "{err}"
    );
    assert_eq!(p.files("processed"), before);
    assert_eq!(
        p.files("raw"),
        vec!["raw/support_tickets/2024-03-03.csv.gz"]
    );
    // Fixed: processed.
    std::fs::write(&q, &wider).unwrap();
    assert_eq!(p.run().0, 0);
    assert!(p.files("raw").is_empty());
}

#[test]
fn the_lake_flag_overrides_the_config() {
    let p = Project::empty();
    let other = p.path().join("elsewhere");
    std::fs::create_dir_all(other.join("raw/app_logs")).unwrap();
    std::fs::copy(
        repo().join("fixtures/raw/app_logs/2024-03-01.jsonl"),
        other.join("raw/app_logs/a.jsonl"),
    )
    .unwrap();
    let out = p.sluice(&["--lake", other.to_str().unwrap(), "run"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(other.join("processed/app_logs").exists());
    assert!(p.files("processed").is_empty());
}

#[test]
fn a_query_can_drop_duplicates_within_the_batch_with_sql() {
    let p = Project::single_table(
        "ev",
        "jsonl",
        "[{ name = \"id\", type = \"string\" }, { name = \"v\", type = \"int64\" }]",
        "SELECT id, v, row_number() OVER (PARTITION BY id ORDER BY v DESC) > 1 AS _duplicate, \
         _source_file, _source_row FROM ev",
    );
    p.add_raw(
        "ev",
        "a.jsonl",
        b"{\"id\":\"x\",\"v\":1}\n{\"id\":\"x\",\"v\":3}\n{\"id\":\"y\",\"v\":2}\n",
    );
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(
        file_counts(&report)["ev/a.jsonl"],
        ("processed".into(), 3, 2, 0, 1)
    );
    let mut v = p.strings("processed/ev_clean", "v");
    v.sort();
    assert_eq!(v, vec![Some("2".to_string()), Some("3".to_string())]);
}
