//! CSV reader: a header matched to the schema by name, quoted fields with delimiters, doubled
//! quotes and newlines inside, and a malformed row for a record with the wrong number of fields
//! or invalid UTF-8.
//!
//! The dialect is the source's `csv` options: any one-byte delimiter and quote, lines skipped
//! before the header (`skip_rows`), comment lines (`comment`), an escape character inside quoted
//! fields (`escape`) and the texts that mean null. Files with comments or an escape character are
//! read by the tolerant reader only (the SIMD one knows neither), and cut into chunks by a
//! forward [`scan`] that knows both.
//!
//! Lines end at LF or CRLF; a lone CR is data (in both readers). A quote that is never closed
//! (its field runs to the end of the file, past `csv.max_field_size`, or spans lines up to a
//! "closing" quote that is followed by text) does not swallow the rest of the file: its record,
//! to the end of that quote's line, is rejected alone, and reading goes on at the next line.

use super::ReadOutput;
use super::columns::{ReadContext, RowBuilder};
use crate::config::CsvOptions;
use crate::error::{Error, Result};

/// Reads a whole CSV file (skipped lines and header included).
#[cfg(test)]
pub(super) fn read(
    ctx: &ReadContext,
    opts: &CsvOptions,
    key: &str,
    data: &[u8],
) -> Result<ReadOutput> {
    let lines = |b: &[u8]| memchr::memchr_iter(b'\n', b).count() as u64;
    let data = data.strip_prefix(b"\xef\xbb\xbf").unwrap_or(data);
    let skip = skip_lines(data, opts.skip_rows, true).unwrap_or(data.len());
    let (skipped, data) = data.split_at(skip);
    match read_header(ctx, opts, key, data, true)? {
        None => Ok(ReadOutput::default()),
        Some((mapping, end)) => {
            let line = 1 + lines(skipped) + lines(&data[..end]);
            read_records(ctx, opts, key, &data[end..], line, &mapping, true)
        }
    }
}

/// Where the data after the first `n` lines of `data` starts; `None` if `data` does not hold
/// them yet (with `complete`, a file of fewer lines is skipped whole).
pub(super) fn skip_lines(data: &[u8], n: usize, complete: bool) -> Option<usize> {
    if n == 0 {
        return Some(0);
    }
    match memchr::memchr_iter(b'\n', data).nth(n - 1) {
        Some(p) => Some(p + 1),
        None if complete => Some(data.len()),
        None => None,
    }
}

/// The bytes of a source's CSV dialect that decide where records and fields end.
#[derive(Debug, Clone, Copy)]
pub(super) struct Dialect {
    pub delimiter: u8,
    pub quote: u8,
    /// The escape byte inside quoted fields (then quotes are not doubled).
    pub escape: Option<u8>,
    /// A line starting with this byte at a record's start is skipped.
    pub comment: Option<u8>,
    /// `csv.max_field_size`.
    pub max: usize,
}

impl Dialect {
    /// The dialect of these options (checked ASCII when the config loaded).
    pub fn of(opts: &CsvOptions) -> Dialect {
        Dialect {
            delimiter: opts.delimiter as u8,
            quote: opts.quote as u8,
            escape: opts.escape.map(|c| c as u8),
            comment: opts.comment.map(|c| c as u8),
            max: opts.max_field_size,
        }
    }

    /// Whether quote parity and the SIMD reader hold: no escape character, no comment lines.
    pub fn plain(&self) -> bool {
        self.escape.is_none() && self.comment.is_none()
    }
}

/// The tolerant reader over `data`: records end at LF only (the CR of a CRLF is taken off the
/// last field by the caller), so that a lone CR stays data.
fn reader<'d>(opts: &CsvOptions, data: &'d [u8]) -> csv::Reader<&'d [u8]> {
    let d = Dialect::of(opts);
    csv::ReaderBuilder::new()
        .delimiter(d.delimiter)
        .quote(d.quote)
        .double_quote(d.escape.is_none())
        .escape(d.escape)
        .comment(d.comment)
        .terminator(csv::Terminator::Any(b'\n'))
        .has_headers(false)
        .flexible(true)
        .from_reader(data)
}

/// Where each file column goes in the schema (`None`: not in the schema), and where the rows
/// start. With `header = false`, the columns are the schema's, in order. `None` if `data` does
/// not hold the whole header yet (or, when `complete`, if the file is empty).
pub(super) fn read_header(
    ctx: &ReadContext,
    opts: &CsvOptions,
    key: &str,
    data: &[u8],
    complete: bool,
) -> Result<Option<(Vec<Option<usize>>, usize)>> {
    if !opts.header {
        return Ok(Some(((0..ctx.width()).map(Some).collect(), 0)));
    }
    let fail = |message: String| Error::Read {
        key: key.to_string(),
        message,
    };
    let mut reader = reader(opts, data);
    let mut record = csv::ByteRecord::new();
    if !reader
        .read_byte_record(&mut record)
        .map_err(|e| fail(format!("cannot read the header: {e}")))?
    {
        return Ok(None);
    }
    let end = (reader.position().byte() as usize).min(data.len());
    if !complete && (end >= data.len() || !data[..end].ends_with(b"\n")) {
        return Ok(None);
    }
    let names: Vec<String> = record
        .iter()
        .map(|f| {
            String::from_utf8_lossy(f)
                .trim()
                .trim_start_matches('\u{feff}')
                .to_string()
        })
        .collect();
    for (i, wanted) in ctx.file_names.iter().enumerate() {
        if !names.iter().any(|n| ctx.is_column(n, i)) {
            return Err(fail(format!(
                "the header has no column \"{wanted}\" (it has: {})",
                names.join(", ")
            )));
        }
    }
    Ok(Some((names.iter().map(|n| ctx.column(n)).collect(), end)))
}

