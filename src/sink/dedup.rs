//! Dedup within a batch by `unique_key`: one row per key, the greatest `order_by` wins; ties go
//! to the later file, then the later row, so the result does not depend on thread timing.

use std::collections::HashMap;

use datafusion::arrow::array::{AsArray, BooleanArray, RecordBatch};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::datatypes::{Int64Type, Schema};

use super::KeyEncoder;
use crate::error::Result;
use crate::source::{SOURCE_FILE, SOURCE_ROW};
use crate::transform::Counts;

#[derive(Clone, Copy)]
struct Winner {
    batch: u32,
    row: u32,
    file_rank: u32,
    source_row: i64,
}

type Best = (Box<[u8]>, Winner);

/// Keeps the latest row of each key; losers are counted as duplicates of their file.
pub fn dedup_batch(
    schema: &Schema,
    batches: Vec<RecordBatch>,
    unique_key: &[String],
    order_by: &str,
    counts: &mut HashMap<String, Counts>,
) -> Result<Vec<RecordBatch>> {
    let keys = KeyEncoder::new(schema, unique_key)?;
    let order = KeyEncoder::new(schema, &[order_by.to_string()])?;
    let mut files: Vec<String> = counts.keys().cloned().collect();
    files.sort();
    let rank: HashMap<&str, u32> = files
        .iter()
        .enumerate()
        .map(|(i, f)| (f.as_str(), i as u32))
        .collect();
    let mut encoded = Vec::with_capacity(batches.len());
    // Key -> (order_by encoding, winner so far).
    let mut best: HashMap<Box<[u8]>, Best> = HashMap::new();
    for (bi, b) in batches.iter().enumerate() {
        let k = keys.encode(b)?;
        let o = order.encode(b)?;
        let file = b
            .column_by_name(SOURCE_FILE)
            .map(|a| a.as_string::<i32>().clone());
        let srow = b
            .column_by_name(SOURCE_ROW)
            .map(|a| a.as_primitive::<Int64Type>().clone());
        for i in 0..b.num_rows() {
            let w = Winner {
                batch: bi as u32,
                row: i as u32,
                file_rank: file
                    .as_ref()
                    .and_then(|f| rank.get(f.value(i)).copied())
                    .unwrap_or(0),
                source_row: srow.as_ref().map(|r| r.value(i)).unwrap_or(0),
            };
            let ord = o.row(i);
            match best.get_mut(k.row(i).as_ref()) {
                None => {
                    best.insert(k.row(i).as_ref().into(), (ord.as_ref().into(), w));
                }
                Some((bo, bw)) => {
                    let newer = ord
                        .as_ref()
                        .cmp(bo)
                        .then(w.file_rank.cmp(&bw.file_rank))
                        .then(w.source_row.cmp(&bw.source_row))
                        .is_gt();
                    if newer {
                        *bo = ord.as_ref().into();
                        *bw = w;
                    }
                }
            }
        }
        encoded.push(k);
    }
    let mut out = Vec::with_capacity(batches.len());
    for (bi, (b, k)) in batches.iter().zip(&encoded).enumerate() {
        let file = b
            .column_by_name(SOURCE_FILE)
            .map(|a| a.as_string::<i32>().clone());
        let mask: BooleanArray = (0..b.num_rows())
            .map(|i| {
                let won = best
                    .get(k.row(i).as_ref())
                    .is_some_and(|(_, w)| w.batch == bi as u32 && w.row == i as u32);
                if !won && let Some(c) = file.as_ref().and_then(|f| counts.get_mut(f.value(i))) {
                    c.written -= 1;
                    c.duplicate += 1;
                }
                Some(won)
            })
            .collect();
        let kept = filter_record_batch(b, &mask)?;
        if kept.num_rows() > 0 {
            out.push(kept);
        }
    }
    Ok(out)
}
