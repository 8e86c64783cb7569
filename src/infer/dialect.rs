//! The CSV dialect of a sample, sniffed from its first records in steps, each deciding one option
//! of `[source.csv]` from the bytes and what the steps before decided:
//!
//! 1. text: the bytes as they are (UTF-8; a BOM is dropped from the first name by the reader);
//! 2. where records start: the first line;
//! 3. the delimiter among `,` `\t` `;` `|`: the one that splits the records into the same number
//!    of fields most consistently (quotes respected);
//! 4. the header: the first record names the columns unless its cells fit the types of the
//!    columns below it, or its names are empty or repeated.
//!
//! Options the config does not have yet slot in as steps of their own: `encoding` at step 1
//! (bytes that are not UTF-8: try Latin-1 / Windows-1252), `skip_rows` and `comment` at step 2
//! (leading lines whose field count differs from the mode; lines starting with `#`), each
//! setting its field of [`Dialect`] and narrowing the bytes the next steps see.

use std::collections::{HashMap, HashSet};

use super::column;

/// Delimiters tried, in order of preference on a tie.
const DELIMITERS: [char; 4] = [',', '\t', ';', '|'];

/// Records the sniffer looks at.
const SNIFF_RECORDS: usize = 1_000;

/// What the sniffer decided.
#[derive(Debug, Clone)]
pub struct Dialect {
    /// Field delimiter.
    pub delimiter: char,
    /// Quote character.
    pub quote: char,
    /// Whether the first record names the columns.
    pub header: bool,
    /// The file's column names (the header as the reader trims it), or `column_1`... without a
    /// header.
    pub names: Vec<String>,
}

/// Sniffs the dialect of `data`, the first lines of a file (`complete`: all of it). What it is
/// unsure of goes to `notes`.
pub fn sniff(data: &[u8], complete: bool, notes: &mut Vec<String>) -> Dialect {
    // Step 1: the text. Step 2: records start at the first line.
    let body = data;
    // Step 3: the delimiter.
    let quote = '"';
    let (delimiter, records) = delimiter(body, quote, complete, notes);
    // Step 4: the header.
    let width = mode(&records).unwrap_or(1);
    let rows: Vec<&Vec<String>> = records.iter().filter(|r| r.len() == width).collect();
    let (header, names) = header(&records, &rows, width, notes);
    Dialect {
        delimiter,
        quote,
        header,
        names,
    }
}

/// The records of `data` split by `delimiter` (blank lines skipped; without `complete`, the last
/// record dropped, as it may be cut).
fn records(data: &[u8], delimiter: char, quote: char, complete: bool) -> Vec<Vec<String>> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter as u8)
        .quote(quote as u8)
        .has_headers(false)
        .flexible(true)
        .from_reader(data);
    let mut out = Vec::new();
    let mut record = csv::ByteRecord::new();
    while out.len() <= SNIFF_RECORDS {
        match reader.read_byte_record(&mut record) {
            Ok(true) => {}
            Ok(false) | Err(_) => break,
        }
        if record.len() == 1 && record[0].iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        out.push(
            record
                .iter()
                .map(|f| {
                    let f = String::from_utf8_lossy(f);
                    f.strip_suffix('\r').unwrap_or(&f).to_string()
                })
                .collect(),
        );
    }
    if !complete && out.len() <= SNIFF_RECORDS {
        out.pop();
    }
    out.truncate(SNIFF_RECORDS);
    out
}

