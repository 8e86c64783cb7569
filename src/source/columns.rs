//! Column builders shared by the readers: typed conversion of text cells, lineage columns.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder, DictionaryArray,
    Float32Builder, Float64Builder, Int8Builder, Int16Builder, Int32Array, Int32Builder,
    Int64Array, Int64Builder, StringArray, StringBuilder, Time64MicrosecondBuilder,
    TimestampMicrosecondBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Int32Type, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;

use super::{
    BATCH_ROWS, CellParser, ColumnType, Malformed, RAW_LIMIT, ReadOutput, SourceSchema, Value,
};
use crate::config::HeaderCase;
use crate::error::Result;

/// Name of the column holding the raw file's key.
pub const SOURCE_FILE: &str = "_source_file";
/// Name of the column holding the line where the row's record starts.
pub const SOURCE_ROW: &str = "_source_row";
/// Name of the stored column naming each row's raw file (its key under `raw/`): row lineage,
/// what `sluice reprocess` finds a file's rows by.
pub const LINEAGE: &str = "_sluice_source";

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
    /// How each column's cells are parsed, in schema order.
    pub parsers: Vec<CellParser>,
    /// Column names in the batches, in schema order.
    pub names: Vec<String>,
    /// Column names in the files (`from`, else the name), in schema order.
    pub file_names: Vec<String>,
    /// Column position by its name in the files (lower-cased when matching ignores case).
    index: HashMap<String, usize>,
    /// Columns read at nested JSON paths, by their top-level key.
    nested: HashMap<String, PathNode>,
    /// Whether column `i` is read at a nested path (not a top-level name).
    is_nested: Vec<bool>,
    /// How file column names match.
    case: HeaderCase,
}

/// Columns read at nested JSON paths below one key: the column at this very path, if one is,
/// and the keys further down.
#[derive(Debug, Default)]
pub struct PathNode {
    /// The column read at this path.
    pub column: Option<usize>,
    /// Keys below (lower-cased when matching ignores case); a numeric key also indexes an array.
    children: HashMap<String, PathNode>,
}

impl PathNode {
    /// Whether columns are read below this path.
    pub fn has_children(&self) -> bool {
        !self.children.is_empty()
    }

    /// The child at array index `i`.
    pub fn element(&self, i: usize) -> Option<&PathNode> {
        self.children.get(&i.to_string())
    }

    /// The highest array index a child reads (`None`: no numeric key).
    pub fn last_element(&self) -> Option<usize> {
        self.children.keys().filter_map(|k| k.parse().ok()).max()
    }
}

impl ReadContext {
    /// Prepares a schema for reading (its columns' options were checked when it was loaded).
    pub fn new(schema: &SourceSchema, case: HeaderCase) -> ReadContext {
        let key = |n: &str| match case {
            HeaderCase::Exact => n.to_string(),
            HeaderCase::Insensitive => n.to_lowercase(),
        };
        let mut nested: HashMap<String, PathNode> = HashMap::new();
        for (i, c) in schema.columns.iter().enumerate() {
            let Some(segments) = c.nested_path() else {
                continue;
            };
            let Some((first, rest)) = segments.split_first() else {
                continue;
            };
            let mut node = nested.entry(key(first)).or_default();
            for s in rest {
                node = node.children.entry(key(s)).or_default();
            }
            node.column = Some(i);
        }
        ReadContext {
            is_nested: schema
                .columns
                .iter()
                .map(|c| c.nested_path().is_some())
                .collect(),
            nested,
            schema: schema.arrow_schema(),
            parsers: schema
                .columns
                .iter()
                .map(|c| c.parser().unwrap_or_else(|_| CellParser::text()))
                .collect(),
            names: schema.columns.iter().map(|c| c.name.clone()).collect(),
            file_names: schema
                .columns
                .iter()
                .map(|c| c.file_name().to_string())
                .collect(),
            index: schema
                .columns
                .iter()
                .enumerate()
                .filter(|(_, c)| c.nested_path().is_none())
                .map(|(i, c)| (key(c.file_name()), i))
                .collect(),
            case,
        }
    }

    /// The schema column a file column of this name is (`None`: not in the schema).
    pub fn column(&self, file_name: &str) -> Option<usize> {
        match self.case {
            HeaderCase::Exact => self.index.get(file_name).copied(),
            HeaderCase::Insensitive => self.index.get(&file_name.to_lowercase()).copied(),
        }
    }

    /// The nested-path columns below a top-level key (`None`: none).
    pub fn nested(&self, key: &str) -> Option<&PathNode> {
        if self.nested.is_empty() {
            return None;
        }
        match self.case {
            HeaderCase::Exact => self.nested.get(key),
            HeaderCase::Insensitive => self.nested.get(&key.to_lowercase()),
        }
    }

