//! Criterion benches of the hot paths on generated workload data, one thread each: reading JSON
//! lines and CSV (chunking, parsing, hashing), the query with routing, and the sink (dedup,
//! partition split, Parquet write); and the typed parse of one cell, per schema type.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::Schema;
use sluice::config::Config;
use sluice::generate::{Kind, sample};
use sluice::pipeline::{Prepared, prepare};
use sluice::sink::stream::{SinkOptions, TableSink};
use sluice::source::feed::{Feed, FeedFile};
use sluice::source::{CellParser, ColumnType, Formats, TypeOptions};
use sluice::transform::{self, Router, Valid};

const ROWS: usize = 50_000;

fn example() -> Config {
    Config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("sluice.toml")).expect("config")
}

/// Reads the whole sample on this thread.
fn read(p: &Prepared, data: &Arc<Vec<u8>>) -> Vec<RecordBatch> {
    let file = FeedFile {
        key: format!("raw/{}/bench", p.source.name),
        reader: Box::new(std::io::Cursor::new(data.as_ref().clone())),
    };
    let feed = Feed::new(&p.source, &p.schema, vec![file], 8 << 20);
    let mut batches = Vec::new();
    while let Some(out) = feed.next_rows() {
        batches.extend(out.batches);
    }
    batches
}

/// Runs the table's query over the rows and routes its output: the valid rows.
async fn query(p: &Prepared, rows: Vec<RecordBatch>) -> (Router, Vec<Valid>) {
    let ctx = transform::session(1, 256 << 20);
    transform::register_batches(&ctx, &p.source.name, p.schema.arrow_schema(), rows, 1)
        .expect("register");
    let df = ctx.sql(&p.query).await.expect("plan");
    let schema = df.schema().as_arrow().clone();
    let router = Router::new(&p.table, &schema, &[format!("raw/{}/bench", p.source.name)]);
    let mut valid = Vec::new();
    for b in df.collect().await.expect("query") {
        if let (Some(v), _) = router.route(&b).expect("route") {
            valid.push(v);
        }
    }
    (router, valid)
}

/// Dedups, splits and writes the valid rows into a temp folder.
fn write(p: &Prepared, schema: &Schema, valid: &[Valid]) -> usize {
    let dir = tempfile::tempdir().expect("tempdir");
    let full = Schema::new(
        schema
            .fields()
            .iter()
            .filter(|f| !f.name().starts_with("_source_"))
            .cloned()
            .collect::<Vec<_>>(),
    );
    let opts = SinkOptions {
        partition_by: p.table.partition_by.clone(),
        unique_key: p.table.unique_key.clone(),
        order_by: p.table.order_by.clone(),
        compression: p.table.compression.clone(),
        buffer_bytes: 128 << 20,
        memory_limit: 1 << 30,
        max_writers: 16,
        sip: [1, 2],
        target_file_size: 128 << 20,
    };
    let sink = TableSink::new(opts, schema, &full, 1, dir.path()).expect("sink");
    for (b, keep) in valid {
        sink.push(b, keep.as_ref()).expect("push");
    }
    sink.finish(1).expect("finish").0.len()
}

fn bench(c: &mut Criterion) {
    let config = example();
    let prepared = prepare(&config).expect("prepare");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    for (kind, p) in [(Kind::Logs, &prepared[0]), (Kind::Tickets, &prepared[1])] {
        let data = Arc::new(sample(kind, ROWS, 7).into_bytes());
        let mut g = c.benchmark_group(p.table.name.as_str());
        g.throughput(Throughput::Bytes(data.len() as u64));
        g.sample_size(10);
        g.bench_function("read", |b| b.iter(|| black_box(read(p, &data))));
        let rows = read(p, &data);
        g.bench_function("query_route", |b| {
            b.iter(|| black_box(runtime.block_on(query(p, rows.clone()))))
        });
        let (router, valid) = runtime.block_on(query(p, rows));
        let schema = router.valid_schema.clone();
        g.bench_function("dedup_partitioned_write", |b| {
            b.iter(|| black_box(write(p, &schema, &valid)))
        });
        g.finish();
    }
}

/// A parse case: name, schema type, options, the cell of row `i`.
type Case = (
    &'static str,
    &'static str,
    TypeOptions,
    Box<dyn Fn(usize) -> String>,
);

/// Parses 50,000 cells of each type (what a typed schema column costs the reader per cell).
fn parse(c: &mut Criterion) {
    let ts = |i: usize| {
        format!(
            "2024-03-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            1 + i % 28,
            i % 24,
            i % 60,
            (i * 7) % 60,
            i % 1000
        )
    };
    let cases: Vec<Case> = vec![
        (
            "int64",
            "int64",
            TypeOptions::default(),
            Box::new(|i| (i * 7919).to_string()),
        ),
        (
            "float64",
            "float64",
            TypeOptions::default(),
            Box::new(|i| format!("{}.{}", i, i % 97)),
        ),
        (
            "decimal",
            "decimal(12,2)",
            TypeOptions::default(),
            Box::new(|i| format!("{}.{:02}", i, i % 100)),
        ),
        (
            "boolean",
            "boolean",
            TypeOptions::default(),
            Box::new(|i| ["true", "No", "1", "off"][i % 4].to_string()),
        ),
        (
            "date_iso",
            "date",
            TypeOptions::default(),
            Box::new(|i| format!("2024-03-{:02}", 1 + i % 28)),
        ),
        (
            "timestamp_iso",
            "timestamp",
            TypeOptions::default(),
            Box::new(ts),
        ),
        (
            "timestamp_format",
            "timestamp",
            TypeOptions {
                format: Some(Formats::One("%d/%m/%Y %H:%M:%S".into())),
                ..Default::default()
            },
            Box::new(|i| {
                format!(
                    "{:02}/03/2024 {:02}:{:02}:{:02}",
                    1 + i % 28,
                    i % 24,
                    i % 60,
                    i % 60
                )
            }),
        ),
        (
            "timestamp_zone",
            "timestamp",
            TypeOptions {
                format: Some(Formats::One("%Y-%m-%d %H:%M:%S".into())),
                timezone: Some("Europe/Berlin".into()),
                ..Default::default()
            },
            Box::new(|i| format!("2024-03-{:02} {:02}:{:02}:00", 1 + i % 28, i % 24, i % 60)),
        ),
    ];
    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Elements(ROWS as u64));
    g.sample_size(20);
    for (name, ty, options, make) in cases {
        let ty: ColumnType = ty.parse().expect("type");
        let parser = CellParser::new(ty, &options).expect("parser");
        let cells: Vec<String> = (0..ROWS).map(make).collect();
        assert!(cells.iter().all(|v| parser.parse(v).is_some()), "{name}");
        g.bench_function(name, |b| {
            b.iter(|| cells.iter().filter(|v| parser.parse(v).is_some()).count())
        });
    }
    g.finish();
}

criterion_group!(benches, bench, parse);
criterion_main!(benches);