/// Reads CSV records (no header); `first_line` is the line `data` starts at, `mapping` from
/// [`read_header`], `last` whether `data` ends the file. A chunk whose quotes all open, close
/// or double inside a field (none longer than `csv.max_field_size`), and whose records are all
/// UTF-8, is read by the SIMD reader; any other chunk (a stray quote inside a field, a lone CR
/// at a line start, invalid UTF-8, an unclosed quote) by the tolerant one, which reads such
/// records the way the `csv` crate does and names the column of invalid UTF-8. Both give the
/// same rows for a chunk both can read. Records with an unclosed quote ([`scan`]) are rejected
/// alone and the records between them read as above.
pub(super) fn read_records(
    ctx: &ReadContext,
    opts: &CsvOptions,
    key: &str,
    data: &[u8],
    first_line: u64,
    mapping: &[Option<usize>],
    last: bool,
) -> Result<ReadOutput> {
    let layout = Layout::new(ctx, opts, mapping);
    let d = layout.dialect;
    if d.plain() && plain_quoting(data, d.delimiter, d.quote, d.max) {
        if let Some(out) = read_fast(ctx, &layout, key, data, first_line) {
            return out;
        }
        return read_tolerant(ctx, &layout, key, data, first_line);
    }
    let found = scan(data, &d, true);
    if found.bad.is_empty() {
        return read_tolerant(ctx, &layout, key, data, first_line);
    }
    let lines = |b: &[u8]| memchr::memchr_iter(b'\n', b).count() as u64;
    let mut out = ReadOutput::default();
    let mut rejected = RowBuilder::new(ctx, key).raw_limit(opts.max_field_size);
    let (mut at, mut line) = (0, first_line);
    for bad in &found.bad {
        let part = &data[at..bad.start];
        let mut rows = read_clean(ctx, &layout, key, part, line)?;
        out.batches.append(&mut rows.batches);
        out.malformed.append(&mut rows.malformed);
        line += lines(part);
        let quote_line = line + lines(&data[bad.start..bad.quote]);
        let why = match bad.why {
            Unclosed::PastBound => format!(
                "the quoted field runs past csv.max_field_size ({} bytes)",
                opts.max_field_size
            ),
            Unclosed::AtEnd if last => "the quoted field runs to the end of the file".into(),
            Unclosed::AtEnd => "no quote closes the field".into(),
            Unclosed::Text(close) => format!(
                "the next quote (line {}) is followed by text, not a delimiter or line end",
                quote_line + lines(&data[bad.quote..close])
            ),
        };
        let raw = &data[bad.start..bad.end];
        let reason = format!("unclosed quote at line {quote_line}: {why}");
        tracing::debug!(
            key,
            line = quote_line,
            "unclosed quote: record rejected alone"
        );
        rejected.unclosed_quote(line, reason, raw);
        line += lines(raw);
        at = bad.end;
    }
    let mut rows = read_clean(ctx, &layout, key, &data[at..], line)?;
    out.batches.append(&mut rows.batches);
    let mut bad = rejected.finish().map_err(|message| Error::Read {
        key: key.to_string(),
        message,
    })?;
    out.malformed.append(&mut bad.malformed);
    out.malformed.append(&mut rows.malformed);
    out.malformed.sort_by_key(|m| m.row);
    Ok(out)
}

/// Records without unclosed quotes: by the SIMD reader if it can, else the tolerant one.
fn read_clean(
    ctx: &ReadContext,
    layout: &Layout<'_>,
    key: &str,
    data: &[u8],
    first_line: u64,
) -> Result<ReadOutput> {
    let d = layout.dialect;
    if d.plain()
        && plain_quoting(data, d.delimiter, d.quote, d.max)
        && let Some(out) = read_fast(ctx, layout, key, data, first_line)
    {
        return out;
    }
    read_tolerant(ctx, layout, key, data, first_line)
}

