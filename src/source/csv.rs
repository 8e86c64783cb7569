//! CSV reader: a header matched to the schema by name, quoted fields with delimiters, doubled
//! quotes and newlines inside, and a malformed row for a record with the wrong number of fields
//! or invalid UTF-8.

use std::borrow::Cow;

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
    let end = reader.position().byte() as usize;
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
/// [`read_header`]. Records are read as text, checked for UTF-8 once each (an all-ASCII record
/// costs one pass); only a record that is not valid UTF-8 is read again as bytes, to tell which
/// column it is in (a column the schema does not take may hold anything).
pub(super) fn read_records(
    ctx: &ReadContext,
    opts: &CsvOptions,
    key: &str,
    data: &[u8],
    first_line: u64,
    mapping: &[Option<usize>],
) -> Result<ReadOutput> {
    let fail = |message: String| Error::Read {
        key: key.to_string(),
        message,
    };
    let mut reader = reader(opts, data);
    let mut record = csv::StringRecord::new();
    let mut bytes = csv::ByteRecord::new();
    let expected = mapping.len();
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
        let line = if text {
            record.position().map(|p| p.line() + offset).unwrap_or(line)
        } else {
            // Not UTF-8: the same record again, as bytes.
            let mut again = self::reader(opts, raw);
            if !again
                .read_byte_record(&mut bytes)
                .map_err(|e| fail(format!("line {line}: {e}")))?
            {
                continue;
            }
            // Blank lines before the record were skipped by the read.
            let blank = raw.iter().take_while(|&&b| b == b'\n' || b == b'\r');
            line + blank.filter(|&&b| b == b'\n').count() as u64
        };
        let fields = if text {
            record.as_byte_record()
        } else {
            &bytes
        };
        let len = fields.len();
        if len == 1 && fields[0].is_empty() && expected > 1 {
            continue; // a blank line
        }
        if len != expected {
            rows.malformed(
                line,
                format!("expected {expected} fields, found {len}"),
                raw,
            );
            continue;
        }
        let mut cells: Vec<Option<Cow<'_, str>>> = vec![None; ctx.width()];
        let mut bad = None;
        if text {
            for (v, target) in record.iter().zip(mapping) {
                if let Some(i) = *target
                    && v != opts.null_value
                {
                    cells[i] = Some(Cow::Borrowed(v));
                }
            }
        } else {
            for (field, target) in fields.iter().zip(mapping) {
                let Some(i) = *target else { continue };
                match std::str::from_utf8(field) {
                    Ok(v) if v == opts.null_value => {}
                    Ok(v) => cells[i] = Some(Cow::Borrowed(v)),
                    Err(e) => {
                        bad = Some(format!(
                            "invalid UTF-8 in column {} at byte {}",
                            ctx.names[i],
                            e.valid_up_to() + 1
                        ));
                        break;
                    }
                }
            }
        }
        let result = match bad {
            Some(reason) => Err(reason),
            None => rows.push(&cells, line),
        };
        if let Err(reason) = result {
            rows.malformed(line, reason, raw);
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
