//! `sluice validate --sample FILE`: the first records of a sample read with a configured
//! source's reader and schema. Reported: the schema's columns the file lacks (with the file's
//! columns and a close match), the file's columns the schema ignores, and per column the sampled
//! values that fail its type or format (the first few, with the rejection a run would record).
//! Records the reader rejects whole (wrong field count, invalid UTF-8, bad JSON) are noted.

use std::fmt::Write as _;
use std::path::Path;

use super::column::thousands;
use super::sample;
use crate::config::{Config, Format, HeaderCase, SourceConfig};
use crate::error::{Error, Result};
use crate::source::{ColumnDef, SourceSchema, matches_format, rejection};

/// Records of the sample checked unless told otherwise.
pub const DEFAULT_ROWS: usize = 1_000;

/// What the check found.
#[derive(Debug)]
pub struct SampleReport {
    /// The report, one finding a line.
    pub text: String,
    /// No missing column, no failing value.
    pub ok: bool,
}

/// The source that reads `path`: the one named, the only one, the one whose raw prefix is in the
/// path, or the only one whose format takes the file name.
pub fn pick_source<'c>(
    config: &'c Config,
    path: &Path,
    name: Option<&str>,
) -> Result<&'c SourceConfig> {
    let names = || {
        config
            .sources
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(n) = name {
        return config.source(n).ok_or_else(|| {
            Error::config(
                &config.path,
                format!("--source {n}: no such source (sources: {})", names()),
            )
        });
    }
    if let [only] = config.sources.as_slice() {
        return Ok(only);
    }
    let p = path.to_string_lossy().replace('\\', "/");
    let by_prefix: Vec<&SourceConfig> = config
        .sources
        .iter()
        .filter(|s| {
            let prefix = format!("{}/", s.raw_prefix());
            p.starts_with(&prefix) || p.contains(&format!("/{prefix}"))
        })
        .collect();
    if let [only] = by_prefix.as_slice() {
        return Ok(only);
    }
    let by_format: Vec<&SourceConfig> = config
        .sources
        .iter()
        .filter(|s| matches_format(&p, s.format))
        .collect();
    match by_format.as_slice() {
        [only] => Ok(only),
        [] => Err(Error::config(
            &config.path,
            format!(
                "no source reads files like {} (sources: {}); name one with --source",
                path.display(),
                names()
            ),
        )),
        several => Err(Error::config(
            &config.path,
            format!(
                "several sources could read {} ({}); name one with --source",
                path.display(),
                several
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// The columns a file has: its names, or (CSV without a header) how many fields it has.
enum FileColumns {
    Named(Vec<String>),
    Positional(usize),
}

fn file_columns(source: &SourceConfig, path: &Path, rows: usize) -> Result<FileColumns> {
    let fail = |message: String| Error::Read {
        key: path.display().to_string(),
        message,
    };
    Ok(match source.format {
        Format::Csv => {
            let (head, _) = sample::prefix(path, 1_000 + source.csv.skip_rows, 8 << 20)?;
            // As the feed reads it: decoded, without a BOM, `skip_rows` and comment lines.
            let (text, _, _) = source.encoding.encoding().decode(&head);
            let text = text.trim_start_matches('\u{feff}');
            let comment = source.csv.comment.map(|c| c as u8);
            let lines: String = text
                .split_inclusive('\n')
                .skip(source.csv.skip_rows)
                .filter(|l| comment.is_none_or(|c| l.as_bytes().first() != Some(&c)))
                .collect();
            let mut builder = csv::ReaderBuilder::new();
            builder
                .delimiter(source.csv.delimiter as u8)
                .quote(source.csv.quote as u8)
                .has_headers(false)
                .flexible(true);
            if let Some(e) = source.csv.escape {
                builder.escape(Some(e as u8)).double_quote(false);
            }
            let mut reader = builder.from_reader(lines.as_bytes());
            let mut record = csv::ByteRecord::new();
            if !reader
                .read_byte_record(&mut record)
                .map_err(|e| fail(format!("cannot read the first record: {e}")))?
            {
                return Err(fail("the sample is empty".into()));
            }
            if !source.csv.header {
                FileColumns::Positional(record.len())
            } else {
                // As the reader reads a header: trimmed, a BOM dropped.
                FileColumns::Named(
                    record
                        .iter()
                        .map(|f| {
                            String::from_utf8_lossy(f)
                                .trim()
                                .trim_start_matches('\u{feff}')
                                .to_string()
                        })
                        .collect(),
                )
            }
        }
        Format::Jsonl | Format::Json => FileColumns::Named(
            super::json_keys(path, source.format, rows)?
                .into_iter()
                .map(|k| k.name)
                .collect(),
        ),
        Format::Parquet => {
            let file = std::fs::File::open(path)
                .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
            let builder =
                parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
                    .map_err(|e| fail(format!("not a readable Parquet file: {e}")))?;
            FileColumns::Named(
                builder
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| f.name().clone())
                    .collect(),
            )
        }
    })
}

/// Lower case without `_`, spaces, `-` and `.`: names that differ only by these are close.
fn loose(name: &str) -> String {
    name.chars()
        .filter(|c| !matches!(c, '_' | ' ' | '-' | '.'))
        .flat_map(char::to_lowercase)
        .collect()
}

/// The name a schema column looks for in the file (a JSON path's first key).
fn wanted(c: &ColumnDef) -> &str {
    match &c.path {
        Some(p) => p.split('.').next().unwrap_or(p),
        None => c.file_name(),
    }
}

/// Checks the first `rows` records of `path` against `source`'s schema.
pub fn check(
    config: &Config,
    source: &SourceConfig,
    path: &Path,
    rows: usize,
) -> Result<SampleReport> {
    let schema = SourceSchema::load(&config.resolve(&source.schema))?;
    let mut errors: Vec<String> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    let same = |a: &str, b: &str| match source.header_case {
        HeaderCase::Exact => a == b,
        HeaderCase::Insensitive => a.to_lowercase() == b.to_lowercase(),
    };
    // Which columns the file has.
    let mut present: Vec<ColumnDef> = Vec::new();
    match file_columns(source, path, rows)? {
        FileColumns::Named(names) => {
            // File columns a missing one may be (named in its error, not again as ignored).
            let mut suggested: Vec<&String> = Vec::new();
            for c in &schema.columns {
                let want = wanted(c);
                if names.iter().any(|n| same(n, want)) {
                    present.push(c.clone());
                    continue;
                }
                let close = names.iter().find(|n| loose(n) == loose(want));
                suggested.extend(close);
                let hint = match close {
                    Some(n) if n.to_lowercase() == want.to_lowercase() => {
                        format!("; did you mean header_case = \"insensitive\" or from = {n:?}?")
                    }
                    Some(n) => format!("; did you mean from = {n:?}?"),
                    None => String::new(),
                };
                errors.push(format!(
                    "column {:?} is not in the file (its columns: {}){hint}",
                    want,
                    names.join(", ")
                ));
            }
            let unused: Vec<&String> = names
                .iter()
                .filter(|n| {
                    !schema.columns.iter().any(|c| same(n, wanted(c))) && !suggested.contains(n)
                })
                .collect();
            if !unused.is_empty() {
                let list: Vec<String> = unused.iter().map(|n| format!("{n:?}")).collect();
                notes.push(if let [one] = list.as_slice() {
                    format!("the file's column {one} is not in the schema (ignored)")
                } else {
                    format!(
                        "the file's columns {} are not in the schema (ignored)",
                        list.join(", ")
                    )
                });
            }
        }
        FileColumns::Positional(n) => {
            if n != schema.columns.len() {
                errors.push(format!(
                    "the first record has {n} fields, the schema {} columns (csv.header = false: \
                     columns are matched by position)",
                    schema.columns.len()
                ));
            } else {
                present = schema.columns.clone();
            }
        }
    }
    let mut read = 0;
    if !present.is_empty() {
        let present = SourceSchema { columns: present };
        if source.format == Format::Parquet {
            // Parquet columns are cast to the schema's types whole: read them typed.
            match sample::read_typed(source, &present, path, rows) {
                Ok(n) => read = n,
                Err(e) => errors.push(e.to_string()),
            }
        } else {
            let text = sample::read_text(source, &sample::text_schema(&present), path, rows)?;
            read = text.len();
            values(&present, &text, &mut errors);
            // Rows the reader rejected for a column it parses itself (json): that column's.
            let (by_column, whole): (Vec<_>, Vec<_>) = text.malformed.iter().partition(|m| {
                present
                    .columns
                    .iter()
                    .any(|c| m.reason.starts_with(&format!("column {}: ", c.name)))
            });
            if !by_column.is_empty() {
                let mut e = format!(
                    "{} sampled records are rejected for a column's value:",
                    thousands(by_column.len())
                );
                for m in by_column.iter().take(3) {
                    let _ = write!(e, "\n    line {}: {}", m.row, m.reason);
                }
                errors.push(e);
            }
            if !whole.is_empty() {
                let mut line = format!(
                    "{} of {} sampled records are rejected whole by the reader:",
                    thousands(whole.len()),
                    thousands(text.len())
                );
                for m in whole.iter().take(5) {
                    let _ = write!(line, "\n    line {}: {}", m.row, m.reason);
                }
                notes.push(line);
            }
        }
    }
    let mut out = format!(
        "sample {}: source {} ({}), {} records read\n",
        path.display(),
        source.name,
        sample::format_name(source.format),
        thousands(read)
    );
    for e in &errors {
        let _ = writeln!(out, "  error: {e}");
    }
    for n in &notes {
        let _ = writeln!(out, "  note: {n}");
    }
    if errors.is_empty() {
        out.push_str("sample ok: the file has every column of the schema and every sampled value fits its type\n");
    } else {
        let _ = writeln!(
            out,
            "sample: {} {}",
            errors.len(),
            if errors.len() == 1 {
                "problem"
            } else {
                "problems"
            }
        );
    }
    Ok(SampleReport {
        text: out,
        ok: errors.is_empty(),
    })
}

/// Each column's sampled values through its parser: the failures, counted, the first few shown
/// with the rejection a run records.
fn values(schema: &SourceSchema, text: &sample::TextSample, errors: &mut Vec<String>) {
    for (i, c) in schema.columns.iter().enumerate() {
        // A json column was parsed by the reader (its failures are rejected records).
        let Ok(parser) = c.parser() else {
            continue;
        };
        if c.ty == crate::source::ColumnType::Json {
            continue;
        }
        let (mut seen, mut failed) = (0, 0);
        let mut first = Vec::new();
        for r in &text.records {
            let Some(v) = r.cells[i].as_deref() else {
                continue;
            };
            seen += 1;
            if parser.parse(v).is_none() {
                failed += 1;
                if first.len() < 3 {
                    first.push(format!(
                        "line {}: {}",
                        r.line,
                        rejection(&c.name, v, &parser)
                    ));
                }
            }
        }
        if failed > 0 {
            let mut e = format!(
                "column {}: {} of {} sampled values are not a valid {}:",
                c.name,
                thousands(failed),
                thousands(seen),
                parser.label()
            );
            for f in first {
                let _ = write!(e, "\n    {f}");
            }
            errors.push(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_names() {
        assert_eq!(loose("Line Id"), loose("line_id"));
        assert_eq!(loose("LineId"), "lineid");
    }
}