/// Whether every quote in `data` (which starts at a record) opens a field, closes one (no more
/// than `max` bytes later) or is doubled inside one, and every CR outside quotes is data in the
/// middle of a line or the CR of a CRLF: what the two readers read alike.
fn plain_quoting(data: &[u8], delimiter: u8, quote: u8, max: usize) -> bool {
    let mut open: Option<usize> = None;
    let mut marks = memchr::memchr2_iter(quote, b'\r', data);
    while let Some(p) = marks.next() {
        let next = data.get(p + 1).copied();
        if data[p] == b'\r' {
            let line_start = p == 0 || data[p - 1] == b'\n';
            if open.is_none() && next != Some(b'\n') && (line_start || next.is_none()) {
                // simd-csv skips a CR that starts a line and drops one that ends the data.
                return false;
            }
            if open.is_some()
                && next == Some(quote)
                && matches!(data.get(p + 2), None | Some(b'\n' | b'\r'))
            {
                // simd-csv drops a CR that ends the record's last field, even inside quotes.
                return false;
            }
        } else if let Some(o) = open {
            if next == Some(quote) {
                marks.next(); // a doubled quote
            } else if next.is_none_or(|b| b == delimiter || b == b'\n')
                || (next == Some(b'\r') && data.get(p + 2) == Some(&b'\n'))
            {
                if p - o - 1 > max {
                    return false;
                }
                open = None;
            } else {
                return false;
            }
        } else {
            if p > 0 && data[p - 1] != b'\n' && data[p - 1] != delimiter {
                return false;
            }
            open = Some(p);
        }
    }
    open.is_none()
}

/// Why a quote counts as unclosed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unclosed {
    /// No quote closes its field before the end of the data.
    AtEnd,
    /// Its field would run past `csv.max_field_size`.
    PastBound,
    /// Its field spans lines up to a quote (at this offset) that is followed by text: that quote
    /// opens another field, it does not close this one.
    Text(usize),
}

/// A record with an unclosed quote: from its start to just after the newline that ends the
/// quote's line (or the data's end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct BadRecord {
    /// Where the record starts.
    pub start: usize,
    /// Where the unclosed quote is.
    pub quote: usize,
    /// Where reading goes on.
    pub end: usize,
    /// Why the quote counts as unclosed.
    pub why: Unclosed,
}

/// What [`scan`] found.
#[derive(Debug, Default)]
pub(super) struct Scan {
    /// The records with an unclosed quote, in order.
    pub bad: Vec<BadRecord>,
    /// Where the last complete record ends (records with an unclosed quote included).
    pub last_end: Option<usize>,
}

/// Finds the records of `data` (which starts at a record) forward, the way the tolerant reader
/// splits them (a quote opens a field only at its start; a closing quote followed by text goes
/// on as unquoted text; a comment line at a record's start is skipped whole; inside quotes, the
/// escape byte takes the byte after it as text), and the quotes that do not close
/// ([`Unclosed`]). With `complete`, `data` ends the input; otherwise the scan stops at a record
/// it cannot finish yet.
///
/// This visits every quote and newline: the feed and the reader call it only for data that
/// quote parity or [`plain_quoting`] found irregular, or whose dialect has comments or an escape
/// character, never on the fast path.
pub(super) fn scan(data: &[u8], d: &Dialect, complete: bool) -> Scan {
    let (delimiter, quote, max) = (d.delimiter, d.quote, d.max);
    let mut out = Scan::default();
    let (mut pos, mut record) = (0, 0);
    loop {
        if pos == record
            && let Some(c) = d.comment
            && data.get(pos) == Some(&c)
        {
            match memchr::memchr(b'\n', &data[pos..]) {
                Some(e) => {
                    pos += e + 1;
                    record = pos;
                    out.last_end = Some(pos);
                    continue;
                }
                None => {
                    if complete {
                        out.last_end = Some(data.len());
                    }
                    break;
                }
            }
        }
        let Some(off) = memchr::memchr2(quote, b'\n', &data[pos..]) else {
            break;
        };
        let m = pos + off;
        if data[m] == b'\n' {
            pos = m + 1;
            record = pos;
            out.last_end = Some(pos);
            continue;
        }
        if m != record && data[m - 1] != delimiter {
            pos = m + 1; // a quote inside an unquoted field: text
            continue;
        }
        // A quote opening a field: where does it close?
        let mut c = m + 1;
        let close = loop {
            let next = match d.escape {
                Some(e) => memchr::memchr2(quote, e, &data[c..]),
                None => memchr::memchr(quote, &data[c..]),
            };
            match next {
                None => break None,
                Some(o) if d.escape == Some(data[c + o]) => c = (c + o + 2).min(data.len()),
                Some(o) if d.escape.is_none() && data.get(c + o + 1) == Some(&quote) => c += o + 2,
                Some(o) => break Some(c + o),
            }
        };
        let why = match close {
            Some(c) if c - m - 1 > max => Unclosed::PastBound,
            None if data.len() - m - 1 > max => Unclosed::PastBound,
            None if complete => Unclosed::AtEnd,
            None => break,
            // Not known yet whether it is doubled (or what follows it).
            Some(c) if c + 1 == data.len() && !complete => break,
            Some(c) => {
                let ends = match data.get(c + 1) {
                    None => true,
                    Some(&b) if b == delimiter || b == b'\n' => true,
                    Some(b'\r') => matches!(data.get(c + 2), None | Some(b'\n')),
                    Some(_) => false,
                };
                if ends || memchr::memchr(b'\n', &data[m..c]).is_none() {
                    pos = c + 1;
                    continue;
                }
                Unclosed::Text(c)
            }
        };
        let end = match memchr::memchr(b'\n', &data[m..]) {
            Some(e) => m + e + 1,
            None if complete => data.len(),
            None => break,
        };
        out.bad.push(BadRecord {
            start: record,
            quote: m,
            end,
            why,
        });
        pos = end;
        record = end;
        out.last_end = Some(end);
    }
    out
}

