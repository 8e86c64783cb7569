//! CSV reader: a header matched to the schema by name, quoted fields with delimiters, doubled
//! quotes and newlines inside, and a malformed row for a record with the wrong number of fields
//! or invalid UTF-8.

use super::ReadOutput;
use super::columns::{ReadContext, RowBuilder};
use crate::config::CsvOptions;
use crate::error::{Error, Result};

/// Reads a whole CSV file (header included).
#[cfg(test)]
pub(super) fn read(
    ctx: &ReadContext,
    opts: &CsvOptions,
    key: &str,
    data: &[u8],
) -> Result<ReadOutput> {
    match read_header(ctx, opts, key, data, true)? {
        None => Ok(ReadOutput::default()),
        Some((mapping, end)) => {
            let line = 1 + memchr::memchr_iter(b'\n', &data[..end]).count() as u64;
            read_records(ctx, opts, key, &data[end..], line, &mapping)
        }
    }
}

fn reader<'d>(opts: &CsvOptions, data: &'d [u8]) -> csv::Reader<&'d [u8]> {
    csv::ReaderBuilder::new()
        .delimiter(opts.delimiter as u8)
        .quote(opts.quote as u8)
        .double_quote(true)
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
    let mut end = reader.position().byte() as usize;
    // The reader stops between the CR and the LF of a CRLF.
    if data[..end].ends_with(b"\r") && data.get(end) == Some(&b'\n') {
        end += 1;
    }
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
    for wanted in &ctx.names {
        if !names.iter().any(|n| n == wanted) {
            return Err(fail(format!(
                "the header has no column \"{wanted}\" (it has: {})",
                names.join(", ")
            )));
        }
    }
    Ok(Some((
        names.iter().map(|n| ctx.index.get(n).copied()).collect(),
        end,
    )))
}

/// Reads CSV records (no header); `first_line` is the line `data` starts at, `mapping` from
/// [`read_header`]. A chunk whose quotes all open, close or double inside a field, and whose
/// records are all UTF-8, is read by the SIMD reader; any other chunk (a stray quote inside a
/// field, a lone CR, invalid UTF-8) by the tolerant one, which reads such records the way the
/// `csv` crate does and names the column of invalid UTF-8. Both give the same rows for a chunk
/// both can read.
pub(super) fn read_records(
    ctx: &ReadContext,
    opts: &CsvOptions,
    key: &str,
    data: &[u8],
    first_line: u64,
    mapping: &[Option<usize>],
) -> Result<ReadOutput> {
    let layout = Layout::new(ctx, opts, mapping);
    if plain_quoting(data, opts.delimiter as u8, opts.quote as u8)
        && let Some(out) = read_fast(ctx, &layout, key, data, first_line)
    {
        return out;
    }
    read_tolerant(ctx, &layout, key, data, first_line)
}

/// Whether every quote in `data` (which starts at a record) opens a field, closes one or is
/// doubled inside one, and every CR outside quotes ends a line: what the two readers read alike.
fn plain_quoting(data: &[u8], delimiter: u8, quote: u8) -> bool {
    let mut inside = false;
    let mut marks = memchr::memchr2_iter(quote, b'\r', data);
    while let Some(p) = marks.next() {
        let next = data.get(p + 1).copied();
        if data[p] == b'\r' {
            if !inside && next != Some(b'\n') {
                return false;
            }
        } else if !inside {
            if p > 0 && data[p - 1] != b'\n' && data[p - 1] != delimiter {
                return false;
            }
            inside = true;
        } else if next == Some(quote) {
            marks.next(); // a doubled quote
        } else if next.is_none_or(|b| b == delimiter || b == b'\n' || b == b'\r') {
            inside = false;
        } else {
            return false;
        }
    }
    !inside
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
    let mut rows = RowBuilder::new(ctx, key);
    let (mut start, mut line) = (0, first_line);
    while reader.read_byte_record(&mut record) {
        let end = (reader.position() as usize).min(data.len());
        let raw = &data[start.min(end)..end];
        start = end;
        let (at, record_raw) = past_blank_lines(raw, line);
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

/// A record's bytes `raw` as read, starting at `line`, without the blank lines the read skipped
/// before it; and the line the record itself starts at.
fn past_blank_lines(raw: &[u8], line: u64) -> (u64, &[u8]) {
    let blank = raw
        .iter()
        .take_while(|&&b| b == b'\n' || b == b'\r')
        .count();
    let at = line + memchr::memchr_iter(b'\n', &raw[..blank]).count() as u64;
    (at, &raw[blank..])
}

/// `part` (a slice of the bytes `text` was read from) as a slice of `text`.
fn slice_of<'t>(text: &'t str, part: &[u8]) -> Option<&'t str> {
    let at = (part.as_ptr() as usize).checked_sub(text.as_ptr() as usize)?;
    text.get(at..at.checked_add(part.len())?)
}

/// How a file's records map to rows: where each schema column is in a record (`None`: not in
/// the file), how many fields a record has, and the text that means null.
struct Layout<'o> {
    opts: &'o CsvOptions,
    columns: Vec<Option<usize>>,
    /// File column `j` is schema column `mapping[j]`.
    mapping: &'o [Option<usize>],
}

impl<'o> Layout<'o> {
    fn new(ctx: &ReadContext, opts: &'o CsvOptions, mapping: &'o [Option<usize>]) -> Layout<'o> {
        Layout {
            opts,
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
                .filter(|v| *v != self.opts.null_value)
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
    let mut rows = RowBuilder::new(ctx, key);
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
        let (line, raw) = past_blank_lines(raw, line);
        if text {
            layout.add(&mut rows, record.len(), |j| record.get(j), line, raw);
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
        let bad = bytes
            .iter()
            .zip(layout.mapping)
            .find_map(|(field, target)| {
                let i = (*target)?;
                let e = std::str::from_utf8(field).err()?;
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
                let field = |j| bytes.get(j).and_then(|f| std::str::from_utf8(f).ok());
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
        let col = |n: &str| ColumnDef {
            name: n.into(),
            ty: ColumnType::String,
        };
        ReadContext::new(&SourceSchema {
            columns: vec![col("id"), col("body")],
        })
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
            null_value: "NULL".into(),
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
        assert!(plain_quoting(&data[15..], b',', b'"'));
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
        let c = ReadContext::new(&schema);
        let opts = CsvOptions::default();
        let tickets = crate::generate::sample(crate::generate::Kind::Tickets, 3000, 7);
        let (mapping, end) = read_header(&c, &opts, "t", tickets.as_bytes(), true)
            .unwrap()
            .unwrap();
        let body = &tickets.as_bytes()[end..];
        assert!(plain_quoting(body, b',', b'"'));
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
            (b"1,a\r2,b\n", false),
            (b"1,\"open\n", false),
            (b"1,\"a\r\nb\"\r\n", true),
            (b"\"1\",\"\"\n", true),
        ] {
            assert_eq!(
                plain_quoting(data, b',', b'"'),
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

    #[test]
    fn missing_header_column_fails_the_file() {
        let e = read(&ctx(), &CsvOptions::default(), "m.csv", b"id\n1\n").unwrap_err();
        assert!(e.to_string().contains("no column \"body\""), "{e}");
    }
}