    /// The child of a path node at object key `key` (`None`: no column below it).
    pub fn child<'n>(&self, node: &'n PathNode, key: &str) -> Option<&'n PathNode> {
        match self.case {
            HeaderCase::Exact => node.children.get(key),
            HeaderCase::Insensitive => node.children.get(&key.to_lowercase()),
        }
    }

    /// Whether column `i` keeps a value's JSON text (`type = "json"`): a string with its quotes.
    pub fn keeps_json(&self, i: usize) -> bool {
        self.parsers[i].ty() == ColumnType::Json
    }

    /// Whether a file column name is schema column `i`'s (a top-level one).
    pub fn is_column(&self, file_name: &str, i: usize) -> bool {
        if self.is_nested[i] {
            return false;
        }
        match self.case {
            HeaderCase::Exact => self.file_names[i] == file_name,
            HeaderCase::Insensitive => {
                self.file_names[i].to_lowercase() == file_name.to_lowercase()
            }
        }
    }

    /// Why a cell of column `i` was rejected: `column c: "v" is not a valid <type (format)>`.
    pub fn not_valid(&self, i: usize, value: &str) -> String {
        rejection(&self.names[i], value, &self.parsers[i])
    }

    /// Parses a column of text cells into column `i`'s type: the array (a cell that does not
    /// parse is null in it) and the rows that did not parse, with why.
    pub fn parse_column<'v>(
        &self,
        i: usize,
        cells: impl Iterator<Item = Option<&'v str>>,
    ) -> Result<(ArrayRef, Vec<(usize, String)>), String> {
        let mut b = ColBuilder::new(self.schema.field(i).data_type());
        let mut bad = Vec::new();
        for (row, cell) in cells.enumerate() {
            match cell.map(|v| (v, self.parsers[i].parse(v))) {
                None => b.append_null(),
                Some((_, Some(v))) => b.append(&v),
                Some((v, None)) => {
                    b.append_null();
                    bad.push((row, self.not_valid(i, v)));
                }
            }
        }
        Ok((b.finish()?, bad))
    }

    /// Number of data columns (without lineage).
    pub fn width(&self) -> usize {
        self.parsers.len()
    }
}

/// An Arrow builder of one column's type.
enum ColBuilder {
    Str(StringBuilder),
    Bool(BooleanBuilder),
    I8(Int8Builder),
    I16(Int16Builder),
    I32(Int32Builder),
    I64(Int64Builder),
    F32(Float32Builder),
    F64(Float64Builder),
    Decimal(Decimal128Builder, u8, i8),
    Date(Date32Builder),
    Timestamp(TimestampMicrosecondBuilder),
    Time(Time64MicrosecondBuilder),
    Binary(BinaryBuilder),
}

impl ColBuilder {
    fn new(dt: &DataType) -> ColBuilder {
        let n = BATCH_ROWS;
        match dt {
            DataType::Boolean => ColBuilder::Bool(BooleanBuilder::with_capacity(n)),
            DataType::Int8 => ColBuilder::I8(Int8Builder::with_capacity(n)),
            DataType::Int16 => ColBuilder::I16(Int16Builder::with_capacity(n)),
            DataType::Int32 => ColBuilder::I32(Int32Builder::with_capacity(n)),
            DataType::Int64 => ColBuilder::I64(Int64Builder::with_capacity(n)),
            DataType::Float32 => ColBuilder::F32(Float32Builder::with_capacity(n)),
            DataType::Float64 => ColBuilder::F64(Float64Builder::with_capacity(n)),
            DataType::Decimal128(p, s) => {
                ColBuilder::Decimal(Decimal128Builder::with_capacity(n), *p, *s)
            }
            DataType::Date32 => ColBuilder::Date(Date32Builder::with_capacity(n)),
            DataType::Timestamp(_, _) => {
                ColBuilder::Timestamp(TimestampMicrosecondBuilder::with_capacity(n))
            }
            DataType::Time64(_) => ColBuilder::Time(Time64MicrosecondBuilder::with_capacity(n)),
            DataType::Binary => ColBuilder::Binary(BinaryBuilder::with_capacity(n, n * 16)),
            _ => ColBuilder::Str(StringBuilder::with_capacity(n, n * 16)),
        }
    }

    /// Appends a value parsed for this column's type (a value of another shape: null).
    fn append(&mut self, v: &Value<'_>) {
        match (self, v) {
            (ColBuilder::Str(b), Value::Str(s)) => b.append_value(s),
            (ColBuilder::Bool(b), Value::Bool(x)) => b.append_value(*x),
            (ColBuilder::I8(b), Value::Int(x)) => b.append_value(*x as i8),
            (ColBuilder::I16(b), Value::Int(x)) => b.append_value(*x as i16),
            (ColBuilder::I32(b), Value::Int(x)) => b.append_value(*x as i32),
            (ColBuilder::I64(b), Value::Int(x)) => b.append_value(*x),
            (ColBuilder::F32(b), Value::Float(x)) => b.append_value(*x as f32),
            (ColBuilder::F64(b), Value::Float(x)) => b.append_value(*x),
            (ColBuilder::Decimal(b, _, _), Value::Decimal(x)) => b.append_value(*x),
            (ColBuilder::Date(b), Value::Int(x)) => b.append_value(*x as i32),
            (ColBuilder::Timestamp(b), Value::Int(x)) => b.append_value(*x),
            (ColBuilder::Time(b), Value::Int(x)) => b.append_value(*x),
            (ColBuilder::Binary(b), Value::Bytes(x)) => b.append_value(x),
            (c, _) => c.append_null(),
        }
    }