/// The SIMD reader (`simd-csv`): `None` if a record is not UTF-8, so that the tolerant reader
/// reads the chunk and names the column.
fn read_fast(
    ctx: &ReadContext,
    layout: &Layout<'_>,
    key: &str,
    data: &[u8],
    first_line: u64,
) -> Option<Result<ReadOutput>> {
    let opts = layout.opts;
    let mut reader = simd_csv::TotalReaderBuilder::new()
        .delimiter(opts.delimiter as u8)
        .quote(opts.quote as u8)
        .has_headers(false)
        .from_bytes(data);
    let mut record = simd_csv::ByteRecord::new();
    let mut rows = RowBuilder::new(ctx, key).raw_limit(opts.max_field_size);
    let (mut start, mut line) = (0, first_line);
    while reader.read_byte_record(&mut record) {
        let end = (reader.position() as usize).min(data.len());
        let raw = &data[start.min(end)..end];
        start = end;
        let (at, record_raw) = past_skipped_lines(raw, line, None);
        line += memchr::memchr_iter(b'\n', raw).count() as u64;
        // One UTF-8 check for the whole record; its fields are slices of the same buffer, cut at
        // ASCII bytes, so each is text too.
        let text = std::str::from_utf8(record.as_slice()).ok()?;
        if record.iter().any(|f| slice_of(text, f).is_none()) {
            return None;
        }
        let field = |j| record.get(j).and_then(|f| slice_of(text, f));
        layout.add(&mut rows, record.len(), field, at, record_raw);
    }
    Some(rows.finish().map_err(|message| Error::Read {
        key: key.to_string(),
        message,
    }))
}

/// A record's bytes `raw` as read, starting at `line`, without the blank lines and `comment`
/// lines the read skipped before it; and the line the record itself starts at.
fn past_skipped_lines(raw: &[u8], line: u64, comment: Option<u8>) -> (u64, &[u8]) {
    let mut at = 0;
    loop {
        let rest = &raw[at..];
        let lead = rest
            .iter()
            .take_while(|&&b| b == b'\n' || b == b'\r')
            .count();
        // Whole lines only: a lone CR starting the record is its data.
        at += memchr::memrchr(b'\n', &rest[..lead]).map_or(0, |p| p + 1);
        match (comment, memchr::memchr(b'\n', &raw[at..])) {
            // A comment line, with the record after it.
            (Some(c), Some(e)) if raw.get(at) == Some(&c) && at + e + 1 < raw.len() => at += e + 1,
            _ => break,
        }
    }
    let line = line + memchr::memchr_iter(b'\n', &raw[..at]).count() as u64;
    (line, &raw[at..])
}

/// `part` (a slice of the bytes `text` was read from) as a slice of `text`.
fn slice_of<'t>(text: &'t str, part: &[u8]) -> Option<&'t str> {
    let at = (part.as_ptr() as usize).checked_sub(text.as_ptr() as usize)?;
    text.get(at..at.checked_add(part.len())?)
}

/// How a file's records map to rows: where each schema column is in a record (`None`: not in
/// the file), how many fields a record has, and the texts that mean null.
struct Layout<'o> {
    opts: &'o CsvOptions,
    dialect: Dialect,
    nulls: Vec<String>,
    columns: Vec<Option<usize>>,
    /// File column `j` is schema column `mapping[j]`.
    mapping: &'o [Option<usize>],
}

impl<'o> Layout<'o> {
    fn new(ctx: &ReadContext, opts: &'o CsvOptions, mapping: &'o [Option<usize>]) -> Layout<'o> {
        Layout {
            opts,
            dialect: Dialect::of(opts),
            nulls: opts.nulls(),
            columns: (0..ctx.width())
                .map(|i| mapping.iter().position(|m| *m == Some(i)))
                .collect(),
            mapping,
        }
    }

    /// Adds one record of `len` fields (`field(j)`: the file's column `j` as text) as a row, or
    /// as a malformed record.
    fn add<'a>(
        &self,
        rows: &mut RowBuilder<'_>,
        len: usize,
        field: impl Fn(usize) -> Option<&'a str>,
        line: u64,
        raw: &[u8],
    ) {
        let expected = self.mapping.len();
        if len == 1 && expected > 1 && field(0) == Some("") {
            return; // a blank line
        }
        if len != expected {
            let reason = format!("expected {expected} fields, found {len}");
            rows.malformed(line, reason, raw);
            return;
        }
        let cell = |i: usize| {
            self.columns[i]
                .and_then(&field)
                .filter(|v| !self.nulls.iter().any(|n| n == v))
        };
        if let Err(reason) = rows.push(cell, line) {
            rows.malformed(line, reason, raw);
        }
    }
}

