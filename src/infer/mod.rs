//! Schemas drafted from a sample file (`sluice schema infer`, `sluice init --sample`) and sample
//! files checked against a source's schema (`sluice validate --sample`).
//!
//! A draft reads a bounded sample (10,000 records by default, `.gz` / `.zst` decompressed): the
//! CSV dialect is sniffed ([`dialect`]), JSON keys are collected in first-seen order, then the
//! records are read by sluice's own readers with every column as text, and each column's type is
//! the narrowest one whose parser accepts every sampled value ([`column`]). So a drafted schema
//! reads the sample the way a run will. Whatever the draft is unsure of becomes a note: on
//! stderr as `note:` lines and as comments at the top of the schema.

pub mod check;
pub mod column;
pub mod dialect;
pub mod names;
pub mod project;
pub mod sample;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use datafusion::arrow::datatypes::DataType;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::config::{CsvOptions, Format};
use crate::error::{Error, Result};
use crate::source::{ColumnDef, ColumnType, SourceSchema};

pub use column::Inferred;
pub use dialect::Dialect;

/// Records a draft samples unless told otherwise.
pub const DEFAULT_ROWS: usize = 10_000;

/// One column of a draft.
#[derive(Debug, Clone)]
pub struct DraftColumn {
    /// The schema name (a plain SQL identifier).
    pub name: String,
    /// The file's name for it (CSV header, JSON key, Parquet column).
    pub file_name: String,
    /// Whether the file names it (a CSV file without a header does not).
    pub named: bool,
    /// What the sample says of it.
    pub inferred: Inferred,
    /// A comment for the schema line (why it is text, how to read nested values).
    pub hint: Option<String>,
}

impl DraftColumn {
    /// The schema entry.
    pub fn def(&self) -> ColumnDef {
        ColumnDef {
            from: (self.named && self.file_name != self.name).then(|| self.file_name.clone()),
            format: self
                .inferred
                .format
                .clone()
                .map(crate::source::Formats::One),
            unit: self.inferred.unit,
            ..ColumnDef::new(&self.name, self.inferred.ty)
        }
    }
}

/// A schema drafted from a sample.
#[derive(Debug, Clone)]
pub struct Draft {
    /// The sample file.
    pub file: PathBuf,
    /// Its format.
    pub format: Format,
    /// Its CSV dialect.
    pub dialect: Option<Dialect>,
    /// The columns, in file order.
    pub columns: Vec<DraftColumn>,
    /// What the draft is unsure of.
    pub notes: Vec<String>,
    /// Records sampled (read well).
    pub records: usize,
    /// Records of the sample the reader rejects.
    pub malformed: usize,
    /// Whether the sample is the whole file.
    pub complete: bool,
}

/// Drafts a schema from the first `rows` records of `path` (format from its name or content
/// unless given).
pub fn infer(path: &Path, format: Option<Format>, rows: usize) -> Result<Draft> {
    let rows = rows.max(1);
    let format = match format {
        Some(f) => f,
        None => sample::detect_format(path)?,
    };
    tracing::info!(file = %path.display(), format = sample::format_name(format), rows, "drafting a schema");
    let mut notes = Vec::new();
    let mut draft = match format {
        Format::Parquet => parquet(path, rows, &mut notes)?,
        Format::Csv => {
            let (head, complete) = sample::prefix(path, 2_000, 8 << 20)?;
            if head.iter().all(u8::is_ascii_whitespace) {
                return Err(empty(path));
            }
            let d = dialect::sniff(&head, complete, &mut notes);
            let schema_names = if d.header {
                names::schema_names(&d.names)
            } else {
                d.names.clone()
            };
            let csv = CsvOptions {
                delimiter: d.delimiter,
                quote: d.quote,
                header: d.header,
                ..Default::default()
            };
            let named = d.header;
            let keys: Vec<Key> = d
                .names
                .iter()
                .map(|n| Key {
                    name: n.clone(),
                    nested: None,
                })
                .collect();
            let mut draft = read(path, format, csv, &keys, &schema_names, named, rows)?;
            draft.dialect = Some(d);
            draft
        }
        Format::Jsonl | Format::Json => {
            let keys = json_keys(path, format, rows)?;
            if keys.is_empty() {
                return Err(Error::Read {
                    key: path.display().to_string(),
                    message: "no JSON object with keys in the sample".into(),
                });
            }
            let file_names: Vec<String> = keys.iter().map(|k| k.name.clone()).collect();
            let schema_names = names::schema_names(&file_names);
            read(
                path,
                format,
                CsvOptions::default(),
                &keys,
                &schema_names,
                true,
                rows,
            )?
        }
    };
    for c in &draft.columns {
        notes.extend(c.inferred.notes.iter().cloned());
        if let Some(why) = &c.inferred.fallback {
            notes.push(format!("{}: {why}: read as text", c.name));
        }
    }
    notes.extend(std::mem::take(&mut draft.notes));
    draft.notes = notes;
    Ok(draft)
}

