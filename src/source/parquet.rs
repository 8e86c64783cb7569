//! Parquet reader: columns matched by name (`from`, `header_case`) and converted to the schema's
//! types. A column of the schema's type is taken as it is; a text column is parsed by the
//! column's parser (formats, zones, spellings: as in CSV and JSON); any other type is cast. A
//! value that does not convert rejects its row alone, with the message the other readers give
//! and the row's values as JSON for its raw record; a type that cannot be cast at all fails the
//! file, naming the column.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, DictionaryArray, Int32Array, Int64Array, StringArray,
    new_null_array,
};
use datafusion::arrow::compute::{CastOptions, cast, cast_with_options, filter_record_batch};
use datafusion::arrow::datatypes::{DataType, Int32Type};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::columns::{ReadContext, raw_text};
use super::{BATCH_ROWS, Malformed, RAW_LIMIT, ReadOutput};
use crate::error::{Error, Result};

/// Reads a whole Parquet file.
pub(super) fn read(ctx: &ReadContext, key: &str, data: Bytes) -> Result<ReadOutput> {
    let fail = |message: String| Error::Read {
        key: key.to_string(),
        message,
    };
    let reader = ParquetRecordBatchReaderBuilder::try_new(data)
        .map_err(|e| fail(format!("not a readable Parquet file: {e}")))?
        .with_batch_size(BATCH_ROWS)
        .build()
        .map_err(|e| fail(e.to_string()))?;
    let file = Arc::new(StringArray::from(vec![key])) as ArrayRef;
    let lenient = CastOptions {
        safe: true,
        ..Default::default()
    };
    let mut out = ReadOutput::default();
    let mut next_row = 1i64;
    for batch in reader {
        let batch = batch.map_err(|e| fail(e.to_string()))?;
        let n = batch.num_rows();
        let mut arrays = Vec::with_capacity(ctx.width() + 2);
        // Rows that did not convert: the first reason of each.
        let mut bad: BTreeMap<usize, String> = BTreeMap::new();
        for (i, field) in ctx.schema.fields().iter().take(ctx.width()).enumerate() {
            let target = field.data_type();
            let found = (0..batch.num_columns())
                .find(|&j| ctx.is_column(batch.schema().field(j).name(), i))
                .map(|j| batch.column(j));
            let array = match found {
                None => new_null_array(target, n),
                Some(a) if a.data_type() == target => a.clone(),
                Some(a) if is_text(a.data_type()) => {
                    let text = cast(a, &DataType::Utf8).map_err(|e| fail(e.to_string()))?;
                    let (array, rejects) = ctx
                        .parse_column(i, text.as_string::<i32>().iter())
                        .map_err(fail)?;
                    for (row, why) in rejects {
                        bad.entry(row).or_insert(why);
                    }
                    array
                }
                Some(a) => {
                    let converted = cast_with_options(a, target, &lenient).map_err(|e| {
                        fail(format!(
                            "column {}: a Parquet {} column cannot be read as {}: {e}",
                            ctx.names[i],
                            a.data_type(),
                            ctx.parsers[i].label()
                        ))
                    })?;
                    // A value that was there before the cast and is not after it did not fit.
                    if converted.null_count() > a.null_count() {
                        let shown = ArrayFormatter::try_new(a.as_ref(), &FormatOptions::default())
                            .map_err(|e| fail(e.to_string()))?;
                        for row in (0..n).filter(|&r| a.is_valid(r) && converted.is_null(r)) {
                            bad.entry(row)
                                .or_insert_with(|| ctx.not_valid(i, &shown.value(row).to_string()));
                        }
                    }
                    converted
                }
            };
            arrays.push(array);
        }
        let keys = Int32Array::from(vec![0; n]);
        arrays.push(Arc::new(DictionaryArray::<Int32Type>::try_new(
            keys,
            file.clone(),
        )?));
        arrays.push(Arc::new(Int64Array::from_iter_values(
            next_row..next_row + n as i64,
        )));
        let rows = RecordBatch::try_new(ctx.schema.clone(), arrays)?;
        if bad.is_empty() {
            out.batches.push(rows);
        } else {
            let keep: BooleanArray = (0..n).map(|r| Some(!bad.contains_key(&r))).collect();
            out.batches.push(filter_record_batch(&rows, &keep)?);
            for (row, reason) in bad {
                out.malformed.push(Malformed {
                    row: next_row as u64 + row as u64,
                    reason,
                    raw: row_json(&batch, row),
                    unclosed_quote: false,
                });
            }
        }
        next_row += n as i64;
    }
    Ok(out)
}

fn is_text(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

/// One row of the file's batch as a JSON object (the raw record of a rejected row).
fn row_json(batch: &RecordBatch, row: usize) -> String {
    let mut buf = Vec::new();
    let mut w = datafusion::arrow::json::LineDelimitedWriter::new(&mut buf);
    match w.write(&batch.slice(row, 1)).and_then(|_| w.finish()) {
        Ok(()) => raw_text(&buf, RAW_LIMIT),
        Err(e) => format!("(row {row} could not be shown: {e})"),
    }
}
