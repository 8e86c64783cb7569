//! Criterion benches of the hot paths on generated workload data: reading JSON lines and CSV,
//! the transform (query, routing, dedup), and the partitioned Parquet write.

use std::hint::black_box;
use std::path::Path;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sluice::config::Config;
use sluice::generate::{Kind, sample};
use sluice::pipeline::{prepare, transform_batch};
use sluice::sink;
use sluice::source::{RawFile, read_files};

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
            .map(|r| (files[0].key.clone(), r.expect("read")))
            .collect();
        let transform_once = || {
            runtime
                .block_on(transform_batch(p, outputs.clone(), 2))
                .expect("transform")
        };
        g.bench_function("transform", |b| b.iter(|| black_box(transform_once())));
        let kept = transform_once().valid;
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
