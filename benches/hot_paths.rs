//! Criterion benches of the hot paths on generated workload data: reading JSON lines and CSV,
//! the transform (query, routing, dedup), and the partitioned Parquet write.

use std::hint::black_box;
use std::path::Path;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sluice::config::Config;
use sluice::generate::{Kind, sample};
use sluice::pipeline::prepare;
use sluice::source::{RawFile, read_files};
use sluice::{sink, transform};

const ROWS: usize = 50_000;

fn example() -> Config {
    Config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("sluice.toml")).expect("config")
}

fn bench(c: &mut Criterion) {
    let config = example();
    let prepared = prepare(&config).expect("prepare");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    for (kind, p) in [(Kind::Logs, &prepared[0]), (Kind::Tickets, &prepared[1])] {
        let data = Bytes::from(sample(kind, ROWS, 7));
        let files = vec![RawFile {
            key: format!("raw/{}/bench", p.source.name),
            data: data.clone(),
        }];
        let mut g = c.benchmark_group(p.table.name.as_str());
        g.throughput(Throughput::Bytes(data.len() as u64));
        g.sample_size(10);
        g.bench_function("read", |b| {
            b.iter(|| black_box(read_files(&p.source, &p.schema, &files, 2)))
        });
        let outputs: Vec<_> = read_files(&p.source, &p.schema, &files, 2)
            .into_iter()
            .map(|r| r.expect("read"))
            .collect();
        let batches: Vec<_> = outputs.iter().flat_map(|o| o.batches.clone()).collect();
        let reads: Vec<_> = outputs
            .iter()
            .map(|o| (files[0].key.clone(), o.good_rows(), o.malformed.clone()))
            .collect();
        let transform_once = || {
            runtime.block_on(async {
                let ctx = transform::session(2);
                transform::register_batches(
                    &ctx,
                    &p.source.name,
                    p.schema.arrow_schema(),
                    batches.clone(),
                    2,
                )
                .expect("register");
                let df = ctx.sql(&p.query).await.expect("plan");
                let schema = df.schema().as_arrow().clone();
                let out = df.collect().await.expect("run");
                let mut routed = transform::route(&p.table, out, &schema, &reads).expect("route");
                let valid = std::mem::take(&mut routed.valid);
                let order_by = p.table.order_by.as_deref().unwrap_or_default();
                let kept = sink::dedup::dedup_batch(
                    &routed.valid_schema,
                    valid,
                    &p.table.unique_key,
                    order_by,
                    &routed.files,
                    &mut routed.counts,
                )
                .expect("dedup");
                (kept, routed.valid_schema)
            })
        };
        g.bench_function("transform", |b| b.iter(|| black_box(transform_once())));
        let (kept, _) = transform_once();
        let lineage = ["_source_file".to_string(), "_source_row".to_string()];
        let rows: Vec<_> = kept
            .iter()
            .map(|b| sink::drop_columns(b, &lineage).expect("drop"))
            .collect();
        g.bench_function("partitioned_write", |b| {
            b.iter(|| {
                let parts = sink::split_partitions(&rows, &p.table.partition_by).expect("split");
                for batches in parts.values() {
                    let schema = batches[0].schema();
                    black_box(sink::encode_parquet(&schema, batches, "zstd").expect("encode"));
                }
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
