//! Dedup within a batch by `unique_key`: one row per key, the greatest `order_by` wins; ties go
//! to the later file, then the later row, so the result does not depend on thread timing.

use std::collections::HashMap;

use datafusion::arrow::array::{AsArray, BooleanArray, RecordBatch};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::datatypes::{Int32Type, Int64Type, Schema};
use datafusion::common::HashMap as FastMap;

use super::KeyEncoder;
use crate::error::Result;
use crate::source::{SOURCE_FILE, SOURCE_ROW};
use crate::transform::{Counts, count_dropped_duplicates};

/// Where the best row of a key is, and how it ranks.
#[derive(Clone, Copy)]
struct Winner<'a> {
    order: &'a [u8],
    file: i32,
    source_row: i64,
    batch: u32,
    row: u32,
}

impl Winner<'_> {
    fn beats(&self, other: &Winner) -> bool {
        self.order
            .cmp(other.order)
            .then(self.file.cmp(&other.file))
            .then(self.source_row.cmp(&other.source_row))
            .is_gt()
    }
}

/// Keeps the latest row of each key; losers are counted as duplicates of their file.
/// `_source_file` of the batches indexes `files`.
pub fn dedup_batch(
    schema: &Schema,
    batches: Vec<RecordBatch>,
    unique_key: &[String],
    order_by: &str,
    files: &[String],
    counts: &mut HashMap<String, Counts>,
) -> Result<Vec<RecordBatch>> {
    let keys = KeyEncoder::new(schema, unique_key)?;
    let order = KeyEncoder::new(schema, &[order_by.to_string()])?;
    let encoded = batches
        .iter()
        .map(|b| Ok((keys.encode(b)?, order.encode(b)?)))
        .collect::<Result<Vec<_>>>()?;
    let lineage: Vec<_> = batches
        .iter()
        .map(|b| {
            (
                b.column_by_name(SOURCE_FILE)
                    .and_then(|a| a.as_primitive_opt::<Int32Type>().cloned()),
                b.column_by_name(SOURCE_ROW)
                    .and_then(|a| a.as_primitive_opt::<Int64Type>().cloned()),
            )
        })
        .collect();
    let total: usize = batches.iter().map(|b| b.num_rows()).sum();
    let mut best: FastMap<&[u8], Winner> = FastMap::with_capacity(total);
    for (bi, ((k, o), (file, srow))) in encoded.iter().zip(&lineage).enumerate() {
        for i in 0..k.num_rows() {
            let w = Winner {
                order: o.row(i).data(),
                file: file.as_ref().map(|f| f.value(i)).unwrap_or(0),
                source_row: srow.as_ref().map(|r| r.value(i)).unwrap_or(0),
                batch: bi as u32,
                row: i as u32,
            };
            best.entry(k.row(i).data())
                .and_modify(|b| {
                    if w.beats(b) {
                        *b = w;
                    }
                })
                .or_insert(w);
        }
    }
    let mut out = Vec::with_capacity(batches.len());
    for (bi, (b, (k, _))) in batches.iter().zip(&encoded).enumerate() {
        let mask: BooleanArray = (0..b.num_rows())
            .map(|i| {
                Some(
                    best.get(k.row(i).data())
                        .is_some_and(|w| w.batch == bi as u32 && w.row == i as u32),
                )
            })
            .collect();
        count_dropped_duplicates(b, &mask, files, counts);
        let kept = filter_record_batch(b, &mask)?;
        if kept.num_rows() > 0 {
            out.push(kept);
        }
    }
    Ok(out)
}