fn empty(path: &Path) -> Error {
    Error::Read {
        key: path.display().to_string(),
        message: "the sample is empty".into(),
    }
}

/// A JSON key (or CSV column) of the sample.
struct Key {
    name: String,
    /// JSON: the first nested value (object or array) seen under it.
    nested: Option<String>,
}

/// Reads the sample as text with the real reader and drafts each column's type.
fn read(
    path: &Path,
    format: Format,
    csv: CsvOptions,
    keys: &[Key],
    schema_names: &[String],
    named: bool,
    rows: usize,
) -> Result<Draft> {
    let schema = SourceSchema {
        columns: keys
            .iter()
            .zip(schema_names)
            .map(|(k, n)| ColumnDef {
                from: (named && &k.name != n).then(|| k.name.clone()),
                ..ColumnDef::new(n, ColumnType::String)
            })
            .collect(),
    };
    let source = sample::source(format, csv);
    let text = sample::read_text(&source, &schema, path, rows)?;
    let mut notes = Vec::new();
    if text.is_empty() {
        if !(format == Format::Csv && named && !keys.is_empty()) {
            return Err(empty(path));
        }
        notes.push("no record below the header: every column read as text".into());
    }
    if !text.malformed.is_empty() {
        let first: Vec<String> = text
            .malformed
            .iter()
            .take(3)
            .map(|m| format!("line {}: {}", m.row, m.reason))
            .collect();
        notes.push(format!(
            "{} of {} sampled records are malformed and were left out (the reader rejects \
             them): {}",
            column::thousands(text.malformed.len()),
            column::thousands(text.len()),
            first.join("; ")
        ));
    }
    let columns = keys
        .iter()
        .zip(schema_names)
        .enumerate()
        .map(|(i, (k, name))| {
            let cells: Vec<Option<&str>> =
                text.records.iter().map(|r| r.cells[i].as_deref()).collect();
            let mut inferred = column::infer(name, &cells);
            if text.is_empty() {
                inferred.notes.clear();
            }
            let hint = match (&k.nested, &inferred.fallback) {
                (Some(v), _) => Some(format!(
                    "nested JSON in the sample ({}): read as its JSON text; path = \
                     \"{}.<field>\" reads one field (JSON path columns)",
                    column_text(v),
                    k.name
                )),
                (None, Some(why)) => Some(why.clone()),
                (None, None) => None,
            };
            DraftColumn {
                name: name.clone(),
                file_name: k.name.clone(),
                named,
                inferred,
                hint,
            }
        })
        .collect();
    Ok(Draft {
        file: path.to_path_buf(),
        format,
        dialect: None,
        columns,
        notes,
        records: text.records.len(),
        malformed: text.malformed.len(),
        complete: text.complete,
    })
}

/// A value cut for a comment.
fn column_text(v: &str) -> String {
    let v: String = v.chars().filter(|c| !c.is_control()).collect();
    if v.chars().count() > 40 {
        format!("{}...", v.chars().take(40).collect::<String>())
    } else {
        v
    }
}

/// The top-level keys of a JSON object, in order, with the nested values' text.
struct ObjectKeys(Vec<(String, Option<String>)>);