/// The most frequent field count (the larger on a tie).
fn mode(records: &[Vec<String>]) -> Option<usize> {
    let mut counts: HashMap<usize, usize> = HashMap::new();
    for r in records {
        *counts.entry(r.len()).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by_key(|&(width, n)| (n, width))
        .map(|(w, _)| w)
}

/// The delimiter that splits the records most consistently (share of records with the modal
/// field count; then more fields), and the records it splits.
fn delimiter(
    data: &[u8],
    quote: char,
    complete: bool,
    notes: &mut Vec<String>,
) -> (char, Vec<Vec<String>>) {
    struct Try {
        delimiter: char,
        records: Vec<Vec<String>>,
        width: usize,
        share: f64,
    }
    let mut tries: Vec<Try> = DELIMITERS
        .iter()
        .map(|&d| {
            let records = records(data, d, quote, complete);
            let width = mode(&records).unwrap_or(1);
            let n = records.iter().filter(|r| r.len() == width).count();
            let share = n as f64 / records.len().max(1) as f64;
            Try {
                delimiter: d,
                records,
                width,
                share,
            }
        })
        .collect();
    // Stable: on a full tie the earlier delimiter stays first.
    tries.sort_by(|a, b| {
        let key = |t: &Try| (t.width > 1, t.share);
        key(b)
            .partial_cmp(&key(a))
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(b.width.cmp(&a.width))
    });
    let mut tries = tries.into_iter();
    let Some(best) = tries.next() else {
        return (',', Vec::new());
    };
    if best.width <= 1 {
        notes.push(
            "no delimiter splits the lines (one column): read with \",\"; set csv.delimiter if \
             the file has another"
                .into(),
        );
        return (',', best.records);
    }
    if let Some(next) = tries.find(|t| t.width > 1 && t.share >= 0.9 && best.share - t.share < 0.05)
    {
        notes.push(format!(
            "the delimiter could also be {:?} ({} fields in {:.0}% of the records); took {:?} \
             ({} fields in {:.0}%)",
            next.delimiter,
            next.width,
            next.share * 100.0,
            best.delimiter,
            best.width,
            best.share * 100.0
        ));
    }
    if best.share < 0.9 {
        notes.push(format!(
            "only {:.0}% of the records have {} fields with the delimiter {:?}: a ragged file \
             (the others will be rejected as malformed)",
            best.share * 100.0,
            best.width,
            best.delimiter
        ));
    }
    (best.delimiter, best.records)
}

/// Whether the first record is a header, and the file's column names.
fn header(
    records: &[Vec<String>],
    rows: &[&Vec<String>],
    width: usize,
    notes: &mut Vec<String>,
) -> (bool, Vec<String>) {
    let generated = || (1..=width).map(|i| format!("column_{i}")).collect();
    let Some(first) = records.first() else {
        return (true, Vec::new());
    };
    // As the reader reads a header: trimmed, a BOM dropped.
    let names: Vec<String> = first
        .iter()
        .map(|f| f.trim().trim_start_matches('\u{feff}').to_string())
        .collect();
    if first.len() != width {
        notes.push(format!(
            "the first line has {} fields, most others {width}: a title or preamble above the \
             header? (sluice reads the first line as the header)",
            first.len()
        ));
        return (true, names);
    }
    let mut seen = HashSet::new();
    let repeated: Vec<&String> = names.iter().filter(|n| !seen.insert(*n)).collect();
    if names.iter().any(String::is_empty) || !repeated.is_empty() {
        let why = if let Some(r) = repeated.first() {
            format!("names {r:?} twice")
        } else {
            "has an empty name".to_string()
        };
        notes.push(format!(
            "the first row {why}: read as data (header = false, columns column_1...); if it is \
             a header, give every column a distinct name"
        ));
        return (false, generated());
    }
    // Columns typed below the first row: does the first row fit their types?
    let (mut typed, mut fits) = (0, 0);
    for (j, name) in names.iter().enumerate() {
        let cells: Vec<Option<&str>> = rows
            .iter()
            .skip(1)
            .map(|r| Some(r[j].as_str()).filter(|v| !v.is_empty()))
            .collect();
        let inferred = column::infer(&column_name(name), &cells);
        if inferred.ty == crate::source::ColumnType::String || inferred.values == 0 {
            continue;
        }
        typed += 1;
        if inferred.parser().is_some_and(|p| p.parse(name).is_some()) {
            fits += 1;
        }
    }
    if typed == 0 {
        if rows.len() > 1 {
            notes.push(
                "every column is text, so the first row could be a header or data: took it for \
                 a header (set csv.header = false if it is data)"
                    .into(),
            );
        }
        return (true, names);
    }
    if fits * 2 > typed {
        notes.push(format!(
            "the first row's cells fit the types of the columns below ({fits} of {typed} typed \
             columns): no header (header = false, columns column_1...)"
        ));
        return (false, generated());
    }
    if fits * 2 == typed {
        notes.push(format!(
            "half of the first row's cells fit the types below ({fits} of {typed}): took it for \
             a header"
        ));
    }
    (true, names)
}

/// The schema name a header name would get (for the name-based guesses of the column's type).
fn column_name(name: &str) -> String {
    super::names::snake(name).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sniffed(text: &str) -> (Dialect, Vec<String>) {
        let mut notes = Vec::new();
        (sniff(text.as_bytes(), true, &mut notes), notes)
    }

    #[test]
    fn delimiter_and_header() {
        let (d, _) = sniffed("id;name;amount\n1;\"a;b\";1,5\n2;c;2,5\n");
        assert_eq!((d.delimiter, d.header), (';', true));
        assert_eq!(d.names, ["id", "name", "amount"]);
        let (d, notes) =
            sniffed("1\talice\t2024-01-01\n2\tbob\t2024-01-02\n3\tcarol\t2024-01-03\n");
        assert_eq!((d.delimiter, d.header), ('\t', false), "{notes:?}");
        assert_eq!(d.names, ["column_1", "column_2", "column_3"]);
        let (d, notes) = sniffed("a,,c\n1,2,3\n");
        assert!(!d.header && notes[0].contains("empty name"), "{notes:?}");
        let (d, notes) = sniffed("x|y\nfoo|bar\nbaz|qux\n");
        assert_eq!((d.delimiter, d.header), ('|', true));
        assert!(notes[0].contains("every column is text"), "{notes:?}");
        let (d, notes) = sniffed("just one column\nanother\n");
        assert_eq!(d.delimiter, ',');
        assert!(notes[0].contains("one column"), "{notes:?}");
    }
}
