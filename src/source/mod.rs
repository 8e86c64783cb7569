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
mod types;

use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::datatypes::{Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use serde::Deserialize;

use crate::config::Format;
use crate::error::{Error, Result};

pub use columns::{LINEAGE, SOURCE_FILE, SOURCE_ROW, rejection};
pub use types::{BinaryEncoding, CellParser, ColumnType, EpochUnit, Formats, TypeOptions, Value};

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

/// One column of a schema file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnDef {
    /// Name of the column in the batch the query reads.
    pub name: String,
    /// Name in the file (CSV header, JSON key, Parquet column) when it differs from `name`.
    #[serde(default)]
    pub from: Option<String>,
    /// JSON: a dotted path to a nested field (`http.status`), instead of a top-level key; a
    /// numeric segment indexes an array (`tags.0`). Missing, or through a value that is not an
    /// object (or array, for a number), it is null. Not with `from`; JSON sources only.
    #[serde(default)]
    pub path: Option<String>,
    /// Type it is read as.
    #[serde(rename = "type")]
    pub ty: ColumnType,
    /// Date, timestamp, time: one chrono format or a list tried in order (default ISO 8601).
    #[serde(default)]
    pub format: Option<Formats>,
    /// Timestamp: the zone of values without an offset (IANA name or `+02:00`; default UTC).
    #[serde(default)]
    pub timezone: Option<String>,
    /// Timestamp, date: the values are epoch numbers of this unit (`s`, `ms`, `us`).
    #[serde(default)]
    pub unit: Option<EpochUnit>,
    /// Date, timestamp: the year of values whose format has none (syslog's `%b %d %H:%M:%S`).
    #[serde(default)]
    pub year: Option<i32>,
    /// Boolean: the spellings of true (case-insensitive; default true, t, yes, y, 1, on).
    #[serde(default)]
    pub true_values: Option<Vec<String>>,
    /// Boolean: the spellings of false (default false, f, no, n, 0, off).
    #[serde(default)]
    pub false_values: Option<Vec<String>>,
    /// Binary: `base64` (default) or `hex`.
    #[serde(default)]
    pub encoding: Option<BinaryEncoding>,
}

impl ColumnDef {
    /// A column of this name and type, no options.
    pub fn new(name: &str, ty: ColumnType) -> ColumnDef {
        ColumnDef {
            name: name.to_string(),
            ty,
            ..Default::default()
        }
    }

    /// The top-level name the file gives the column: `from`, a `path` of one segment, else
    /// `name`. For a nested path, the dotted path (for messages).
    pub fn file_name(&self) -> &str {
        self.from
            .as_deref()
            .or(self.path.as_deref())
            .unwrap_or(&self.name)
    }

    /// The segments of a nested `path` (two or more: `http.status` is `["http", "status"]`);
    /// `None` for a column read from a top-level key.
    pub fn nested_path(&self) -> Option<Vec<&str>> {
        let path = self.path.as_deref()?;
        let segments: Vec<&str> = path.split('.').collect();
        (segments.len() > 1).then_some(segments)
    }

    /// The column's parser; the error says which option is wrong.
    pub fn parser(&self) -> std::result::Result<CellParser, String> {
        CellParser::new(
            self.ty,
            &TypeOptions {
                format: self.format.clone(),
                timezone: self.timezone.clone(),
                unit: self.unit,
                year: self.year,
                true_values: self.true_values.clone(),
                false_values: self.false_values.clone(),
                encoding: self.encoding,
            },
        )
    }
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
        let mut seen_in_file = std::collections::HashSet::new();
        for c in &schema.columns {
            c.parser()
                .map_err(|e| Error::config(path, format!("column \"{}\": {e}", c.name)))?;
            if let Some(p) = &c.path {
                if c.from.is_some() {
                    return Err(Error::config(
                        path,
                        format!(
                            "column \"{}\": from and path both name the field; keep one",
                            c.name
                        ),
                    ));
                }
                if p.split('.').any(str::is_empty) {
                    return Err(Error::config(
                        path,
                        format!(
                            "column \"{}\": path \"{p}\" has an empty segment (write \
                             `a.b.c`: keys separated by single dots)",
                            c.name
                        ),
                    ));
                }
            }
            let nested = c.nested_path().is_some();
            if !seen_in_file.insert((nested, c.file_name())) {
                let what = if nested { "path" } else { "column" };
                return Err(Error::config(
                    path,
                    format!(
                        "column \"{}\": the file's {what} \"{}\" is read by another column too",
                        c.name,
                        c.file_name()
                    ),
                ));
            }
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

    /// Checks that the columns' options suit a source of this format: `path` reads nested JSON
    /// fields, so a CSV or Parquet source cannot have it. The error names the column.
    pub fn check_format(&self, format: Format) -> std::result::Result<(), String> {
        if matches!(format, Format::Json | Format::Jsonl) {
            return Ok(());
        }
        match self.columns.iter().find(|c| c.path.is_some()) {
            Some(c) => Err(format!(
                "column \"{}\": path = \"{}\" reads a nested JSON field, but the source is {}; \
                 path applies to jsonl and json sources (use from = \"...\" to rename a column)",
                c.name,
                c.path.as_deref().unwrap_or_default(),
                format.name()
            )),
            None => Ok(()),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn load(columns: &str) -> std::result::Result<SourceSchema, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(&path, format!("columns = {columns}\n")).unwrap();
        SourceSchema::load(&path).map_err(|e| e.to_string())
    }

    #[test]
    fn paths_are_checked_when_a_schema_loads() {
        let ok = load(
            r#"[{ name = "http", type = "json" }, { name = "status", path = "http.status", type = "int64" }, { name = "m", path = "http.method", type = "string" }]"#,
        )
        .unwrap();
        assert_eq!(ok.columns[1].nested_path(), Some(vec!["http", "status"]));
        assert_eq!(ok.check_format(Format::Jsonl), Ok(()));
        let e = ok.check_format(Format::Csv).unwrap_err();
        assert!(
            e.starts_with("column \"status\": path = \"http.status\""),
            "{e}"
        );
        let one = load(r#"[{ name = "s", path = "status", type = "string" }]"#).unwrap();
        assert_eq!(
            (one.columns[0].file_name(), one.columns[0].nested_path()),
            ("status", None)
        );
        for (columns, want) in [
            (
                r#"[{ name = "s", path = "a..b", type = "string" }]"#,
                "has an empty segment",
            ),
            (
                r#"[{ name = "s", from = "x", path = "a.b", type = "string" }]"#,
                "from and path",
            ),
            (
                r#"[{ name = "s", path = "a.b", type = "string" }, { name = "t", path = "a.b", type = "string" }]"#,
                "the file's path \"a.b\" is read by another column too",
            ),
            (
                r#"[{ name = "s", path = "a", type = "string" }, { name = "a", type = "string" }]"#,
                "the file's column \"a\" is read by another column too",
            ),
        ] {
            let e = load(columns).unwrap_err();
            assert!(e.contains(want), "{columns}: {e}");
        }
    }
}