impl<'de> serde::Deserialize<'de> for ObjectKeys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ObjectKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<ObjectKeys, A::Error> {
                let mut keys = Vec::new();
                while let Some(k) = map.next_key::<String>()? {
                    let v: Box<RawValue> = map.next_value()?;
                    let text = v.get();
                    let nested = text.starts_with(['{', '[']).then(|| text.to_string());
                    keys.push((k, nested));
                }
                Ok(ObjectKeys(keys))
            }
        }
        d.deserialize_map(V)
    }
}

/// The union of the top-level keys of the sample's objects, in first-seen order.
fn json_keys(path: &Path, format: Format, rows: usize) -> Result<Vec<Key>> {
    let mut keys: Vec<Key> = Vec::new();
    let mut add = |object: ObjectKeys| {
        for (k, nested) in object.0 {
            match keys.iter_mut().find(|x| x.name == k) {
                Some(x) => {
                    if x.nested.is_none() {
                        x.nested = nested;
                    }
                }
                None => keys.push(Key { name: k, nested }),
            }
        }
    };
    if format == Format::Jsonl {
        let (data, _) = sample::prefix(path, rows, 256 << 20)?;
        for line in data.split(|&b| b == b'\n') {
            if let Ok(object) = serde_json::from_slice::<ObjectKeys>(line) {
                add(object);
            }
        }
    } else {
        let (data, _) = sample::prefix(path, usize::MAX, usize::MAX)?;
        let text = std::str::from_utf8(&data).map_err(|e| Error::Read {
            key: path.display().to_string(),
            message: format!("invalid UTF-8 at byte {}", e.valid_up_to() + 1),
        })?;
        let elements: Vec<Box<RawValue>> = if text.trim_start().starts_with('[') {
            serde_json::from_str(text)
        } else {
            serde_json::from_str::<Box<RawValue>>(text).map(|v| vec![v])
        }
        .map_err(|e| Error::Read {
            key: path.display().to_string(),
            message: format!("not a JSON document: {e}"),
        })?;
        for el in elements.iter().take(rows) {
            if let Ok(object) = serde_json::from_str::<ObjectKeys>(el.get()) {
                add(object);
            }
        }
    }
    Ok(keys)
}

/// A Parquet file's columns: its types, and nulls counted over the first `rows` rows.
fn parquet(path: &Path, rows: usize, notes: &mut Vec<String>) -> Result<Draft> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let fail = |message: String| Error::Read {
        key: path.display().to_string(),
        message,
    };
    let file = std::fs::File::open(path)
        .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| fail(format!("not a readable Parquet file: {e}")))?;
    let schema = builder.schema().clone();
    let reader = builder
        .with_batch_size(rows.min(crate::source::BATCH_ROWS))
        .build()
        .map_err(|e| fail(e.to_string()))?;
    let mut nulls = vec![0usize; schema.fields().len()];
    let mut seen = 0;
    for batch in reader {
        let batch = batch.map_err(|e| fail(e.to_string()))?;
        let take = batch.num_rows().min(rows - seen);
        for (i, n) in nulls.iter_mut().enumerate() {
            *n += batch.column(i).slice(0, take).null_count();
        }
        seen += take;
        if seen >= rows {
            break;
        }
    }
    let file_names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
    let schema_names = names::schema_names(&file_names);
    let mut columns = Vec::new();
    for ((field, name), nulls) in schema.fields().iter().zip(&schema_names).zip(nulls) {
        let Some(ty) = parquet_type(field.data_type()) else {
            notes.push(format!(
                "{}: a {} column, which sluice's Parquet reader cannot read as text: left out",
                field.name(),
                field.data_type()
            ));
            continue;
        };
        let mut inferred = column::infer(name, &[]);
        inferred.notes.clear();
        inferred.ty = ty;
        inferred.nullable = nulls > 0;
        inferred.values = seen - nulls;
        columns.push(DraftColumn {
            name: name.clone(),
            file_name: field.name().clone(),
            named: true,
            inferred,
            hint: None,
        });
    }
    if columns.is_empty() {
        return Err(fail("no column sluice can read".into()));
    }
    Ok(Draft {
        file: path.to_path_buf(),
        format: Format::Parquet,
        dialect: None,
        columns,
        notes: Vec::new(),
        records: seen,
        malformed: 0,
        complete: false,
    })
}