    fn append_null(&mut self) {
        match self {
            ColBuilder::Str(b) => b.append_null(),
            ColBuilder::Bool(b) => b.append_null(),
            ColBuilder::I8(b) => b.append_null(),
            ColBuilder::I16(b) => b.append_null(),
            ColBuilder::I32(b) => b.append_null(),
            ColBuilder::I64(b) => b.append_null(),
            ColBuilder::F32(b) => b.append_null(),
            ColBuilder::F64(b) => b.append_null(),
            ColBuilder::Decimal(b, _, _) => b.append_null(),
            ColBuilder::Date(b) => b.append_null(),
            ColBuilder::Timestamp(b) => b.append_null(),
            ColBuilder::Time(b) => b.append_null(),
            ColBuilder::Binary(b) => b.append_null(),
        }
    }

    fn finish(&mut self) -> Result<ArrayRef, String> {
        Ok(match self {
            ColBuilder::Str(b) => Arc::new(b.finish()),
            ColBuilder::Bool(b) => Arc::new(b.finish()),
            ColBuilder::I8(b) => Arc::new(b.finish()),
            ColBuilder::I16(b) => Arc::new(b.finish()),
            ColBuilder::I32(b) => Arc::new(b.finish()),
            ColBuilder::I64(b) => Arc::new(b.finish()),
            ColBuilder::F32(b) => Arc::new(b.finish()),
            ColBuilder::F64(b) => Arc::new(b.finish()),
            ColBuilder::Decimal(b, p, s) => Arc::new(
                b.finish()
                    .with_precision_and_scale(*p, *s)
                    .map_err(|e| e.to_string())?,
            ),
            ColBuilder::Date(b) => Arc::new(b.finish()),
            ColBuilder::Timestamp(b) => Arc::new(b.finish()),
            ColBuilder::Time(b) => Arc::new(b.finish()),
            ColBuilder::Binary(b) => Arc::new(b.finish()),
        })
    }
}

/// Accumulates rows of one file (or chunk) into batches.
pub struct RowBuilder<'c> {
    ctx: &'c ReadContext,
    file: Arc<StringArray>,
    cols: Vec<ColBuilder>,
    rows: Vec<i64>,
    out: ReadOutput,
    raw_limit: usize,
    /// The columns that are not plain text: their cells are parsed before a row goes in.
    typed: Vec<usize>,
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
            typed: (0..ctx.width())
                .filter(|&i| ctx.parsers[i].ty() != ColumnType::String)
                .collect(),
        }
    }

    /// Bounds the raw text of malformed records at `limit` bytes (cut with a mark beyond).
    pub fn raw_limit(mut self, limit: usize) -> Self {
        self.raw_limit = limit;
        self
    }

    fn fresh(ctx: &ReadContext) -> Vec<ColBuilder> {
        ctx.schema
            .fields()
            .iter()
            .take(ctx.width())
            .map(|f| ColBuilder::new(f.data_type()))
            .collect()
    }

    /// Adds a row of text cells (`cell(i)`: schema column `i`, `None` for null). A cell that
    /// does not convert to its column's type makes the row malformed: the error says which,
    /// the value and the type with its format.
    pub fn push<'v>(
        &mut self,
        cell: impl Fn(usize) -> Option<&'v str>,
        row: u64,
    ) -> Result<(), String> {
        // The typed cells first (on the stack for up to 8): a row goes in whole or not at all.
        let mut values: smallvec::SmallVec<[Value<'v>; 8]> = smallvec::SmallVec::new();
        for &i in &self.typed {
            values.push(match cell(i) {
                None => Value::Null,
                Some(v) => self.ctx.parsers[i]
                    .parse(v)
                    .ok_or_else(|| self.ctx.not_valid(i, v))?,
            });
        }
        let mut values = values.into_iter();
        let mut next_typed = self.typed.iter().peekable();
        for (i, col) in self.cols.iter_mut().enumerate() {
            if next_typed.next_if(|&&t| t == i).is_some() {
                col.append(&values.next().unwrap_or(Value::Null));
                continue;
            }
            match (col, cell(i)) {
                (ColBuilder::Str(b), v) => b.append_option(v),
                (c, _) => c.append_null(),
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
            .map(ColBuilder::finish)
            .collect::<Result<_, _>>()?;
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

/// Why a cell does not convert to its column's type, as the rejected row says it: the column,
/// the value and the type with its format.
pub fn rejection(column: &str, value: &str, parser: &CellParser) -> String {
    format!(
        "column {column}: {:?} is not a valid {}",
        truncate(value, 80),
        parser.label()
    )
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
