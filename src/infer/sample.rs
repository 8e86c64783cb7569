//! Bounded reads of a sample file: its first bytes (decompressed) for sniffing, and its first
//! records as text cells through the real readers (the feed with an all-text schema), so that
//! what inference and `validate --sample` see of a cell is exactly what a run's parser gets.

use std::io::Read;
use std::path::{Path, PathBuf};

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::Int64Type;

use crate::config::{CsvOptions, Format, SourceConfig};
use crate::error::{Error, Result};
use crate::source::feed::{Feed, FeedFile};
use crate::source::{ColumnDef, ColumnType, Compression, Malformed, SourceSchema};

/// Chunks the feed reads a sample in.
const CHUNK_BYTES: usize = 1 << 20;

/// The stored bytes of a local file, decompressed by its name (`.gz`, `.zst`).
pub fn open(path: &Path) -> Result<Box<dyn Read + Send>> {
    let file = std::fs::File::open(path)
        .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
    let name = path.to_string_lossy();
    Ok(match Compression::from_key(&name).0 {
        Compression::None => Box::new(file),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(file)),
        Compression::Zstd => {
            Box::new(
                zstd::stream::read::Decoder::new(file).map_err(|e| Error::Read {
                    key: name.to_string(),
                    message: format!("cannot start zstd decoding: {e}"),
                })?,
            )
        }
    })
}

/// The first bytes of a file, decompressed: whole lines, at most `max_lines` of them and about
/// `max_bytes`; and whether that is the whole file.
pub fn prefix(path: &Path, max_lines: usize, max_bytes: usize) -> Result<(Vec<u8>, bool)> {
    let mut reader = open(path)?;
    let mut data = Vec::new();
    let mut lines = 0;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok((data, true)),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(Error::Read {
                    key: path.display().to_string(),
                    message: format!("cannot read: {e}"),
                });
            }
        };
        let start = data.len();
        data.extend_from_slice(&buf[..n]);
        for p in memchr::memchr_iter(b'\n', &data[start..]) {
            lines += 1;
            if lines >= max_lines {
                data.truncate(start + p + 1);
                return Ok((data, false));
            }
        }
        if data.len() >= max_bytes {
            // Whole lines only (one line longer than the bound: all of it read so far).
            if let Some(p) = memchr::memrchr(b'\n', &data) {
                data.truncate(p + 1);
            }
            return Ok((data, false));
        }
    }
}

/// One record of a sample, as the reader's text cells.
#[derive(Debug, Clone)]
pub struct TextRecord {
    /// The line its record starts at.
    pub line: u64,
    /// Its cells in schema order (`None`: null or missing).
    pub cells: Vec<Option<String>>,
}

/// The first records of a file as text.
#[derive(Debug, Default)]
pub struct TextSample {
    /// Records read, in line order.
    pub records: Vec<TextRecord>,
    /// Records the reader rejected (wrong field count, invalid UTF-8, bad JSON), in line order.
    pub malformed: Vec<Malformed>,
    /// Whether the whole file was read.
    pub complete: bool,
}

impl TextSample {
    /// Records seen, good and malformed.
    pub fn len(&self) -> usize {
        self.records.len() + self.malformed.len()
    }