/// The schema type of a Parquet column's Arrow type (`None`: nested, not readable as text).
fn parquet_type(dt: &DataType) -> Option<ColumnType> {
    use ColumnType as C;
    Some(match dt {
        DataType::Boolean => C::Boolean,
        DataType::Int8 => C::Int8,
        DataType::Int16 => C::Int16,
        DataType::Int32 => C::Int32,
        DataType::Int64 => C::Int64,
        DataType::UInt8 => C::UInt8,
        DataType::UInt16 => C::UInt16,
        DataType::UInt32 => C::UInt32,
        DataType::UInt64 => C::UInt64,
        DataType::Float16 | DataType::Float32 => C::Float32,
        DataType::Float64 => C::Float64,
        DataType::Decimal32(p, s)
        | DataType::Decimal64(p, s)
        | DataType::Decimal128(p, s)
        | DataType::Decimal256(p, s)
            if *p <= 38 && *s >= 0 =>
        {
            C::Decimal {
                precision: *p,
                scale: *s,
            }
        }
        DataType::Date32 | DataType::Date64 => C::Date,
        DataType::Timestamp(_, _) => C::Timestamp,
        DataType::Time32(_) | DataType::Time64(_) => C::Time,
        DataType::Binary
        | DataType::LargeBinary
        | DataType::BinaryView
        | DataType::FixedSizeBinary(_) => C::Binary,
        other if datafusion::arrow::compute::can_cast_types(other, &DataType::Utf8) => C::String,
        _ => return None,
    })
}

