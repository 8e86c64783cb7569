//! Column builders shared by the readers: typed conversion of text cells, lineage columns.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, BooleanBuilder, DictionaryArray, Float64Builder, Int32Array, Int64Array,
    Int64Builder, StringArray, StringBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Int32Type, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;

use super::{BATCH_ROWS, ColumnType, Malformed, RAW_LIMIT, ReadOutput, SourceSchema};
use crate::error::Result;

/// Name of the column holding the raw file's key.
pub const SOURCE_FILE: &str = "_source_file";
/// Name of the column holding the line where the row's record starts.
pub const SOURCE_ROW: &str = "_source_row";

/// The lineage fields every batch ends with.
pub fn lineage_fields() -> Vec<Field> {
    vec![
        Field::new(
            SOURCE_FILE,
            DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)),
            false,
        ),
        Field::new(SOURCE_ROW, DataType::Int64, false),
    ]
}

/// What readers need to know about the schema.
pub struct ReadContext {
    /// Arrow schema of the batches, lineage columns included.
    pub schema: SchemaRef,
    /// Column types, in schema order.
    pub types: Vec<ColumnType>,
    /// Column names, in schema order.
    pub names: Vec<String>,
    /// Column position by name.
    pub index: HashMap<String, usize>,
}

impl ReadContext {
    /// Prepares a schema for reading.
    pub fn new(schema: &SourceSchema) -> ReadContext {
        ReadContext {
            schema: schema.arrow_schema(),
            types: schema.columns.iter().map(|c| c.ty).collect(),
            names: schema.columns.iter().map(|c| c.name.clone()).collect(),
            index: schema
                .columns
                .iter()
                .enumerate()
                .map(|(i, c)| (c.name.clone(), i))
                .collect(),
        }
    }

    /// Number of data columns (without lineage).
    pub fn width(&self) -> usize {
        self.types.len()
    }
}

enum ColBuilder {
    Str(StringBuilder),
    I64(Int64Builder),
    F64(Float64Builder),
    Bool(BooleanBuilder),
}

/// Accumulates rows of one file (or chunk) into batches.
pub struct RowBuilder<'c> {
    ctx: &'c ReadContext,
    file: Arc<StringArray>,
    cols: Vec<ColBuilder>,
    rows: Vec<i64>,
    out: ReadOutput,
    raw_limit: usize,
}

impl<'c> RowBuilder<'c> {
    /// A builder for rows of the file `key`.
    pub fn new(ctx: &'c ReadContext, key: &str) -> RowBuilder<'c> {
        RowBuilder {
            ctx,
            file: Arc::new(StringArray::from(vec![key])),
            cols: Self::fresh(ctx),
            rows: Vec::with_capacity(BATCH_ROWS),
            out: ReadOutput::default(),
            raw_limit: RAW_LIMIT,
        }
    }

    /// Bounds the raw text of malformed records at `limit` bytes (cut with a mark beyond).
    pub fn raw_limit(mut self, limit: usize) -> Self {
        self.raw_limit = limit;
        self
    }

    fn fresh(ctx: &ReadContext) -> Vec<ColBuilder> {
        ctx.types
            .iter()
            .map(|t| match t {
                ColumnType::String => {
                    ColBuilder::Str(StringBuilder::with_capacity(BATCH_ROWS, BATCH_ROWS * 16))
                }
                ColumnType::Int64 => ColBuilder::I64(Int64Builder::with_capacity(BATCH_ROWS)),
                ColumnType::Float64 => ColBuilder::F64(Float64Builder::with_capacity(BATCH_ROWS)),
                ColumnType::Boolean => ColBuilder::Bool(BooleanBuilder::with_capacity(BATCH_ROWS)),
            })
            .collect()
    }

    /// Adds a row of text cells (`cell(i)`: schema column `i`, `None` for null). A cell that
    /// does not convert to its column's type makes the row malformed: the error says which and
    /// why.
    pub fn push<'v>(
        &mut self,
        cell: impl Fn(usize) -> Option<&'v str>,
        row: u64,
    ) -> Result<(), String> {
        for (i, (ty, name)) in self.ctx.types.iter().zip(&self.ctx.names).enumerate() {
            if let Some(v) = cell(i) {
                let ok = match ty {
                    ColumnType::String => true,
                    ColumnType::Int64 => parse_i64(v).is_some(),
                    ColumnType::Float64 => parse_f64(v).is_some(),
                    ColumnType::Boolean => parse_bool(v).is_some(),
                };
                if !ok {
                    return Err(format!(
                        "column {name}: {:?} is not a valid {}",
                        truncate(v, 80),
                        type_name(*ty)
                    ));
                }
            }
        }
        for (i, col) in self.cols.iter_mut().enumerate() {
            let v = cell(i);
            match col {
                ColBuilder::Str(b) => b.append_option(v),
                ColBuilder::I64(b) => b.append_option(v.and_then(parse_i64)),
                ColBuilder::F64(b) => b.append_option(v.and_then(parse_f64)),
                ColBuilder::Bool(b) => b.append_option(v.and_then(parse_bool)),
            }
        }
        self.rows.push(row as i64);
        if self.rows.len() >= BATCH_ROWS {
            self.flush()?;
        }
        Ok(())
    }

