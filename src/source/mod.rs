//! Sources: schema files, decompression and the readers that turn raw files into Arrow batches.
//!
//! Readers are permissive like Spark's PERMISSIVE mode: a record that cannot be parsed becomes a
//! [`Malformed`] row (raw text, line number, reason) and the rest of the file goes on; only a file
//! that cannot be read at all (truncated compression, unreadable) fails as a whole. Every row
//! carries `_source_file` and `_source_row` (the line where its record starts).

mod columns;
mod csv;
pub mod feed;
mod json;
mod parquet;

use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use serde::Deserialize;

use crate::config::Format;
use crate::error::{Error, Result};

pub use columns::{SOURCE_FILE, SOURCE_ROW};

/// Rows per batch produced by the readers.
pub const BATCH_ROWS: usize = 65_536;

/// A record the reader could not turn into a row.
#[derive(Debug, Clone)]
pub struct Malformed {
    /// Line number where the record starts (1-based).
    pub row: u64,
    /// Why it was not read.
    pub reason: String,
    /// The record's text (invalid UTF-8 replaced); beyond a bound, cut with a mark saying so.
    pub raw: String,
    /// A CSV record rejected for an unclosed quote (counted apart in the report).
    pub unclosed_quote: bool,
}

/// Bound of a malformed record's raw text, unless the source sets one (`csv.max_field_size`).
pub const RAW_LIMIT: usize = 1 << 20;

/// What a reader made of one file.
#[derive(Debug, Clone, Default)]
pub struct ReadOutput {
    /// Rows, with the schema's columns then `_source_file`, `_source_row`.
    pub batches: Vec<RecordBatch>,
    /// Records that could not be read.
    pub malformed: Vec<Malformed>,
}

impl ReadOutput {
    /// Rows read: good ones plus malformed ones.
    pub fn rows_read(&self) -> u64 {
        self.good_rows() + self.malformed.len() as u64
    }

    /// Rows that made it into batches.
    pub fn good_rows(&self) -> u64 {
        self.batches.iter().map(|b| b.num_rows() as u64).sum()
    }
}

/// A column type in a schema file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColumnType {
    /// UTF-8 text; any JSON value is accepted (numbers and nested values as their JSON text).
    #[serde(alias = "text", alias = "varchar", alias = "utf8")]
    String,
    /// 64-bit signed integer.
    #[serde(alias = "bigint", alias = "int", alias = "integer", alias = "long")]
    Int64,
    /// 64-bit float.
    #[serde(alias = "double", alias = "float")]
    Float64,
    /// true / false.
    #[serde(alias = "bool")]
    Boolean,
}

impl ColumnType {
    fn data_type(self) -> DataType {
        match self {
            ColumnType::String => DataType::Utf8,
            ColumnType::Int64 => DataType::Int64,
            ColumnType::Float64 => DataType::Float64,
            ColumnType::Boolean => DataType::Boolean,
        }
    }
}

/// One column of a schema file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnDef {
    /// Name in the file (CSV header, JSON key, Parquet column).
    pub name: String,
    /// Type it is read as.
    #[serde(rename = "type")]
    pub ty: ColumnType,
}

/// A schema file: `columns = [{ name = "ts", type = "string" }, ...]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSchema {
    /// The columns, in order.
    pub columns: Vec<ColumnDef>,
}

impl SourceSchema {
    /// Loads a schema file.
    pub fn load(path: &Path) -> Result<SourceSchema> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::config(path, format!("cannot read schema file: {e}")))?;
        let schema: SourceSchema =
            toml::from_str(&text).map_err(|e| Error::config(path, e.to_string().trim_end()))?;
        if schema.columns.is_empty() {
            return Err(Error::config(path, "the schema has no columns"));
        }
        let mut seen = std::collections::HashSet::new();
        for c in &schema.columns {
            if !seen.insert(c.name.as_str()) {
                return Err(Error::config(
                    path,
                    format!("column \"{}\" is listed twice", c.name),
                ));
            }
            if c.name.starts_with("_source_") {
                return Err(Error::config(
                    path,
                    format!(
                        "column \"{}\": names starting with _source_ are reserved",
                        c.name
                    ),
                ));
            }
        }
        Ok(schema)
    }

    /// The Arrow schema of the batches readers produce (with the lineage columns).
    pub fn arrow_schema(&self) -> SchemaRef {
        let mut fields: Vec<Field> = self
            .columns
            .iter()
            .map(|c| Field::new(&c.name, c.ty.data_type(), true))
            .collect();
        fields.extend(columns::lineage_fields());
        Arc::new(Schema::new(fields))
    }
}

/// How a file is compressed, from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Not compressed.
    None,
    /// `.gz`
    Gzip,
    /// `.zst` / `.zstd`
    Zstd,
}

impl Compression {
    /// Compression and the name without the compression extension.
    pub fn from_key(key: &str) -> (Compression, &str) {
        if let Some(k) = key.strip_suffix(".gz") {
            (Compression::Gzip, k)
        } else if let Some(k) = key
            .strip_suffix(".zst")
            .or_else(|| key.strip_suffix(".zstd"))
        {
            (Compression::Zstd, k)
        } else {
            (Compression::None, key)
        }
    }
}

/// Whether a key looks like a file of this source's format.
pub fn matches_format(key: &str, format: Format) -> bool {
    let (_, base) = Compression::from_key(key);
    let name = base.rsplit('/').next().unwrap_or(base);
    if name.starts_with('.') || name.starts_with('_') {
        return false;
    }
    match name.rsplit_once('.') {
        Some((_, ext)) => format
            .extensions()
            .iter()
            .any(|e| e.eq_ignore_ascii_case(ext)),
        None => false,
    }
}