/// A TOML basic string.
pub fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A comment's text on one line.
fn comment(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

impl Draft {
    /// The CSV options a source needs to read the file (`None`: not CSV).
    pub fn csv_options(&self) -> Option<CsvOptions> {
        self.dialect.as_ref().map(|d| CsvOptions {
            delimiter: d.delimiter,
            quote: d.quote,
            header: d.header,
            ..Default::default()
        })
    }

    /// The `[source.csv]` settings that differ from the defaults, as an inline table
    /// (`None`: none do, or not CSV).
    pub fn csv_inline(&self) -> Option<String> {
        let d = self.dialect.as_ref()?;
        let mut parts = Vec::new();
        if d.delimiter != ',' {
            parts.push(format!(
                "delimiter = {}",
                toml_str(&d.delimiter.to_string())
            ));
        }
        if d.quote != '"' {
            parts.push(format!("quote = {}", toml_str(&d.quote.to_string())));
        }
        if !d.header {
            parts.push("header = false".to_string());
        }
        (!parts.is_empty()).then(|| format!("{{ {} }}", parts.join(", ")))
    }

    /// The schema entries.
    pub fn schema(&self) -> SourceSchema {
        SourceSchema {
            columns: self.columns.iter().map(DraftColumn::def).collect(),
        }
    }

    /// The schema file: comments on the sample, the dialect and the notes, then `columns`.
    pub fn schema_toml(&self) -> String {
        let mut out = String::new();
        let n = self.records + self.malformed;
        let (n, s) = (column::thousands(n), if n == 1 { "" } else { "s" });
        let sampled = match (self.complete, self.format) {
            (_, Format::Parquet) => format!("{n} row{s} sampled"),
            (true, _) => format!("the whole file, {n} record{s}"),
            (false, _) => format!("its first {n} record{s}"),
        };
        let _ = writeln!(
            out,
            "# Drafted by sluice from {} ({}, {sampled}).",
            comment(&self.file.display().to_string()),
            sample::format_name(self.format)
        );
        if let Some(d) = &self.dialect {
            let _ = writeln!(
                out,
                "# CSV: delimiter {}, header = {}: the source needs {}.",
                toml_str(&d.delimiter.to_string()),
                d.header,
                self.csv_inline()
                    .map(|c| format!("csv = {c}"))
                    .unwrap_or_else(|| "no csv options (the defaults)".into())
            );
        }
        let always: Vec<&str> = self
            .columns
            .iter()
            .filter(|c| !c.inferred.nullable && c.inferred.values > 0)
            .map(|c| c.name.as_str())
            .collect();
        if !always.is_empty() && self.format != Format::Parquet {
            let _ = writeln!(
                out,
                "# Never null in the sample: {}.",
                comment(&always.join(", "))
            );
        }
        for n in &self.notes {
            let _ = writeln!(out, "# note: {}", comment(n));
        }
        out.push_str("columns = [\n");
        for c in &self.columns {
            let def = c.def();
            let mut line = format!("  {{ name = {}", toml_str(&def.name));
            if let Some(from) = &def.from {
                let _ = write!(line, ", from = {}", toml_str(from));
            }
            let _ = write!(line, ", type = {}", toml_str(&def.ty.to_string()));
            if let Some(f) = &c.inferred.format {
                let _ = write!(line, ", format = {}", toml_str(f));
            }
            if let Some(u) = c.inferred.unit {
                let u = match u {
                    crate::source::EpochUnit::Seconds => "s",
                    crate::source::EpochUnit::Millis => "ms",
                    crate::source::EpochUnit::Micros => "us",
                };
                let _ = write!(line, ", unit = {}", toml_str(u));
            }
            line.push_str(" },");
            if let Some(h) = &c.hint {
                let _ = write!(line, "  # {}", comment(h));
            }
            out.push_str(&line);
            out.push('\n');
        }
        out.push_str("]\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drafts_csv_and_json_lines_that_load_as_schemas() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("crm.csv");
        std::fs::write(
            &csv,
            "Customer ID,Created Date,Amount,Active,Score\n\
             1,01/13/2024 09:05,12.50,Yes,3\n\
             2,02/14/2024 17:45,3.99,No,n/a\n\
             3,,100.00,yes,4\n",
        )
        .unwrap();
        let d = infer(&csv, None, 100).unwrap();
        let text = d.schema_toml();
        let path = dir.path().join("crm.toml");
        std::fs::write(&path, &text).unwrap();
        let schema = SourceSchema::load(&path).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let got: Vec<(String, Option<String>, String)> = schema
            .columns
            .iter()
            .map(|c| (c.name.clone(), c.from.clone(), c.ty.to_string()))
            .collect();
        let want = [
            ("customer_id", "Customer ID", "int64"),
            ("created_date", "Created Date", "timestamp"),
            ("amount", "Amount", "decimal(18,2)"),
            ("active", "Active", "boolean"),
            ("score", "Score", "string"),
        ];
        for (g, w) in got.iter().zip(want) {
            assert_eq!(
                (g.0.as_str(), g.1.as_deref(), g.2.as_str()),
                (w.0, Some(w.1), w.2)
            );
        }
        assert!(d.columns[1].inferred.nullable);
        assert!(text.contains("format = \"%m/%d/%Y %H:%M\""), "{text}");
        assert!(
            text.contains("# Never null in the sample: customer_id, amount, active, score."),
            "{text}"
        );
        assert!(
            text.contains("# 1 of 3 values are not integers: \"n/a\""),
            "{text}"
        );

        let jsonl = dir.path().join("logs.jsonl");
        std::fs::write(
            &jsonl,
            "{\"ts\":\"2024-03-01T00:00:00Z\",\"n\":1,\"ctx\":{\"a\":1}}\n\
             {\"ts\":\"2024-03-01 00:00:05\",\"userId\":\"u1\",\"n\":2.5}\n\
             not json\n",
        )
        .unwrap();
        let d = infer(&jsonl, None, 100).unwrap();
        let names: Vec<&str> = d.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["ts", "n", "ctx", "user_id"]);
        let types: Vec<String> = d
            .columns
            .iter()
            .map(|c| c.inferred.ty.to_string())
            .collect();
        assert_eq!(types, ["timestamp", "float64", "string", "string"]);
        assert_eq!(d.malformed, 1);
        let text = d.schema_toml();
        assert!(
            text.contains("path = \\\"ctx.<field>\\\"") || text.contains("ctx.<field>"),
            "{text}"
        );
        std::fs::write(&path, &text).unwrap();
        SourceSchema::load(&path).unwrap_or_else(|e| panic!("{e}\n{text}"));
    }
}