    /// Records a malformed record.
    pub fn malformed(&mut self, row: u64, reason: impl Into<String>, raw: &[u8]) {
        self.out.malformed.push(Malformed {
            row,
            reason: reason.into(),
            raw: raw_text(raw, self.raw_limit),
            unclosed_quote: false,
        });
    }

    /// Records a CSV record rejected for an unclosed quote.
    pub fn unclosed_quote(&mut self, row: u64, reason: impl Into<String>, raw: &[u8]) {
        self.malformed(row, reason, raw);
        if let Some(m) = self.out.malformed.last_mut() {
            m.unclosed_quote = true;
        }
    }

    fn flush(&mut self) -> Result<(), String> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let n = self.rows.len();
        let mut arrays: Vec<ArrayRef> = self
            .cols
            .iter_mut()
            .map(|c| match c {
                ColBuilder::Str(b) => Arc::new(b.finish()) as ArrayRef,
                ColBuilder::I64(b) => Arc::new(b.finish()) as ArrayRef,
                ColBuilder::F64(b) => Arc::new(b.finish()) as ArrayRef,
                ColBuilder::Bool(b) => Arc::new(b.finish()) as ArrayRef,
            })
            .collect();
        let keys = Int32Array::from(vec![0; n]);
        let file = DictionaryArray::<Int32Type>::try_new(keys, self.file.clone() as ArrayRef)
            .map_err(|e| e.to_string())?;
        arrays.push(Arc::new(file));
        arrays.push(Arc::new(Int64Array::from(std::mem::take(&mut self.rows))));
        let batch =
            RecordBatch::try_new(self.ctx.schema.clone(), arrays).map_err(|e| e.to_string())?;
        self.out.batches.push(batch);
        self.rows = Vec::with_capacity(BATCH_ROWS);
        Ok(())
    }

    /// The rows and malformed records gathered.
    pub fn finish(mut self) -> Result<ReadOutput, String> {
        self.flush()?;
        Ok(self.out)
    }
}

fn type_name(t: ColumnType) -> &'static str {
    match t {
        ColumnType::String => "string",
        ColumnType::Int64 => "int64",
        ColumnType::Float64 => "float64",
        ColumnType::Boolean => "boolean",
    }
}

fn parse_i64(v: &str) -> Option<i64> {
    v.trim().parse().ok()
}

fn parse_f64(v: &str) -> Option<f64> {
    v.trim().parse().ok()
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.trim() {
        "true" | "TRUE" | "True" | "1" => Some(true),
        "false" | "FALSE" | "False" | "0" => Some(false),
        _ => None,
    }
}

/// A record's raw bytes as text (invalid UTF-8 replaced, without its line end); one longer than
/// `limit` bytes is cut there and marked, never cut silently.
pub fn raw_text(raw: &[u8], limit: usize) -> String {
    let text = String::from_utf8_lossy(raw);
    let text = text.trim_end_matches(['\r', '\n']);
    if text.len() <= limit {
        return text.to_string();
    }
    format!(
        "{}... [truncated: {} of {} bytes]",
        truncate(text, limit),
        truncate(text, limit).len(),
        text.len()
    )
}

/// At most `max` bytes of `s`, cut at a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