/// The tolerant reader (the `csv` crate): records are read as text, checked for UTF-8 once
/// each; only a record that is not valid UTF-8 is read again as bytes, to tell which column it
/// is in (a column the schema does not take may hold anything).
fn read_tolerant(
    ctx: &ReadContext,
    layout: &Layout<'_>,
    key: &str,
    data: &[u8],
    first_line: u64,
) -> Result<ReadOutput> {
    let opts = layout.opts;
    let fail = |message: String| Error::Read {
        key: key.to_string(),
        message,
    };
    let mut reader = reader(opts, data);
    let mut record = csv::StringRecord::new();
    let mut bytes = csv::ByteRecord::new();
    let mut rows = RowBuilder::new(ctx, key).raw_limit(opts.max_field_size);
    let offset = first_line - 1;
    loop {
        let start = reader.position().byte() as usize;
        let line = reader.position().line() + offset;
        let text = match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => true,
            Err(e) if matches!(e.kind(), csv::ErrorKind::Utf8 { .. }) => false,
            Err(e) => return Err(fail(format!("line {line}: {e}"))),
        };
        let end = reader.position().byte() as usize;
        let raw = &data[start.min(data.len())..end.min(data.len())];
        // Records end at LF: the CR of a CRLF (outside quotes, so the raw record ends with it)
        // is still on the last field.
        let crlf = raw.ends_with(b"\r\n");
        let (line, raw) = past_skipped_lines(raw, line, layout.dialect.comment);
        if text {
            let last = record.len().saturating_sub(1);
            let field = |j| {
                let f = record.get(j)?;
                Some(if j == last && crlf {
                    f.strip_suffix('\r').unwrap_or(f)
                } else {
                    f
                })
            };
            layout.add(&mut rows, record.len(), field, line, raw);
            continue;
        }
        // Not UTF-8: the same record again, as bytes.
        let mut again = self::reader(opts, raw);
        if !again
            .read_byte_record(&mut bytes)
            .map_err(|e| fail(format!("line {line}: {e}")))?
        {
            continue;
        }
        let last = bytes.len().saturating_sub(1);
        let field_bytes = |j| {
            let f = bytes.get(j)?;
            Some(if j == last && crlf {
                f.strip_suffix(b"\r").unwrap_or(f)
            } else {
                f
            })
        };
        let bad = (0..bytes.len())
            .zip(layout.mapping)
            .find_map(|(j, target)| {
                let i = (*target)?;
                let e = std::str::from_utf8(field_bytes(j)?).err()?;
                Some(format!(
                    "invalid UTF-8 in column {} at byte {}",
                    ctx.names[i],
                    e.valid_up_to() + 1
                ))
            });
        match bad {
            Some(reason) if bytes.len() == layout.mapping.len() => {
                rows.malformed(line, reason, raw)
            }
            // Invalid bytes only in columns the schema does not take (or a record of the wrong
            // length, which says so).
            _ => {
                let field = |j| field_bytes(j).and_then(|f| std::str::from_utf8(f).ok());
                layout.add(&mut rows, bytes.len(), field, line, raw);
            }
        }
    }
    rows.finish().map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{ColumnDef, ColumnType, SourceSchema};
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::Int64Type;

    fn ctx() -> ReadContext {
        let col = |n: &str| ColumnDef::new(n, ColumnType::String);
        ReadContext::new(
            &SourceSchema {
                columns: vec![col("id"), col("body")],
            },
            Default::default(),
        )
    }

    #[test]
    fn quotes_newlines_and_bad_records() {
        let data = b"body,id,extra\n\"a, \"\"b\"\"\nc\",1,x\nonly,two\n\xff,3,z\n,4,\xfe\n";
        let out = read(&ctx(), &CsvOptions::default(), "t.csv", data).unwrap();
        assert_eq!(out.good_rows(), 2);
        let b = &out.batches[0];
        assert_eq!(b.column(0).as_string::<i32>().value(0), "1");
        assert_eq!(b.column(1).as_string::<i32>().value(0), "a, \"b\"\nc");
        assert!(b.column(1).is_null(1));
        let rows = b.column(3).as_primitive::<Int64Type>();
        assert_eq!((rows.value(0), rows.value(1)), (2, 6));
        assert_eq!(out.malformed.len(), 2);
        assert_eq!(out.malformed[0].row, 4);
        assert_eq!(out.malformed[0].raw, "only,two");
        assert!(
            out.malformed[0]
                .reason
                .contains("expected 3 fields, found 2")
        );
        assert_eq!(out.malformed[1].row, 5);
        assert!(
            out.malformed[1]
                .reason
                .contains("invalid UTF-8 in column body")
        );
    }

    /// Every row of every batch, as text (`<null>` for null), with its line; and the malformed
    /// records as (line, reason, raw).
    type Table = (Vec<Vec<String>>, Vec<(u64, String, String)>);

    fn table(out: &ReadOutput) -> Table {
        let mut rows = Vec::new();
        for b in &out.batches {
            let lines = b.column(b.num_columns() - 1).as_primitive::<Int64Type>();
            for r in 0..b.num_rows() {
                let mut row: Vec<String> = (0..b.num_columns() - 2)
                    .map(|c| {
                        let a = b.column(c).as_string::<i32>();
                        if a.is_valid(r) {
                            a.value(r).to_string()
                        } else {
                            "<null>".into()
                        }
                    })
                    .collect();
                row.push(lines.value(r).to_string());
                rows.push(row);
            }
        }
        let bad = out
            .malformed
            .iter()
            .map(|m| (m.row, m.reason.clone(), m.raw.clone()))
            .collect();
        (rows, bad)
    }

    fn both(data: &[u8]) -> (Table, Option<Table>) {
        let c = ctx();
        let opts = CsvOptions {
            null_value: Some("NULL".into()),
            ..CsvOptions::default()
        };
        let (mapping, end) = read_header(&c, &opts, "k", data, true).unwrap().unwrap();
        let (body, line) = (&data[end..], 2);
        let layout = Layout::new(&c, &opts, &mapping);
        let slow = read_tolerant(&c, &layout, "k", body, line).unwrap();
        let fast = read_fast(&c, &layout, "k", body, line).map(|r| table(&r.unwrap()));
        (table(&slow), fast)
    }

    /// The SIMD reader reads what the tolerant reader reads: quoted delimiters, doubled quotes,
    /// newlines in quotes, CRLF, blank lines, nulls, short records, a last line without newline.
    #[test]
    fn fast_and_tolerant_readers_agree() {
        let data: &[u8] = b"id,body,extra\r\n1,\"a, \"\"b\"\"\r\nc\",x\r\n\r\n\n2,NULL,y\n\
            3,\"\",\"\"\"\"\"\"\"\"\nonly,two\n\"4\",plain,z";
        assert!(plain_quoting(&data[15..], b',', b'"', 1 << 20));
        let (slow, fast) = both(data);
        assert_eq!(Some(&slow), fast.as_ref());
        let (rows, bad) = slow;
        assert_eq!(
            rows,
            [
                vec!["1", "a, \"b\"\r\nc", "2"],
                vec!["2", "<null>", "6"],
                vec!["3", "", "7"],
                vec!["4", "plain", "9"],
            ]
        );
        assert_eq!(
            bad,
            [(8, "expected 3 fields, found 2".into(), "only,two".into())]
        );
        // The benchmark's own tickets (quoted bodies, doubled quotes, newlines in quotes).
        let schema = SourceSchema::load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/support_tickets.toml"),
        )
        .unwrap();
        let c = ReadContext::new(&schema, Default::default());
        let opts = CsvOptions::default();
        let tickets = crate::generate::sample(crate::generate::Kind::Tickets, 3000, 7);
        let (mapping, end) = read_header(&c, &opts, "t", tickets.as_bytes(), true)
            .unwrap()
            .unwrap();
        let body = &tickets.as_bytes()[end..];
        assert!(plain_quoting(body, b',', b'"', 1 << 20));
        let layout = Layout::new(&c, &opts, &mapping);
        let slow = table(&read_tolerant(&c, &layout, "t", body, 2).unwrap());
        let fast = read_fast(&c, &layout, "t", body, 2).unwrap().unwrap();
        assert_eq!(slow, table(&fast));
        assert!(slow.0.len() > 2900 && slow.0.iter().any(|r| r[7].contains('\n')));
    }

    /// Quotes inside an unquoted field and a lone CR are read by the tolerant reader, as the
    /// `csv` crate reads them; invalid UTF-8 too, so that the error names the column.
    #[test]
    fn irregular_chunks_go_to_the_tolerant_reader() {
        for (data, plain) in [
            (&b"1,He said \"hi\" twice\n"[..], false),
            (b"1,\"ab\"c\n", false),
            (b"1, \"ab\"\n", false),
            (b"1,a\r2,b\n", true),
            (b"1,a\n\r2,b\n", false),
            (b"1,\"open\n", false),
            (b"1,\"a\r\nb\"\r\n", true),
            (b"\"1\",\"\"\n", true),
        ] {
            assert_eq!(
                plain_quoting(data, b',', b'"', 1 << 20),
                plain,
                "{:?}",
                String::from_utf8_lossy(data)
            );
        }
        let out = read(
            &ctx(),
            &CsvOptions::default(),
            "q",
            b"id,body\n1,He said \"hi\"\n",
        )
        .unwrap();
        assert_eq!(table(&out).0, [vec!["1", "He said \"hi\"", "2"]]);
        let (_, fast) = both(b"id,body,extra\n1,\xff,x\n");
        assert!(fast.is_none());
    }

    #[test]
    fn header_only_and_empty_files_have_no_rows() {
        let c = ctx();
        assert_eq!(
            read(&c, &CsvOptions::default(), "e", b"")
                .unwrap()
                .rows_read(),
            0
        );
        assert_eq!(
            read(&c, &CsvOptions::default(), "h", b"id,body\n")
                .unwrap()
                .rows_read(),
            0
        );
    }

    fn opts(max: usize) -> CsvOptions {
        CsvOptions {
            max_field_size: max,
            ..CsvOptions::default()
        }
    }

    /// Rows and malformed records of a whole file read with `csv.max_field_size = max`; and
    /// which malformed records were unclosed quotes.
    fn read_max(data: &[u8], max: usize) -> (Table, Vec<bool>) {
        let out = read(&ctx(), &opts(max), "k", data).unwrap();
        let unclosed = out.malformed.iter().map(|m| m.unclosed_quote).collect();
        (table(&out), unclosed)
    }

    fn row(cells: &[&str]) -> Vec<String> {
        cells.iter().map(|c| c.to_string()).collect()
    }

    /// A quote that never closes rejects its line alone, wherever it is; later rows keep their
    /// lines; a quoted field with newlines that does close is read whole.
    #[test]
    fn an_unclosed_quote_rejects_its_line_alone() {
        // In the middle, with no quote after it: it would run to the end of the file.
        let (t, unclosed) = read_max(b"id,body\n1,a\n2,\"open\n3,c\n4,d\n", 1 << 20);
        assert_eq!(
            t.0,
            [
                row(&["1", "a", "2"]),
                row(&["3", "c", "4"]),
                row(&["4", "d", "5"])
            ]
        );
        assert_eq!(
            t.1,
            [(
                3,
                "unclosed quote at line 3: the quoted field runs to the end of the file".into(),
                "2,\"open".into()
            )]
        );
        assert_eq!(unclosed, [true]);
        // In the middle, before a quoted field with a newline (the next quote opens it).
        let data = b"id,body\n1,a\n2,\"open\n3,\"fine\nstill fine\"\n4,d\n";
        let (t, _) = read_max(data, 1 << 20);
        assert_eq!(
            t.0,
            [
                row(&["1", "a", "2"]),
                row(&["3", "fine\nstill fine", "4"]),
                row(&["4", "d", "6"])
            ]
        );
        assert_eq!(t.1.len(), 1);
        assert_eq!((t.1[0].0, t.1[0].2.as_str()), (3, "2,\"open"));
        assert!(
            t.1[0]
                .1
                .starts_with("unclosed quote at line 3: the next quote (line 4)"),
            "{}",
            t.1[0].1
        );
        // At the last line, with and without its newline; CRLF.
        for data in [
            &b"id,body\n1,a\n2,\"open at the end\n"[..],
            b"id,body\n1,a\n2,\"open at the end",
            b"id,body\r\n1,a\r\n2,\"open at the end\r\n",
        ] {
            let (t, _) = read_max(data, 1 << 20);
            assert_eq!(t.0, [row(&["1", "a", "2"])]);
            assert_eq!(t.1.len(), 1);
            assert_eq!((t.1[0].0, t.1[0].2.as_str()), (3, "2,\"open at the end"));
        }
        // Quoted fields with newlines, CRLF and doubled quotes that close are not unclosed.
        let data = b"id,body\r\n1,\"x\r\ny \"\"z\"\"\"\r\n2,\"\"\r\n";
        let (t, _) = read_max(data, 1 << 20);
        assert_eq!(
            t.0,
            [row(&["1", "x\r\ny \"z\"", "2"]), row(&["2", "<null>", "4"])]
        );
        assert!(t.1.is_empty());
    }

    /// A quoted field of exactly `csv.max_field_size` bytes is read; one byte more is an
    /// unclosed quote, its raw text cut at the bound with a mark.
    #[test]
    fn a_quoted_field_past_the_bound_is_an_unclosed_quote() {
        let data = b"id,body\n1,\"0123\n56789\"\n2,\"0123\n567890\"\n3,x\n";
        let (t, unclosed) = read_max(data, 10);
        assert_eq!(
            t.0,
            [row(&["1", "0123\n56789", "2"]), row(&["3", "x", "6"])]
        );
        assert_eq!(
            t.1,
            [
                (
                    4,
                    "unclosed quote at line 4: the quoted field runs past csv.max_field_size \
                     (10 bytes)"
                        .into(),
                    "2,\"0123".into()
                ),
                // The next line is read on its own (its quote is text).
                (5, "expected 2 fields, found 1".into(), "567890\"".into())
            ]
        );
        assert_eq!(unclosed, [true, false]);
        // On one line: the raw text is cut at the bound, with a mark.
        let (t, _) = read_max(b"id,body\n1,\"0123456789\"\n2,\"01234567890\"\n3,x\n", 10);
        assert_eq!(t.0.len(), 2);
        assert_eq!(t.1[0].0, 3);
        assert_eq!(t.1[0].2, "2,\"0123456... [truncated: 10 of 15 bytes]");
    }

    /// A lone CR is data, in both readers; CR LF ends a line; a record is never split at a CR.
    #[test]
    fn a_lone_cr_is_data_in_both_readers() {
        let data: &[u8] = b"id,body,extra\n1,a\rb,x\n2,y,z\r\n3,\"q\r\",w\r\n4,\"v\"\r\n";
        assert!(plain_quoting(&data[14..], b',', b'"', 1 << 20));
        let (slow, fast) = both(data);
        assert_eq!(Some(&slow), fast.as_ref());
        assert_eq!(
            slow.0,
            [
                row(&["1", "a\rb", "2"]),
                row(&["2", "y", "3"]),
                row(&["3", "q\r", "4"])
            ]
        );
        assert_eq!(
            slow.1,
            [(5, "expected 3 fields, found 2".into(), "4,\"v\"".into())]
        );
        // A CR starting a line or ending the file: the tolerant reader, the same rule.
        let data = b"id,body\n1,a\n\r2,b\r\n3,c\r";
        assert!(!plain_quoting(&data[8..], b',', b'"', 1 << 20));
        let out = read(&ctx(), &CsvOptions::default(), "k", data).unwrap();
        assert_eq!(out.rows_read(), 3);
        assert_eq!(
            table(&out).0,
            [
                row(&["1", "a", "2"]),
                row(&["\r2", "b", "3"]),
                row(&["3", "c\r", "4"])
            ]
        );
        // Mixed LF, CRLF, blank lines and a stray quote (the tolerant reader).
        let data = b"id,body\n1,He said \"hi\"\r\n\r\n2,a\rb\n\n3,\"c\"\r\n";
        let out = read(&ctx(), &CsvOptions::default(), "k", data).unwrap();
        assert_eq!(
            table(&out).0,
            [
                row(&["1", "He said \"hi\"", "2"]),
                row(&["2", "a\rb", "4"]),
                row(&["3", "c", "6"])
            ]
        );
    }

    /// The scan finds records as the tolerant reader does, and the quotes that do not close.
    /// The default dialect with `csv.max_field_size = max`.
    fn comma(max: usize) -> Dialect {
        Dialect::of(&opts(max))
    }

    #[test]
    fn scan_finds_record_ends_and_unclosed_quotes() {
        let s = scan(b"a,\"x\ny\"\nb,c\"d\n", &comma(100), false);
        assert_eq!((s.bad.len(), s.last_end), (0, Some(14)));
        // Not complete: an open quote might close in data not read yet.
        let s = scan(b"a,b\nc,\"open\nd\n", &comma(100), false);
        assert_eq!((s.bad.len(), s.last_end), (0, Some(4)));
        let s = scan(b"a,b\nc,\"open\nd\n", &comma(5), false);
        assert_eq!(
            s.bad,
            [BadRecord {
                start: 4,
                quote: 6,
                end: 12,
                why: Unclosed::PastBound
            }]
        );
        assert_eq!(s.last_end, Some(14));
        let s = scan(b"a,b\nc,\"open\nd\n", &comma(100), true);
        assert_eq!(s.bad[0].why, Unclosed::AtEnd);
    }

    /// Comment lines (before and after the header, with quotes in them), an escape character
    /// (escaped quotes, an escaped backslash before the closing quote, delimiters and newlines in
    /// quotes): the tolerant reader reads them, rows keep the file's lines, and the scan ends
    /// records where the reader does.
    #[test]
    fn comments_and_an_escape_character() {
        let opts = CsvOptions {
            escape: Some('\\'),
            comment: Some('#'),
            ..CsvOptions::default()
        };
        let data: &[u8] =
            b"# exported \"by\" a tool\nid,body\n1,\"say \\\"hi\\\", twice\n# not a comment\"\n\
            # a \"comment\n2,\"C:\\\\dir\\\\\"\r\n\n#last\n3,plain\n";
        let d = Dialect::of(&opts);
        assert!(!d.plain());
        let s = scan(&data[23..], &d, false);
        assert_eq!((s.bad.len(), s.last_end), (0, Some(data.len() - 23)));
        let out = read(&ctx(), &opts, "k", data).unwrap();
        assert_eq!(
            table(&out),
            (
                vec![
                    row(&["1", "say \"hi\", twice\n# not a comment", "3"]),
                    row(&["2", "C:\\dir\\", "6"]),
                    row(&["3", "plain", "9"]),
                ],
                vec![]
            )
        );
        // An escaped quote does not close the field: the quote that does is missing.
        let out = read(&ctx(), &opts, "k", b"id,body\n1,\"open \\\"\n2,b\n").unwrap();
        assert_eq!(table(&out).0, [row(&["2", "b", "3"])]);
        assert_eq!(out.malformed[0].row, 2);
        assert!(out.malformed[0].unclosed_quote);
    }

    /// `skip_rows` lines go before the header, or before the first record without one; rows
    /// keep the file's lines; `null_values` lists the texts of null.
    #[test]
    fn skipped_lines_and_null_values() {
        let opts = CsvOptions {
            skip_rows: 2,
            delimiter: '\t',
            header: false,
            null_values: Some(vec!["NULL".into(), "\\N".into()]),
            ..CsvOptions::default()
        };
        let data = b"report of \"today\n\xff junk\n1\tNULL\n2\t\\N\n3\t\n4\tx,y\n";
        let out = read(&ctx(), &opts, "k", data).unwrap();
        assert_eq!(
            table(&out).0,
            [
                row(&["1", "<null>", "3"]),
                row(&["2", "<null>", "4"]),
                row(&["3", "", "5"]),
                row(&["4", "x,y", "6"])
            ]
        );
        let header = CsvOptions {
            skip_rows: 1,
            ..CsvOptions::default()
        };
        let out = read(&ctx(), &header, "k", b"title line\nbody,id\nb,1\n").unwrap();
        assert_eq!(table(&out).0, [row(&["1", "b", "3"])]);
        // Fewer lines than skip_rows: nothing to read.
        let out = read(&ctx(), &opts, "k", b"only one\n").unwrap();
        assert_eq!(out.rows_read(), 0);
        assert_eq!(skip_lines(b"a\nb", 2, false), None);
        assert_eq!(skip_lines(b"a\nb\nc", 2, false), Some(4));
    }

    #[test]
    fn missing_header_column_fails_the_file() {
        let e = read(&ctx(), &CsvOptions::default(), "m.csv", b"id\n1\n").unwrap_err();
        assert!(e.to_string().contains("no column \"body\""), "{e}");
    }
}
