//! Parquet reader: columns matched by name and cast to the schema's types.

use std::sync::Arc;

use bytes::Bytes;
use datafusion::arrow::array::{
    ArrayRef, DictionaryArray, Int32Array, Int64Array, StringArray, new_null_array,
};
use datafusion::arrow::compute::{CastOptions, cast_with_options};
use datafusion::arrow::datatypes::Int32Type;
use datafusion::arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::columns::ReadContext;
use super::{BATCH_ROWS, ReadOutput};
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
    let strict = CastOptions {
        safe: false,
        ..Default::default()
    };
    let mut out = ReadOutput::default();
    let mut next_row = 1i64;
    for batch in reader {
        let batch = batch.map_err(|e| fail(e.to_string()))?;
        let n = batch.num_rows();
        let mut arrays = Vec::with_capacity(ctx.width() + 2);
        for (name, field) in ctx.file_names.iter().zip(ctx.schema.fields()) {
            let array = match batch.column_by_name(name) {
                Some(a) => cast_with_options(a, field.data_type(), &strict)
                    .map_err(|e| fail(format!("column {name}: {e}")))?,
                None => new_null_array(field.data_type(), n),
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
        next_row += n as i64;
        out.batches
            .push(RecordBatch::try_new(ctx.schema.clone(), arrays)?);
    }
    Ok(out)
}