    /// Whether no record was seen.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `schema` with every column read as text (names, `from` and `path` kept), but `json` columns,
/// whose cells the reader may give another text than a string column's: those stay as they are.
pub fn text_schema(schema: &SourceSchema) -> SourceSchema {
    SourceSchema {
        columns: schema
            .columns
            .iter()
            .map(|c| match c.ty {
                ColumnType::Json => c.clone(),
                _ => ColumnDef {
                    name: c.name.clone(),
                    from: c.from.clone(),
                    path: c.path.clone(),
                    ..ColumnDef::new(&c.name, ColumnType::String)
                },
            })
            .collect(),
    }
}

/// A source of this format and CSV dialect, for reading a local sample.
pub fn source(format: Format, csv: CsvOptions) -> SourceConfig {
    SourceConfig {
        name: "sample".into(),
        prefix: None,
        format,
        schema: PathBuf::from("sample.toml"),
        csv,
        header_case: Default::default(),
        encoding: Default::default(),
        expect_every: None,
        expect_at: None,
        timezone: None,
    }
}

/// The first `rows` records of `path` read by `source`'s reader with `schema`, whose columns
/// must all be text: the cells exactly as the reader hands them to the columns' parsers.
pub fn read_text(
    source: &SourceConfig,
    schema: &SourceSchema,
    path: &Path,
    rows: usize,
) -> Result<TextSample> {
    let rows = rows.max(1);
    let file = std::fs::File::open(path)
        .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
    let key = path.to_string_lossy().into_owned();
    let feed = Feed::new(
        source,
        schema,
        vec![FeedFile {
            key,
            reader: Box::new(file),
        }],
        CHUNK_BYTES,
    );
    let width = schema.columns.len();
    let mut records = Vec::new();
    let mut complete = true;
    while let Some(out) = feed.next_rows() {
        for batch in &out.batches {
            let lines = batch.column(width + 1).as_primitive::<Int64Type>();
            let cols: Vec<_> = (0..width)
                .map(|i| batch.column(i).as_string::<i32>())
                .collect();
            for r in 0..batch.num_rows() {
                records.push(TextRecord {
                    line: lines.value(r) as u64,
                    cells: cols
                        .iter()
                        .map(|c| c.is_valid(r).then(|| c.value(r).to_string()))
                        .collect(),
                });
            }
        }
        if records.len() >= rows {
            complete = false;
            break;
        }
    }
    let (reads, broken) = feed.finish();
    if let Some(b) = broken {
        return Err(b.error);
    }
    let mut malformed = Vec::new();
    if let Some(read) = reads.into_iter().next() {
        if let Some(e) = read.error {
            return Err(e);
        }
        malformed = read.malformed;
    }
    malformed.sort_by_key(|m| m.row);
    // The first `rows` records, good or malformed, by line.
    let mut lines: Vec<u64> = records
        .iter()
        .map(|r| r.line)
        .chain(malformed.iter().map(|m| m.row))
        .collect();
    if lines.len() > rows {
        lines.sort_unstable();
        let last = lines[rows - 1];
        records.retain(|r| r.line <= last);
        malformed.retain(|m| m.row <= last);
        complete = false;
    }
    Ok(TextSample {
        records,
        malformed,
        complete,
    })
}

/// Reads the first `rows` rows of `path` with `source`'s reader and `schema` as typed (Parquet
/// columns are cast whole, so a failure is the file's); the rows read.
pub fn read_typed(
    source: &SourceConfig,
    schema: &SourceSchema,
    path: &Path,
    rows: usize,
) -> Result<usize> {
    let file = std::fs::File::open(path)
        .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
    let feed = Feed::new(
        source,
        schema,
        vec![FeedFile {
            key: path.to_string_lossy().into_owned(),
            reader: Box::new(file),
        }],
        CHUNK_BYTES,
    );
    let mut n = 0;
    while let Some(out) = feed.next_rows() {
        n += out.good_rows() as usize;
        if n >= rows {
            break;
        }
    }
    let (reads, broken) = feed.finish();
    if let Some(b) = broken {
        return Err(b.error);
    }
    if let Some(e) = reads.into_iter().next().and_then(|r| r.error) {
        return Err(e);
    }
    Ok(n.min(rows))
}

/// The name of a format in the config.
pub fn format_name(format: Format) -> &'static str {
    match format {
        Format::Csv => "csv",
        Format::Jsonl => "jsonl",
        Format::Json => "json",
        Format::Parquet => "parquet",
    }
}

/// A file's format from its name (before `.gz` / `.zst`), else from its first bytes: Parquet's
/// magic number, `[` for a JSON document, `{` for JSON lines (or one object over several lines),
/// anything else CSV.
pub fn detect_format(path: &Path) -> Result<Format> {
    let name = path.to_string_lossy();
    let (_, base) = Compression::from_key(&name);
    let ext = base.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("csv" | "tsv" | "txt") => return Ok(Format::Csv),
        Some("jsonl" | "ndjson") => return Ok(Format::Jsonl),
        Some("parquet") => return Ok(Format::Parquet),
        _ => {}
    }
    let (head, _) = prefix(path, 2, 1 << 20)?;
    if head.starts_with(b"PAR1") {
        return Ok(Format::Parquet);
    }
    let text = String::from_utf8_lossy(&head);
    let text = text.trim_start_matches('\u{feff}').trim_start();
    if text.starts_with('[') {
        return Ok(Format::Json);
    }
    if text.starts_with('{') {
        // JSON lines if the first line is a whole object.
        let first = text.lines().next().unwrap_or_default();
        let whole = serde_json::from_str::<serde::de::IgnoredAny>(first).is_ok();
        return Ok(if whole { Format::Jsonl } else { Format::Json });
    }
    if ext.as_deref() == Some("json") {
        return Ok(Format::Jsonl);
    }
    Ok(Format::Csv)
}
