//! Typed schemas: every type and its options read from real-shaped files, the stored Parquet
//! types, and a value that does not fit rejected alone with the column, the value and the format.

use std::sync::Arc;

use chrono::{NaiveDate, TimeZone};
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, Int64Array, RecordBatch, StringArray,
};
use datafusion::arrow::datatypes::{
    DataType, Date32Type, Decimal128Type, Field, Int8Type, Schema, TimeUnit,
    TimestampMicrosecondType,
};
use parquet::arrow::ArrowWriter;

use crate::support::*;

fn micros(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> i64 {
    chrono::Utc
        .with_ymd_and_hms(y, mo, d, h, mi, s)
        .single()
        .unwrap()
        .timestamp_micros()
}

fn days(y: i32, m: u32, d: u32) -> i32 {
    (NaiveDate::from_ymd_opt(y, m, d).unwrap() - NaiveDate::from_ymd_opt(1970, 1, 1).unwrap())
        .num_days() as i32
}

/// The batches of a table, as one, sorted by `id`.
fn table(p: &Project, prefix: &str) -> RecordBatch {
    let batches = p.read(prefix);
    let schema = batches[0].schema();
    let all = datafusion::arrow::compute::concat_batches(&schema, &batches).unwrap();
    let ids = all.column_by_name("id").unwrap();
    let order = datafusion::arrow::compute::sort_to_indices(ids, None, None).unwrap();
    datafusion::arrow::compute::take_record_batch(&all, &order).unwrap()
}

fn rejected(p: &Project, prefix: &str) -> Vec<(String, String)> {
    let reasons = p.strings(prefix, "_reject_reason");
    let raws = p.strings(prefix, "_raw_record");
    let mut out: Vec<(String, String)> = reasons
        .into_iter()
        .zip(raws)
        .map(|(r, w)| (r.unwrap_or_default(), w.unwrap_or_default()))
        .collect();
    out.sort();
    out
}

#[test]
fn a_csv_export_reads_every_type_with_its_format_and_rejects_what_does_not_fit() {
    let columns = r#"[
  { name = "id", type = "int64" },
  { name = "Time", type = "timestamp", format = "%a %b %d %H:%M:%S %Y" },
  { name = "d", type = "date", format = ["%d-%m-%Y", "%Y/%m/%d"] },
  { name = "amount", type = "decimal(12,2)" },
  { name = "sent_ms", type = "timestamp", unit = "ms" },
  { name = "local", type = "timestamp", format = "%m/%d/%Y %I:%M %p", timezone = "America/New_York" },
  { name = "active", type = "boolean", true_values = ["Y", "yes"], false_values = ["N", "no"] },
  { name = "level", type = "int8" },
  { name = "port", type = "uint16" },
  { name = "at", type = "time" },
  { name = "sig", type = "binary", encoding = "hex" },
  { name = "ratio", type = "float32" },
]"#;
    let p = Project::single_table(
        "orders",
        "csv",
        columns,
        "SELECT id, \"Time\" AS time, d, amount, sent_ms, local, active, level, port, at, sig, \
         ratio, amount * 2 AS doubled, _source_file, _source_row FROM orders",
    );
    let csv = "id,Time,d,amount,sent_ms,local,active,level,port,at,sig,ratio\r\n\
        1,Sun Dec 04 04:47:44 2005,31-12-2023,1234.50,1700000000123,07/04/2024 09:30 PM,Y,-128,8080,13:05:09.25,0x6869,0.5\r\n\
        2,Mon Dec 05 10:00:00 2005,2024/01/02,-0.07,0,01/15/2024 12:00 AM,no,127,0,00:00,cafe,1e3\r\n\
        3,Sun Dec 04 04:47:44 2005,2024-01-02,1.00,1,01/15/2024 12:00 AM,Y,1,1,01:00,00,1\r\n\
        4,Sun Dec 04 04:47:44 2005,01-01-2024,1.005,1,01/15/2024 12:00 AM,Y,1,1,01:00,00,1\r\n\
        5,Sun Dec 04 04:47:44 2005,01-01-2024,1,1,01/15/2024 12:00 AM,maybe,1,1,01:00,00,1\r\n\
        6,Sun Dec 04 04:47:44 2005,01-01-2024,1,1,01/15/2024 12:00 AM,N,128,1,01:00,00,1\r\n\
        7,Sun Dec 04 04:47:44 2005,01-01-2024,1,1,01/15/2024 12:00 AM,N,1,-1,01:00,00,1\r\n\
        8,Sun Dex 04 04:47:44 2005,01-01-2024,1,1,01/15/2024 12:00 AM,N,1,1,01:00,00,1\r\n\
        9,Sun Dec 04 04:47:44 2005,01-01-2024,1,1,01/15/2024 12:00 AM,N,1,1,01:00,zz,1\r\n\
        10,,,,,,,,,,,\r\n";
    p.add_raw("orders", "export.csv", csv.as_bytes());
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    check_accounting(&report);
    assert_eq!(
        file_counts(&report)["orders/export.csv"],
        ("processed".into(), 10, 3, 7, 0)
    );

    let t = table(&p, "processed/orders_clean");
    let schema = t.schema();
    let ty = |c: &str| schema.field_with_name(c).unwrap().data_type().clone();
    assert_eq!(ty("time"), DataType::Timestamp(TimeUnit::Microsecond, None));
    assert_eq!(ty("d"), DataType::Date32);
    assert_eq!(ty("amount"), DataType::Decimal128(12, 2));
    assert_eq!(ty("active"), DataType::Boolean);
    assert_eq!(ty("level"), DataType::Int8);
    assert_eq!(ty("port"), DataType::Int32, "uint16 is stored as int32");
    assert_eq!(ty("at"), DataType::Utf8, "time is stored as its text");
    assert_eq!(ty("sig"), DataType::Binary);
    assert_eq!(ty("ratio"), DataType::Float32);

    let ids: Vec<i64> = t
        .column_by_name("id")
        .unwrap()
        .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
        .values()
        .to_vec();
    assert_eq!(ids, vec![1, 2, 10]);
    let ts = t
        .column_by_name("time")
        .unwrap()
        .as_primitive::<TimestampMicrosecondType>();
    assert_eq!(ts.value(0), micros(2005, 12, 4, 4, 47, 44));
    assert_eq!(ts.value(1), micros(2005, 12, 5, 10, 0, 0));
    assert!(ts.is_null(2), "an empty cell is null, not a rejection");
    let d = t.column_by_name("d").unwrap().as_primitive::<Date32Type>();
    assert_eq!(
        (d.value(0), d.value(1)),
        (days(2023, 12, 31), days(2024, 1, 2))
    );
    let amount = t
        .column_by_name("amount")
        .unwrap()
        .as_primitive::<Decimal128Type>();
    assert_eq!((amount.value(0), amount.value(1)), (123_450, -7));
    let doubled = t
        .column_by_name("doubled")
        .unwrap()
        .as_primitive::<Decimal128Type>();
    assert_eq!(doubled.value(0), 246_900, "exact arithmetic in the query");
    let sent = t
        .column_by_name("sent_ms")
        .unwrap()
        .as_primitive::<TimestampMicrosecondType>();
    assert_eq!(sent.value(0), 1_700_000_000_123_000);
    let local = t
        .column_by_name("local")
        .unwrap()
        .as_primitive::<TimestampMicrosecondType>();
    // 9:30 PM in New York on 4 July (EDT, UTC-4) and midnight on 15 January (EST, UTC-5).
    assert_eq!(local.value(0), micros(2024, 7, 5, 1, 30, 0));
    assert_eq!(local.value(1), micros(2024, 1, 15, 5, 0, 0));
    let active = t.column_by_name("active").unwrap().as_boolean();
    assert_eq!((active.value(0), active.value(1)), (true, false));
    let level = t
        .column_by_name("level")
        .unwrap()
        .as_primitive::<Int8Type>();
    assert_eq!((level.value(0), level.value(1)), (-128, 127));
    assert_eq!(
        p.strings("processed/orders_clean", "at")[..2].to_vec(),
        vec![
            Some("13:05:09.250".to_string()),
            Some("00:00:00".to_string())
        ]
    );
    let sig = t.column_by_name("sig").unwrap().as_binary::<i32>();
    assert_eq!(
        (sig.value(0), sig.value(1)),
        (&b"hi"[..], &[0xca, 0xfe][..])
    );

    let bad = rejected(&p, "rejected/orders_clean");
    let reasons: Vec<&str> = bad.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(
        reasons,
        vec![
            "column Time: \"Sun Dex 04 04:47:44 2005\" is not a valid timestamp (format \"%a %b %d %H:%M:%S %Y\")",
            "column active: \"maybe\" is not a valid boolean (true: y, yes; false: n, no)",
            "column amount: \"1.005\" is not a valid decimal(12,2)",
            "column d: \"2024-01-02\" is not a valid date (formats \"%d-%m-%Y\", \"%Y/%m/%d\")",
            "column level: \"128\" is not a valid int8 (-128 to 127)",
            "column port: \"-1\" is not a valid uint16 (0 to 65535)",
            "column sig: \"zz\" is not a valid binary (hex)",
        ]
    );
    assert!(
        bad.iter()
            .any(|(r, raw)| r.contains("1.005") && raw.starts_with("4,Sun Dec 04")),
        "the raw text of the record is kept: {bad:?}"
    );
}

