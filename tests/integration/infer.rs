//! Schemas drafted from samples (`schema infer`, `init --sample`) and samples checked against a
//! schema (`validate --sample`), on the shipped fixtures and on generated real-shaped files.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::NaiveDate;
use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::{Decimal128Type, Int64Type, TimestampMicrosecondType};

use crate::support::*;

/// A project made by `sluice init DIR --sample FILE` (in a fresh temp folder).
fn init(sample: &Path, extra: &[&str]) -> (Project, std::process::Output) {
    let p = Project {
        dir: tempfile::tempdir().unwrap(),
    };
    let mut args = vec![
        "init",
        p.path().to_str().unwrap(),
        "--sample",
        sample.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = p.sluice(&args);
    assert!(out.status.success(), "{}", text(&out));
    (p, out)
}

/// `schema infer FILE`: the schema's columns by name (the TOML parsed) and stderr.
fn infer_schema(file: &Path) -> (Vec<toml::Table>, String) {
    let out = std::process::Command::new(binary())
        .args(["schema", "infer"])
        .arg(file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let schema: toml::Table = toml::from_str(&String::from_utf8_lossy(&out.stdout))
        .unwrap_or_else(|e| panic!("{e}\n{}", text(&out)));
    let columns = schema["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_table().unwrap().clone())
        .collect();
    (columns, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A column of a drafted schema as (name, from, type, format).
fn column(c: &toml::Table) -> (String, Option<String>, String, Option<String>) {
    let s = |k: &str| c.get(k).and_then(|v| v.as_str()).map(str::to_string);
    (
        s("name").unwrap(),
        s("from"),
        s("type").unwrap(),
        s("format"),
    )
}

/// Rows the reader rejected whole (a `_raw_record`) in a rejected table, per source file name.
fn malformed_by_file(p: &Project, table: &str) -> BTreeMap<String, usize> {
    let prefix = format!("rejected/{table}");
    let files = p.strings(&prefix, "_source_file");
    let raw = p.strings(&prefix, "_raw_record");
    let mut out = BTreeMap::new();
    for (f, r) in files.into_iter().zip(raw) {
        if r.is_some() {
            let name = f.unwrap().rsplit('/').next().unwrap().to_string();
            *out.entry(name).or_default() += 1;
        }
    }
    out
}

/// Each fixture, drafted and run on its own, reads the rows (good and malformed) the
/// hand-written pipeline reads from it.
#[test]
fn drafted_schemas_read_every_fixture_row_the_hand_written_ones_read() {
    let hand = Project::with_fixtures();
    let (code, report) = hand.run();
    assert_eq!(code, 0);
    let counts = file_counts(&report);
    for (source, file) in [
        ("support_tickets", "2024-03-01.csv"),
        ("support_tickets", "2024-03-02.csv"),
        ("support_tickets", "2024-03-03.csv.gz"),
        ("app_logs", "2024-03-01.jsonl"),
        ("app_logs", "2024-03-02.jsonl.gz"),
        ("app_logs", "2024-03-03.jsonl.zst"),
    ] {
        let hand_read = counts[&format!("{source}/{file}")].1;
        let hand_malformed = malformed_by_file(&hand, source)
            .get(file)
            .copied()
            .unwrap_or(0);
        let sample = repo().join("fixtures/raw").join(source).join(file);
        let (p, _) = init(&sample, &["--name", source]);
        let out = p.sluice(&["validate"]);
        assert!(out.status.success(), "{file}: {}", text(&out));
        let (code, report) = p.run();
        assert_eq!(code, 0, "{file}: {report}");
        let got = file_counts(&report);
        assert_eq!(got.len(), 1, "{report}");
        let (status, read, ..) = &got[&format!("{source}/{file}")];
        assert_eq!(status, "processed");
        assert_eq!(*read, hand_read, "{file}: rows read");
        let malformed = malformed_by_file(&p, source)
            .get(file)
            .copied()
            .unwrap_or(0);
        assert_eq!(malformed, hand_malformed, "{file}: malformed rows");
    }
    // The known dirt: 3 malformed logs in the first file, 2 tickets in the second.
    assert_eq!(malformed_by_file(&hand, "app_logs")["2024-03-01.jsonl"], 3);
    assert_eq!(
        malformed_by_file(&hand, "support_tickets")["2024-03-02.csv"],
        2
    );
}

/// A CRM export's row `i`: (customer id, created, amount in cents, active, score).
fn crm_row(i: i64) -> (i64, chrono::NaiveDateTime, i64, bool, Option<i64>) {
    let created = NaiveDate::from_ymd_opt(2024, 1 + (i % 12) as u32, 1 + (i * 7 % 28) as u32)
        .unwrap()
        .and_hms_opt((i % 24) as u32, (i * 13 % 60) as u32, 0)
        .unwrap();
    let score = (i % 50 != 7).then_some(i % 5 + 1);
    (1000 + i, created, i * 3_737 % 1_000_000, i % 3 != 0, score)
}

/// A real-shaped CSV (a CRM export: spaces in the names, US dates without seconds, money with
/// two decimals, Yes/No, a few `n/a`) is drafted with the types and formats it needs, and the
/// drafted project stores the values exactly.
#[test]
fn a_crm_export_is_drafted_with_its_types_and_formats() {
    let n = 300;
    let mut csv = String::from("Customer ID,Created Date,Amount,Active,Score,Notes\n");
    for i in 0..n {
        let (id, created, cents, active, score) = crm_row(i);
        csv.push_str(&format!(
            "{id},{},{}.{:02},{},{},\"note {i}, with a comma\"\n",
            created.format("%m/%d/%Y %H:%M"),
            cents / 100,
            cents % 100,
            if active { "Yes" } else { "No" },
            score.map_or("n/a".to_string(), |s| s.to_string()),
        ));
    }
    let samples = tempfile::tempdir().unwrap();
    let file = samples.path().join("CRM Export.csv");
    std::fs::write(&file, &csv).unwrap();
    let (columns, stderr) = infer_schema(&file);
    let got: Vec<_> = columns.iter().map(column).collect();
    let want = [
        ("customer_id", "Customer ID", "int64", None),
        (
            "created_date",
            "Created Date",
            "timestamp",
            Some("%m/%d/%Y %H:%M"),
        ),
        ("amount", "Amount", "decimal(18,2)", None),
        ("active", "Active", "boolean", None),
        ("score", "Score", "string", None),
        ("notes", "Notes", "string", None),
    ];
    assert_eq!(got.len(), want.len(), "{got:?}");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(
            (g.0.as_str(), g.1.as_deref(), g.2.as_str(), g.3.as_deref()),
            (w.0, Some(w.1), w.2, w.3)
        );
    }
    let bad = (0..n).filter(|i| crm_row(*i).4.is_none()).count();
    assert_eq!(bad, 6);
    assert!(
        stderr.contains(&format!(
            "note: score: {bad} of {n} values are not integers: \"n/a\""
        )),
        "{stderr}"
    );

    // The drafted project stores every value, partitioned by the created date.
    let (p, _) = init(&file, &[]);
    assert!(p.path().join("schemas/crm_export.toml").exists());
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["files"][0]["rows_read"], n);
    assert_eq!(report["files"][0]["rows_written"], n);
    let mut rows = Vec::new();
    for b in p.read("processed/crm_export") {
        let id = b
            .column_by_name("customer_id")
            .unwrap()
            .as_primitive::<Int64Type>();
        let created = b
            .column_by_name("created_date")
            .unwrap()
            .as_primitive::<TimestampMicrosecondType>();
        let amount = b
            .column_by_name("amount")
            .unwrap()
            .as_primitive::<Decimal128Type>();
        let active = b.column_by_name("active").unwrap().as_boolean();
        let score = b.column_by_name("score").unwrap().as_string::<i32>();
        for r in 0..b.num_rows() {
            rows.push((
                id.value(r),
                created.value(r),
                amount.value(r) as i64,
                active.value(r),
                score.value(r).to_string(),
            ));
        }
    }
    rows.sort();
    let want: Vec<_> = (0..n)
        .map(|i| {
            let (id, created, cents, active, score) = crm_row(i);
            let score = score.map_or("n/a".to_string(), |s| s.to_string());
            (
                id,
                created.and_utc().timestamp_micros(),
                cents,
                active,
                score,
            )
        })
        .collect();
    assert_eq!(rows, want);
    let months: std::collections::BTreeSet<String> = (0..n)
        .map(|i| format!("event_date={}", crm_row(i).1.format("%Y-%m-%d")))
        .collect();
    let parts: std::collections::BTreeSet<String> = p
        .files("processed/crm_export")
        .iter()
        .filter_map(|f| f.split('/').nth(2).map(str::to_string))
        .collect();
    assert_eq!(parts, months);
}

/// A semicolon file (a quoted `;` inside a field, decimal commas as text) and a file without a
/// header are sniffed, drafted and read back whole.
#[test]
fn a_semicolon_file_and_a_headerless_file_are_sniffed() {
    let samples = tempfile::tempdir().unwrap();
    let semi = samples.path().join("orders.csv");
    let mut data = String::from("Order No;Customer;Total\n");
    for i in 0..50 {
        data.push_str(&format!(
            "{};\"Smith; J. {i}\";{},{:02}\n",
            100 + i,
            i * 3,
            i
        ));
    }
    std::fs::write(&semi, &data).unwrap();
    let (columns, _) = infer_schema(&semi);
    let got: Vec<_> = columns.iter().map(column).collect();
    assert_eq!(
        got[0],
        (
            "order_no".into(),
            Some("Order No".into()),
            "int64".into(),
            None
        )
    );
    assert_eq!(got[2].2, "string", "decimal commas stay text");
    let (p, _) = init(&semi, &[]);
    let config = std::fs::read_to_string(p.config()).unwrap();
    assert!(config.contains("csv = { delimiter = \";\" }"), "{config}");
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["files"][0]["rows_written"], 50);
    let mut names: Vec<String> = p
        .strings("processed/orders", "customer")
        .into_iter()
        .map(Option::unwrap)
        .collect();
    names.sort();
    let mut want: Vec<String> = (0..50).map(|i| format!("Smith; J. {i}")).collect();
    want.sort();
    assert_eq!(names, want);

    let bare = samples.path().join("events.tsv");
    let mut data = String::new();
    for i in 0..40 {
        data.push_str(&format!(
            "{i}\tuser{i}\t2024-05-{:02}\t{}.5\n",
            1 + i % 30,
            i
        ));
    }
    std::fs::write(&bare, &data).unwrap();
    let (columns, stderr) = infer_schema(&bare);
    let got: Vec<_> = columns.iter().map(column).collect();
    let types: Vec<(&str, &str)> = got.iter().map(|c| (c.0.as_str(), c.2.as_str())).collect();
    assert_eq!(
        types,
        [
            ("column_1", "int64"),
            ("column_2", "string"),
            ("column_3", "date"),
            ("column_4", "float64"),
        ]
    );
    assert!(
        got.iter().all(|c| c.1.is_none()),
        "no from without a header"
    );
    assert!(stderr.contains("no header"), "{stderr}");
    let (p, _) = init(&bare, &[]);
    let config = std::fs::read_to_string(p.config()).unwrap();
    assert!(
        config.contains("csv = { delimiter = \"\\t\", header = false }"),
        "{config}"
    );
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report}");
    assert_eq!(
        report["files"][0]["rows_read"], 40,
        "no row taken for a header"
    );
    assert_eq!(report["files"][0]["rows_written"], 40);
    let mut ids: Vec<i64> = p
        .strings("processed/events", "column_1")
        .into_iter()
        .map(|v| v.unwrap().parse().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, (0..40).collect::<Vec<i64>>());
    let parquet: Vec<String> = p
        .files("processed/events")
        .into_iter()
        .filter(|f| f.ends_with(".parquet"))
        .collect();
    assert_eq!(parquet.len(), 30, "a partition a day: {parquet:?}");
}

/// `validate --sample`: a header whose case differs from the schema's name and a value that
/// fails its column's format fail the check (exit 1) with the column, the file's columns, a
/// suggestion and the value; a good sample passes (exit 0).
#[test]
fn validate_sample_names_missing_columns_and_failing_values() {
    let p = Project::single_table(
        "orders",
        "csv",
        r#"[
  { name = "line_id", type = "int64" },
  { name = "amount", type = "decimal(10,2)" },
  { name = "shipped", type = "date", format = "%d/%m/%Y" },
]"#,
        "SELECT line_id, amount, shipped, _source_file, _source_row FROM orders",
    );
    let samples = tempfile::tempdir().unwrap();
    let bad = samples.path().join("bad.csv");
    std::fs::write(
        &bad,
        "line_id,Amount,shipped,note\n1,2.50,01/03/2024,a\n2,3.00,15/03/2024,b\n3,1.25,2024-03-05,c\n",
    )
    .unwrap();
    let out = p.sluice(&["validate", "--sample", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("config ok"), "{stdout}");
    assert!(
        stdout.contains(
            "error: column \"amount\" is not in the file (its columns: line_id, Amount, shipped, \
             note); did you mean header_case = \"insensitive\" or from = \"Amount\"?"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "error: column shipped: 1 of 3 sampled values are not a valid date (format \
             \"%d/%m/%Y\"):\n    line 4: column shipped: \"2024-03-05\" is not a valid date \
             (format \"%d/%m/%Y\")"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("note: the file's column \"note\" is not in the schema (ignored)"),
        "{stdout}"
    );
    assert!(stdout.contains("sample: 2 problems"), "{stdout}");

    // The suggestion works; a good sample passes.
    p.edit_config(
        "format = \"csv\"",
        "format = \"csv\"\nheader_case = \"insensitive\"",
    );
    let good = samples.path().join("good.csv.gz");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(
        &mut gz,
        b"line_id,Amount,shipped\n1,2.50,01/03/2024\n2,,15/03/2024\n",
    )
    .unwrap();
    std::fs::write(&good, gz.finish().unwrap()).unwrap();
    let out = p.sluice(&["validate", "--sample", good.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("2 records read"), "{stdout}");
    assert!(stdout.contains("sample ok"), "{stdout}");

    // The example project: the source is picked by the file's prefix and format; records the
    // reader rejects whole are noted, not failed.
    let example = Project::with_fixtures();
    let tickets = example.lake().join("raw/support_tickets/2024-03-02.csv");
    let out = example.sluice(&["validate", "--sample", tickets.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("source support_tickets (csv), 361 records read"),
        "{stdout}"
    );
    assert!(
        stdout.contains("line 114: expected 9 fields, found 7"),
        "{stdout}"
    );
    let logs = repo().join("fixtures/raw/app_logs/2024-03-03.jsonl.zst");
    let out = example.sluice(&[
        "validate",
        "--sample",
        logs.to_str().unwrap(),
        "--rows",
        "100",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("source app_logs (jsonl), 100 records read"),
        "{}",
        text(&out)
    );
}

/// `validate --sample` reads a sample as the source's dialect says: decoded, past `skip_rows`
/// and comment lines.
#[test]
fn validate_sample_follows_the_source_dialect() {
    let p = Project::single_table(
        "kunden",
        "csv",
        r#"[{ name = "name", from = "Kundenname", type = "string" }, { name = "betrag", from = "Betrag", type = "decimal(8,2)" }]"#,
        "SELECT name, betrag, _source_file, _source_row FROM kunden",
    );
    p.edit_config(
        "format = \"csv\"",
        "format = \"csv\"\nencoding = \"latin1\"\ncsv = { delimiter = \";\", skip_rows = 1, comment = \"#\" }",
    );
    let samples = tempfile::tempdir().unwrap();
    let latin1 = |s: &str| s.chars().map(|c| c as u8).collect::<Vec<u8>>();
    let good = samples.path().join("good.csv");
    std::fs::write(
        &good,
        latin1(
            "Export vom 01.03.2024\r\n# Kommentar\r\nKundenname;Betrag\r\nJürgen Müller;12.50\r\n",
        ),
    )
    .unwrap();
    let out = p.sluice(&["validate", "--sample", good.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let bad = samples.path().join("bad.csv");
    std::fs::write(
        &bad,
        latin1("Export vom 01.03.2024\r\nKundenname;Betrag\r\nJosé;12,50\r\n"),
    )
    .unwrap();
    let out = p.sluice(&["validate", "--sample", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("column betrag: \"12,50\" is not a valid decimal(8,2)"),
        "{stdout}"
    );
}