#[test]
fn a_schema_option_that_does_not_fit_fails_validate_naming_the_column() {
    for (column, expected) in [
        (
            r#"{ name = "ts", type = "timestamp", format = "%b %d %H:%M:%S" }"#,
            "has no year: set `year = 2024`",
        ),
        (
            r#"{ name = "n", type = "int64", format = "%Y" }"#,
            "format applies to",
        ),
        (
            r#"{ name = "a", type = "decimal(40,2)" }"#,
            "precision must be 1 to 38",
        ),
        (r#"{ name = "a", type = "timestampz" }"#, "unknown type"),
        (
            r#"{ name = "ts", type = "timestamp", timezone = "Mars/Olympus" }"#,
            "is not an IANA zone name",
        ),
    ] {
        let p = Project::single_table(
            "s",
            "csv",
            &format!("[{column}]"),
            "SELECT *, _source_file, _source_row FROM s",
        );
        let out = p.sluice(&["validate"]);
        assert_eq!(out.status.code(), Some(2), "{column}: {}", text(&out));
        let err = text(&out);
        assert!(err.contains("s.toml"), "{err}");
        assert!(err.contains(expected), "{column}: {err}");
    }
    // A year-less syslog format with a year reads.
    let p = Project::single_table(
        "syslog",
        "csv",
        r#"[{ name = "ts", type = "timestamp", format = "%b %e %H:%M:%S", year = 2023 }, { name = "msg", type = "string" }]"#,
        "SELECT ts, msg, _source_file, _source_row FROM syslog",
    );
    p.add_raw(
        "syslog",
        "messages.csv",
        b"ts,msg\nJun  9 06:06:20,combo sshd(pam_unix)[19939]: authentication failure\n",
    );
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    let t = p.read("processed/syslog_clean");
    let ts = t[0].column_by_name("ts").unwrap();
    assert_eq!(
        ts.as_primitive::<TimestampMicrosecondType>().value(0),
        micros(2023, 6, 9, 6, 6, 20)
    );
}

#[test]
fn renamed_columns_and_a_case_insensitive_header() {
    let p = Project::single_table(
        "crm",
        "csv",
        r#"[{ name = "line_id", from = "LineId", type = "int64" }, { name = "customer_name", from = "Customer Name", type = "string" }]"#,
        "SELECT line_id, customer_name, _source_file, _source_row FROM crm",
    );
    p.add_raw(
        "crm",
        "a.csv",
        b"LineId,Customer Name,Extra\n1,Ann,x\n2,Bo,y\n",
    );
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(
        p.strings("processed/crm_clean", "customer_name"),
        vec![Some("Ann".to_string()), Some("Bo".to_string())]
    );
    // A header in another case: exact by default, a per-file error naming the column and the
    // header; the same file reads with header_case = "insensitive".
    p.add_raw("crm", "b.csv", b"LINEID,customer name\n3,Cy\n");
    let (_, report) = p.run();
    let err = report["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["key"].as_str().unwrap().ends_with("b.csv"))
        .map(|f| f["error"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default();
    assert!(
        err.contains("no column \"LineId\"") && err.contains("LINEID, customer name"),
        "{report:#}"
    );
    p.edit_config(
        "format = \"csv\"\n",
        "format = \"csv\"\nheader_case = \"insensitive\"\n",
    );
    // The file waits in raw/ for its next attempt, which the fixed config reads.
    assert!(p.lake().join("raw/crm/b.csv").exists());
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    let mut names = p.strings("processed/crm_clean", "customer_name");
    names.sort();
    assert_eq!(
        names,
        vec![
            Some("Ann".to_string()),
            Some("Bo".to_string()),
            Some("Cy".to_string())
        ]
    );
}

#[test]
fn parquet_columns_are_parsed_or_cast_and_a_value_that_does_not_fit_rejects_its_row() {
    let p = Project::single_table(
        "events",
        "parquet",
        r#"[{ name = "id", type = "int64" }, { name = "at", type = "timestamp", format = "%d/%m/%Y %H:%M" }, { name = "level", type = "int8" }, { name = "price", type = "decimal(8,2)" }]"#,
        "SELECT id, at, level, price, _source_file, _source_row FROM events",
    );
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, true),
        Field::new("at", DataType::Utf8, true),
        Field::new("level", DataType::Int64, true),
        Field::new("price", DataType::Float64, true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from(vec![1, 2, 3, 4])) as ArrayRef,
            Arc::new(StringArray::from(vec![
                Some("31/12/2023 23:59"),
                Some("2023-12-31"),
                None,
                Some("01/01/2024 00:00"),
            ])),
            Arc::new(Int64Array::from(vec![5, 6, 7, 300])),
            Arc::new(Float64Array::from(vec![9.99, 1.5, 2.0, 3.0])),
        ],
    )
    .unwrap();
    let mut buf = Vec::new();
    let mut w = ArrowWriter::try_new(&mut buf, schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    p.add_raw("events", "part-0.parquet", &buf);
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    check_accounting(&report);
    assert_eq!(
        file_counts(&report)["events/part-0.parquet"],
        ("processed".into(), 4, 2, 2, 0)
    );
    let t = table(&p, "processed/events_clean");
    let at = t
        .column_by_name("at")
        .unwrap()
        .as_primitive::<TimestampMicrosecondType>();
    assert_eq!(at.value(0), micros(2023, 12, 31, 23, 59, 0));
    assert!(at.is_null(1));
    let price = t
        .column_by_name("price")
        .unwrap()
        .as_primitive::<Decimal128Type>();
    assert_eq!((price.value(0), price.value(1)), (999, 200));
    let level = t
        .column_by_name("level")
        .unwrap()
        .as_primitive::<Int8Type>();
    assert_eq!(level.value(1), 7);
    let bad = rejected(&p, "rejected/events_clean");
    assert_eq!(bad.len(), 2, "{bad:?}");
    assert_eq!(
        bad[0].0,
        "column at: \"2023-12-31\" is not a valid timestamp (format \"%d/%m/%Y %H:%M\")"
    );
    assert!(bad[0].1.contains("\"id\":2"), "{bad:?}");
    assert_eq!(
        bad[1].0,
        "column level: \"300\" is not a valid int8 (-128 to 127)"
    );
    let rows = p.strings("rejected/events_clean", "_source_row");
    let mut rows: Vec<i64> = rows
        .iter()
        .map(|r| r.as_ref().unwrap().parse().unwrap())
        .collect();
    rows.sort();
    assert_eq!(rows, vec![2, 4]);
}
