//! JSON readers: JSON lines (split into chunks for parallel reading) and JSON documents: a
//! top-level array read in chunks of whole elements ([`ArrayScan`] finds them as the bytes
//! arrive), or a single value read whole.
//!
//! Values are taken from the raw JSON text: a string is unescaped, a number keeps its exact text,
//! `true`/`false` stay words, and objects or arrays stay JSON text. So a field that is a number in
//! one row and a string in another reads fine as a string column. A `json` column keeps every
//! value's JSON text (a string with its quotes and escapes); JSON `null` is SQL NULL in both.
//! Columns with a nested `path` (`http.status`) read the value at that path: a missing key, or a
//! path through a value that is not an object (a numeric segment indexes an array), is null.

use std::borrow::Cow;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::ReadOutput;
use super::columns::{PathNode, ReadContext, RowBuilder, truncate};
use crate::error::{Error, Result};

/// The cells of one record, indexed like the schema's columns.
type Cells<'a> = Vec<Option<Cow<'a, str>>>;

/// Reads JSON lines; `first_line` is the line number of the first line of `data`.
pub(super) fn read_lines(
    ctx: &ReadContext,
    key: &str,
    data: &[u8],
    first_line: u64,
) -> Result<ReadOutput> {
    let mut rows = RowBuilder::new(ctx, key);
    let mut cells: Cells<'_> = Vec::with_capacity(ctx.width());
    let mut start = 0;
    let ends = memchr::memchr_iter(b'\n', data).chain(std::iter::once(data.len()));
    for (this, end) in (first_line..).zip(ends) {
        let raw = &data[start.min(end)..end];
        start = end + 1;
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        let blank = match line.first() {
            None => true,
            Some(b) if b.is_ascii_whitespace() => line.iter().all(u8::is_ascii_whitespace),
            Some(_) => false,
        };
        if blank {
            continue;
        }
        read_record(ctx, &mut rows, &mut cells, line, this);
    }
    rows.finish().map_err(|message| Error::Read {
        key: key.to_string(),
        message,
    })
}

/// Reads one record (a line, an array element) into a row, or a malformed record with its
/// reason: invalid UTF-8, invalid JSON, not an object, a value not of its column's type.
fn read_record<'a>(
    ctx: &ReadContext,
    rows: &mut RowBuilder<'_>,
    cells: &mut Cells<'a>,
    raw: &'a [u8],
    row: u64,
) {
    let text = match std::str::from_utf8(raw) {
        Ok(t) => t,
        Err(e) => {
            let at = e.valid_up_to() + 1;
            rows.malformed(row, format!("invalid UTF-8 at byte {at}"), raw);
            return;
        }
    };
    cells.clear();
    cells.resize(ctx.width(), None);
    let parsed = if scan_flat(ctx, text, cells) {
        Ok(())
    } else {
        cells.iter_mut().for_each(|c| *c = None);
        parse_object(ctx, text, cells)
    };
    match parsed {
        Ok(()) => {
            if let Err(reason) = rows.push(|i| cells[i].as_deref(), row) {
                rows.malformed(row, reason, raw);
            }
        }
        Err(reason) => rows.malformed(row, reason, raw),
    }
}

/// The first byte of a JSON document that is not whitespace (or a UTF-8 byte order mark), and
/// where it is; `None` if `data` has none yet.
pub(super) fn first_byte(data: &[u8]) -> Option<(usize, u8)> {
    let skip = if data.starts_with(b"\xEF\xBB\xBF") {
        3
    } else {
        0
    };
    data[skip..]
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .map(|p| (skip + p, data[skip + p]))
}

/// Reads a JSON document whole: a single object is one row (a single value of another kind, a
/// rejected row); a document that is not JSON fails the file.
pub(super) fn read_document(ctx: &ReadContext, key: &str, data: &[u8]) -> Result<ReadOutput> {
    let mut rows = RowBuilder::new(ctx, key);
    let fail = |message: String| Error::Read {
        key: key.to_string(),
        message,
    };
    let Some((start, _)) = first_byte(data) else {
        return Ok(ReadOutput::default());
    };
    let text = std::str::from_utf8(&data[start..]).map_err(|e| {
        fail(format!(
            "invalid UTF-8 at byte {}",
            start + e.valid_up_to() + 1
        ))
    })?;
    let value = serde_json::from_str::<&RawValue>(text)
        .map_err(|e| fail(format!("not a JSON document: {e}")))?;
    let mut cells: Cells<'_> = Vec::with_capacity(ctx.width());
    read_record(ctx, &mut rows, &mut cells, value.get().as_bytes(), 1);
    rows.finish().map_err(fail)
}

/// Reads the elements of a top-level array found in a chunk by [`ArrayScan`] (byte ranges of
/// `data`), one row each, numbered by their place in the array from `first` (1-based). An empty
/// element (a stray comma) is a rejected row.
pub(super) fn read_elements(
    ctx: &ReadContext,
    key: &str,
    data: &[u8],
    elements: &[(usize, usize)],
    first: u64,
) -> Result<ReadOutput> {
    let mut rows = RowBuilder::new(ctx, key);
    let mut cells: Cells<'_> = Vec::with_capacity(ctx.width());
    for (row, &(start, end)) in (first..).zip(elements) {
        let raw = data.get(start..end).unwrap_or_default().trim_ascii();
        if raw.is_empty() {
            rows.malformed(row, "empty array element (a stray comma)", raw);
            continue;
        }
        read_record(ctx, &mut rows, &mut cells, raw, row);
    }
    rows.finish().map_err(|message| Error::Read {
        key: key.to_string(),
        message,
    })
}

/// Where a top-level array is, for [`ArrayScan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// Before its `[`.
    Before,
    /// Between its `[` and `]`.
    Inside,
    /// After its `]`: only whitespace may follow.
    After,
}

/// Splits a top-level JSON array into its elements as its bytes arrive, so that a document of
/// any size is read in chunks of whole elements. It follows strings (and their escapes) and the
/// nesting depth only: an element's own syntax is checked when it is parsed, so a malformed
/// element whose brackets balance costs only its row. Offsets are into the buffer the feed
/// fills; [`ArrayScan::take`] hands over the elements before a cut and moves the rest to it.
#[derive(Debug)]
pub(super) struct ArrayScan {
    /// Bytes of the buffer scanned so far.
    pos: usize,
    place: Place,
    /// Nesting inside the current element.
    depth: u64,
    in_string: bool,
    /// A backslash in a string was the last byte scanned: the next byte is escaped.
    escape: bool,
    /// Where the current element starts (its first byte that is not whitespace).
    start: Option<usize>,
    /// Where the current element starts if none of it was seen yet: after its separator.
    after: usize,
    /// Elements found and not handed over yet (byte ranges).
    elements: Vec<(usize, usize)>,
    /// Elements found in all.
    count: u64,
    /// Where the last element found ends (at its `,` or the array's `]`): where a chunk may end.
    cut: usize,
    /// Bytes handed over before the buffer's start (for messages).
    offset: u64,
}

impl ArrayScan {
    /// A scan from the start of a document.
    pub(super) fn new() -> ArrayScan {
        ArrayScan {
            pos: 0,
            place: Place::Before,
            depth: 0,
            in_string: false,
            escape: false,
            start: None,
            after: 0,
            elements: Vec::new(),
            count: 0,
            cut: 0,
            offset: 0,
        }
    }

    /// Scans the bytes of `data` not scanned yet. The error says what follows the array's `]`
    /// that should not.
    pub(super) fn scan(&mut self, data: &[u8]) -> std::result::Result<(), String> {
        let mut p = self.pos;
        while p < data.len() {
            if self.in_string {
                if self.escape {
                    self.escape = false;
                    p += 1;
                    continue;
                }
                match memchr::memchr2(b'"', b'\\', &data[p..]) {
                    None => p = data.len(),
                    Some(k) if data[p + k] == b'"' => {
                        self.in_string = false;
                        p += k + 1;
                    }
                    Some(k) => {
                        self.escape = true;
                        p += k + 1;
                    }
                }
                continue;
            }
            let b = data[p];
            match self.place {
                Place::Before => {
                    if b == b'[' {
                        self.place = Place::Inside;
                        self.after = p + 1;
                    }
                }
                Place::After => {
                    if !b.is_ascii_whitespace() {
                        return Err(format!(
                            "not a JSON document: {} after the closing ] of the top-level \
                             array (at byte {})",
                            describe_byte(b),
                            self.offset + p as u64 + 1
                        ));
                    }
                }
                Place::Inside => match b {
                    b' ' | b'\t' | b'\n' | b'\r' => {}
                    b'"' => {
                        self.in_string = true;
                        self.start.get_or_insert(p);
                    }
                    b'{' | b'[' => {
                        self.depth += 1;
                        self.start.get_or_insert(p);
                    }
                    b'}' | b']' if self.depth > 0 => self.depth -= 1,
                    b',' if self.depth == 0 => self.end_element(p),
                    b']' => {
                        // The array's end: `[]` has no element, `[1,]` an empty last one.
                        if self.start.is_some() || self.count > 0 {
                            self.end_element(p);
                        }
                        self.cut = p;
                        self.place = Place::After;
                    }
                    _ => {
                        self.start.get_or_insert(p);
                    }
                },
            }
            p += 1;
        }
        self.pos = p;
        Ok(())
    }

    fn end_element(&mut self, at: usize) {
        self.elements.push((self.start.unwrap_or(self.after), at));
        self.count += 1;
        self.start = None;
        self.after = at + 1;
        self.cut = at;
    }

    /// Where a chunk may end: after the last element found (0: none found yet).
    pub(super) fn cut(&self) -> usize {
        self.cut
    }

    /// Whether the array's `]` was seen.
    pub(super) fn closed(&self) -> bool {
        self.place == Place::After
    }

    /// The elements found before `end` (a [`ArrayScan::cut`]), with the scan moved to a buffer
    /// that now starts at `end`.
    pub(super) fn take(&mut self, end: usize) -> Vec<(usize, usize)> {
        let keep = self.elements.partition_point(|&(_, e)| e <= end);
        let rest = self.elements.split_off(keep);
        let taken = std::mem::replace(
            &mut self.elements,
            rest.into_iter()
                .map(|(s, e)| (s.saturating_sub(end), e - end))
                .collect(),
        );
        self.pos = self.pos.saturating_sub(end);
        self.start = self.start.map(|s| s.saturating_sub(end));
        self.after = self.after.saturating_sub(end);
        self.cut = self.cut.saturating_sub(end);
        self.offset += end as u64;
        taken
    }

    /// Why a document that ends here is not a whole array (`None`: it is).
    pub(super) fn unfinished(&self) -> Option<String> {
        match self.place {
            Place::After => None,
            Place::Before => Some("not a JSON document: no top-level array".into()),
            Place::Inside => Some(format!(
                "truncated JSON document: the top-level array is not closed ({} elements \
                 read; the file ends {})",
                self.count,
                if self.in_string {
                    "inside a string"
                } else if self.start.is_some() {
                    "inside an element"
                } else {
                    "between elements"
                }
            )),
        }
    }
}

fn describe_byte(b: u8) -> String {
    if b.is_ascii_graphic() {
        format!("{:?}", b as char)
    } else {
        format!("byte 0x{b:02x}")
    }
}

/// The fast path for the common line: a flat object whose strings have no escapes. Fills
/// `cells` and returns `true`, or returns `false` for anything else (nested values, escapes,
/// bad JSON), which the full parser then reads, with its error messages. A flat line has no
/// nested value, so the columns at nested paths rightly stay null.
fn scan_flat<'a>(ctx: &ReadContext, text: &'a str, cells: &mut [Option<Cow<'a, str>>]) -> bool {
    let b = text.as_bytes();
    let ws = |mut i: usize| {
        while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\r' | b'\n') {
            i += 1;
        }
        i
    };
    // The end of a string whose opening quote is at `i - 1`, if it has no escapes or controls.
    let string_end = |i: usize| -> Option<usize> {
        let end = i + memchr::memchr2(b'"', b'\\', &b[i..])?;
        let controls = b[i..end].iter().fold(false, |acc, &c| acc | (c < 0x20));
        (b[end] == b'"' && !controls).then_some(end)
    };
    let mut i = ws(0);
    if b.get(i) != Some(&b'{') {
        return false;
    }
    i = ws(i + 1);
    if b.get(i) == Some(&b'}') {
        return ws(i + 1) == b.len();
    }
    let mut guess = 0;
    loop {
        if b.get(i) != Some(&b'"') {
            return false;
        }
        let Some(kend) = string_end(i + 1) else {
            return false;
        };
        let key = &text[i + 1..kend];
        i = ws(kend + 1);
        if b.get(i) != Some(&b':') {
            return false;
        }
        i = ws(i + 1);
        let value_start = i;
        let (value, next): (Option<&'a str>, usize) = match b.get(i) {
            Some(b'"') => {
                let Some(end) = string_end(i + 1) else {
                    return false;
                };
                (Some(&text[i + 1..end]), end + 1)
            }
            Some(b'n') if b[i..].starts_with(b"null") => (None, i + 4),
            Some(b't') if b[i..].starts_with(b"true") => (Some("true"), i + 4),
            Some(b'f') if b[i..].starts_with(b"false") => (Some("false"), i + 5),
            Some(b'-' | b'0'..=b'9') => {
                let end = i + b[i..]
                    .iter()
                    .position(|c| !matches!(c, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
                    .unwrap_or(b.len() - i);
                if !is_json_number(&b[i..end]) {
                    return false;
                }
                (Some(&text[i..end]), end)
            }
            _ => return false,
        };
        let slot = if guess < ctx.width() && ctx.is_column(key, guess) {
            Some(guess)
        } else {
            ctx.column(key)
        };
        if let Some(slot) = slot {
            cells[slot] = match value {
                // A json column keeps a string's quotes.
                Some(_) if ctx.keeps_json(slot) => Some(Cow::Borrowed(&text[value_start..next])),
                v => v.map(Cow::Borrowed),
            };
            guess = slot + 1;
        }
        i = ws(next);
        match b.get(i) {
            Some(b',') => i = ws(i + 1),
            Some(b'}') => return ws(i + 1) == b.len(),
            _ => return false,
        }
    }
}

/// Whether `n` follows JSON's number grammar: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
fn is_json_number(n: &[u8]) -> bool {
    let mut i = usize::from(n.first() == Some(&b'-'));
    let digits = |i: &mut usize| {
        let start = *i;
        while *i < n.len() && n[*i].is_ascii_digit() {
            *i += 1;
        }
        *i - start
    };
    let int_start = i;
    let int = digits(&mut i);
    if int == 0 || (int > 1 && n[int_start] == b'0') {
        return false;
    }
    if n.get(i) == Some(&b'.') {
        i += 1;
        if digits(&mut i) == 0 {
            return false;
        }
    }
    if matches!(n.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(n.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == n.len()
}

/// Parses one JSON object into `cells` (indexed like the schema's columns).
fn parse_object<'a>(
    ctx: &ReadContext,
    text: &'a str,
    cells: &mut [Option<Cow<'a, str>>],
) -> Result<(), String> {
    let mut de = serde_json::Deserializer::from_str(text);
    ObjectSeed { ctx, cells }
        .deserialize(&mut de)
        .map_err(|e| describe(&e))?;
    de.end().map_err(|e| describe(&e))
}

fn describe(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    if msg.starts_with("invalid type") {
        "not a JSON object".to_string()
    } else {
        format!("invalid JSON: {msg}")
    }
}

struct ObjectSeed<'c, 'a, 'b> {
    ctx: &'c ReadContext,
    cells: &'b mut [Option<Cow<'a, str>>],
}

impl<'de, 'c, 'b> DeserializeSeed<'de> for ObjectSeed<'c, 'de, 'b> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, 'c, 'b> Visitor<'de> for ObjectSeed<'c, 'de, 'b> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
        while let Some(key) = map.next_key_seed(StrSeed)? {
            let raw: &'de RawValue = map.next_value()?;
            if let Some(i) = self.ctx.column(key.as_ref()) {
                self.cells[i] =
                    cell_text(self.ctx, i, raw.get()).map_err(serde::de::Error::custom)?;
            }
            if let Some(node) = self.ctx.nested(key.as_ref()) {
                descend(self.ctx, node, raw.get(), self.cells).map_err(serde::de::Error::custom)?;
            }
        }
        Ok(())
    }
}

/// Reads the columns below a path node from the value at that path: keys of an object, indexes
/// of an array; below any other value they stay null.
fn descend<'a>(
    ctx: &ReadContext,
    node: &PathNode,
    text: &'a str,
    cells: &mut [Option<Cow<'a, str>>],
) -> Result<(), String> {
    let last = match text.as_bytes().first() {
        Some(b'{') => None,
        Some(b'[') => match node.last_element() {
            Some(last) => Some(last),
            None => return Ok(()),
        },
        _ => return Ok(()),
    };
    let mut de = serde_json::Deserializer::from_str(text);
    NodeSeed {
        ctx,
        node,
        cells,
        last,
    }
    .deserialize(&mut de)
    .map_err(|e| describe(&e))
}

/// The columns below one path node, read from an object or an array.
struct NodeSeed<'c, 'a, 'b> {
    ctx: &'c ReadContext,
    node: &'c PathNode,
    cells: &'b mut [Option<Cow<'a, str>>],
    /// An array: the last index a column reads.
    last: Option<usize>,
}

impl NodeSeed<'_, '_, '_> {
    fn fill<'a>(
        ctx: &ReadContext,
        child: &PathNode,
        raw: &'a RawValue,
        cells: &mut [Option<Cow<'a, str>>],
    ) -> Result<(), String> {
        if let Some(i) = child.column {
            cells[i] = cell_text(ctx, i, raw.get())?;
        }
        if child.has_children() {
            descend(ctx, child, raw.get(), cells)?;
        }
        Ok(())
    }
}

impl<'de, 'c, 'b> DeserializeSeed<'de> for NodeSeed<'c, 'de, 'b> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        if self.last.is_some() {
            d.deserialize_seq(self)
        } else {
            d.deserialize_map(self)
        }
    }
}

impl<'de, 'c, 'b> Visitor<'de> for NodeSeed<'c, 'de, 'b> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object or array")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
        while let Some(key) = map.next_key_seed(StrSeed)? {
            let raw: &'de RawValue = map.next_value()?;
            if let Some(child) = self.ctx.child(self.node, key.as_ref()) {
                Self::fill(self.ctx, child, raw, self.cells).map_err(serde::de::Error::custom)?;
            }
        }
        Ok(())
    }

    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<(), S::Error> {
        let last = self.last.unwrap_or_default();
        let mut i = 0;
        while i <= last {
            let Some(raw) = seq.next_element::<&'de RawValue>()? else {
                return Ok(());
            };
            if let Some(child) = self.node.element(i) {
                Self::fill(self.ctx, child, raw, self.cells).map_err(serde::de::Error::custom)?;
            }
            i += 1;
        }
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }
}

/// The text column `i` holds for a JSON value: its JSON text for a `json` column, else
/// [`value_text`]; JSON `null` is null in both.
fn cell_text<'a>(
    ctx: &ReadContext,
    i: usize,
    raw: &'a str,
) -> Result<Option<Cow<'a, str>>, String> {
    if ctx.keeps_json(i) {
        Ok((!raw.starts_with('n')).then_some(Cow::Borrowed(raw)))
    } else {
        value_text(raw)
    }
}

/// The text of a JSON value, as a string column holds it.
fn value_text(raw: &str) -> Result<Option<Cow<'_, str>>, String> {
    match raw.as_bytes().first() {
        Some(b'"') => {
            let inner = &raw[1..raw.len() - 1];
            if inner.contains('\\') {
                serde_json::from_str::<String>(raw)
                    .map(|s| Some(Cow::Owned(s)))
                    .map_err(|e| format!("bad string {}: {e}", truncate(raw, 40)))
            } else {
                Ok(Some(Cow::Borrowed(inner)))
            }
        }
        Some(b'n') => Ok(None),
        Some(_) => Ok(Some(Cow::Borrowed(raw))),
        None => Ok(None),
    }
}

/// A map key, borrowed when it has no escapes.
struct StrSeed;

impl<'de> DeserializeSeed<'de> for StrSeed {
    type Value = Cow<'de, str>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for StrSeed {
    type Value = Cow<'de, str>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HeaderCase;
    use crate::source::{ColumnDef, ColumnType, SourceSchema};
    use datafusion::arrow::array::{Array, AsArray};

    fn ctx() -> ReadContext {
        ReadContext::new(
            &SourceSchema {
                columns: vec![
                    ColumnDef::new("a", ColumnType::String),
                    ColumnDef::new("n", ColumnType::Int64),
                ],
            },
            Default::default(),
        )
    }

    /// The fast path and the full parser read every line the same way.
    #[test]
    fn fast_path_agrees_with_the_full_parser() {
        let c = ctx();
        let lines = [
            r#"{"a":"x","n":1}"#,
            r#" { "n" : -1.5e3 , "a" : "y z" } "#,
            r#"{"a":null,"n":true,"zz":"ignored"}"#,
            r#"{"n":"2","a":"x","a":"last wins"}"#,
            r#"{}"#,
            r#"{"a":"é ünïcode"}"#,
            r#"{"a":"esc\"aped"}"#,
            r#"{"a":{"k":1}}"#,
            r#"{"a":01}"#,
            r#"{"a":1.}"#,
            r#"{"a":"x",}"#,
            r#"{"a":"x"} trailing"#,
            r#"{"a":"x""#,
            r#"{"a":tru}"#,
            "{\"a\":\"tab\there\"}",
        ];
        for line in lines {
            let mut fast = vec![None; 2];
            let mut full = vec![None; 2];
            let ok = scan_flat(&c, line, &mut fast);
            let want = parse_object(&c, line, &mut full);
            if ok {
                assert!(want.is_ok(), "fast path accepted {line}");
                assert_eq!(fast, full, "{line}");
            }
        }
        let mut cells = vec![None; 2];
        assert!(scan_flat(&c, lines[1], &mut cells));
        assert_eq!(cells[0].as_deref(), Some("y z"));
        assert_eq!(cells[1].as_deref(), Some("-1.5e3"));
        for bad in &lines[6..] {
            assert!(!scan_flat(&c, bad, &mut vec![None; 2]), "{bad}");
        }
    }

    #[test]
    fn mixed_types_nested_values_and_bad_lines() {
        let data = b"{\"a\":\"x\",\"n\":1}\n{\"a\":12.50,\"n\":\"2\"}\n{\"a\":{\"k\":[1,2]}}\n{\"a\":\"q\\\"\"\n[1]\n\n{\"a\":\"\xff\"}\n{\"n\":\"z\"}\n";
        let c = ctx();
        let out = read_lines(&c, "f.jsonl", data, 1).unwrap();
        assert_eq!(out.good_rows(), 3);
        let b = &out.batches[0];
        let a = b.column(0).as_string::<i32>();
        assert_eq!(a.value(0), "x");
        assert_eq!(a.value(1), "12.50");
        assert_eq!(a.value(2), "{\"k\":[1,2]}");
        let n = b
            .column(1)
            .as_primitive::<datafusion::arrow::datatypes::Int64Type>();
        assert_eq!(n.value(1), 2);
        assert!(n.is_null(2));
        let rows: Vec<u64> = out.malformed.iter().map(|m| m.row).collect();
        assert_eq!(rows, vec![4, 5, 7, 8]);
        assert!(out.malformed[0].reason.contains("invalid JSON"));
        assert_eq!(out.malformed[1].reason, "not a JSON object");
        assert!(out.malformed[2].reason.contains("UTF-8"));
        assert!(out.malformed[3].reason.contains("column n"));
        assert_eq!(out.rows_read(), 7);
    }

    fn col(name: &str, ty: ColumnType, path: Option<&str>) -> ColumnDef {
        ColumnDef {
            path: path.map(str::to_string),
            ..ColumnDef::new(name, ty)
        }
    }

    /// Each row's cells as text (null as `<null>`), read by the reader under test.
    fn texts(out: &ReadOutput) -> Vec<Vec<String>> {
        let mut rows = Vec::new();
        for b in &out.batches {
            for r in 0..b.num_rows() {
                rows.push(
                    (0..b.num_columns() - 2)
                        .map(|c| {
                            let a = datafusion::arrow::compute::cast(
                                b.column(c),
                                &datafusion::arrow::datatypes::DataType::Utf8,
                            )
                            .unwrap();
                            let a = a.as_string::<i32>();
                            if a.is_valid(r) {
                                a.value(r).to_string()
                            } else {
                                "<null>".into()
                            }
                        })
                        .collect(),
                );
            }
        }
        rows
    }

    #[test]
    fn nested_paths_arrays_json_text_and_case() {
        let schema = SourceSchema {
            columns: vec![
                col("status", ColumnType::Int64, Some("http.status")),
                col("method", ColumnType::String, Some("HTTP.Method")),
                col("first_tag", ColumnType::String, Some("tags.0")),
                col("sku", ColumnType::String, Some("items.1.sku")),
                col("http", ColumnType::Json, None),
                col("name", ColumnType::Json, None),
                col("deep", ColumnType::String, Some("a.b.c")),
            ],
        };
        let lines = concat!(
            r#"{"http":{"status":200,"method":"GET"},"tags":["x","y"],"items":[{"sku":"a"},{"sku":"b\"q"}],"name":"ab\"c","a":{"b":{"c":"deep"}}}"#,
            "\n",
            r#"{"http":null,"tags":"notanarray","items":[{"sku":"a"}],"name":12,"a":{"b":5}}"#,
            "\n",
            r#"{"name":"plain","http":"flat"}"#,
            "\n",
            r#"{"http":{"status":"abc"}}"#,
            "\n",
            r#"{"http":{"Status":201,"METHOD":"PUT"},"a":{"B":{"C":true}},"name":null}"#,
            "\n",
        );
        let exact = ReadContext::new(&schema, HeaderCase::Exact);
        let out = read_lines(&exact, "f.jsonl", lines.as_bytes(), 1).unwrap();
        let n = "<null>";
        assert_eq!(
            texts(&out),
            vec![
                vec![
                    "200",
                    n,
                    "x",
                    "b\"q",
                    r#"{"status":200,"method":"GET"}"#,
                    r#""ab\"c""#,
                    "deep"
                ],
                vec![n, n, n, n, n, "12", n],
                vec![n, n, n, n, r#""flat""#, r#""plain""#, n],
                vec![n, n, n, n, r#"{"Status":201,"METHOD":"PUT"}"#, n, n],
            ]
        );
        assert_eq!(out.malformed.len(), 1);
        assert_eq!(out.malformed[0].row, 4);
        assert_eq!(
            out.malformed[0].reason,
            "column status: \"abc\" is not a valid int64"
        );
        let insensitive = ReadContext::new(&schema, HeaderCase::Insensitive);
        let out = read_lines(&insensitive, "f.jsonl", lines.as_bytes(), 1).unwrap();
        let rows = texts(&out);
        assert_eq!(rows[0][1], "GET");
        assert_eq!(rows[3][..2], ["201".to_string(), "PUT".to_string()]);
        assert_eq!(rows[3][6], "true");
    }

    /// The elements the scan finds, handed over wherever chunks end, are the array's elements.
    #[test]
    fn array_scan_finds_whole_elements_at_any_cut() {
        let doc = concat!(
            "\u{feff}  [\n",
            r#"  {"a": "x ] } , \" [ {", "n": [1, [2, {"k": "]"}]]},"#,
            "\n  {\"a\": \"line\\nbreak\\\\\"}, 42 ,\"s,]\", [], {},\n",
            r#"  {"a": tru}, {"bad": [1}, {"ok": 1}], {"last": 2}"#,
            "\n] \n"
        );
        let want: Vec<&str> = vec![
            r#"{"a": "x ] } , \" [ {", "n": [1, [2, {"k": "]"}]]}"#,
            "{\"a\": \"line\\nbreak\\\\\"}",
            "42",
            "\"s,]\"",
            "[]",
            "{}",
            r#"{"a": tru}"#,
            // An unbalanced element runs on to where its brackets balance.
            r#"{"bad": [1}, {"ok": 1}]"#,
            r#"{"last": 2}"#,
        ];
        let bytes = doc.as_bytes();
        for step in [1, 2, 3, 5, 8, 13, bytes.len()] {
            let mut scan = ArrayScan::new();
            let mut buf: Vec<u8> = Vec::new();
            let mut got: Vec<String> = Vec::new();
            let mut fed = 0;
            while fed < bytes.len() {
                let to = (fed + step).min(bytes.len());
                buf.extend_from_slice(&bytes[fed..to]);
                fed = to;
                scan.scan(&buf).unwrap();
                let end = if fed == bytes.len() {
                    buf.len()
                } else {
                    scan.cut()
                };
                if end > 0 {
                    for (s, e) in scan.take(end) {
                        got.push(String::from_utf8(buf[s..e].trim_ascii().to_vec()).unwrap());
                    }
                    buf.drain(..end);
                }
            }
            assert!(scan.closed() && scan.unfinished().is_none(), "step {step}");
            assert_eq!(got, want, "step {step}");
            assert_eq!(scan.count, want.len() as u64);
        }
        // Empty arrays, stray commas, trailing text, truncation.
        let run = |doc: &str| {
            let mut scan = ArrayScan::new();
            let r = scan.scan(doc.as_bytes());
            let n = scan.count;
            let elements = if r.is_ok() {
                scan.take(doc.len())
            } else {
                Vec::new()
            };
            (r, n, elements, scan.unfinished())
        };
        assert_eq!(run("[ ]").1, 0);
        assert_eq!(run("[1,,2,]").2, vec![(1, 2), (3, 3), (4, 5), (6, 6)]);
        let (r, ..) = run("[1] x");
        assert!(r.unwrap_err().contains("'x' after the closing ]"));
        let (_, n, _, why) = run("[{\"a\":1},{\"b\":\"unclo");
        assert_eq!(n, 1);
        assert_eq!(
            why.unwrap(),
            "truncated JSON document: the top-level array is not closed (1 elements read; the \
             file ends inside a string)"
        );
    }

    #[test]
    fn elements_are_rows_numbered_by_their_place() {
        let c = ctx();
        let doc = br#"[{"a":"x","n":1}, 7, {"a":"y","n":"z"},, {"a":"q\u00e9"}]"#;
        let mut scan = ArrayScan::new();
        scan.scan(doc).unwrap();
        let elements = scan.take(doc.len());
        let out = read_elements(&c, "f.json", doc, &elements, 10).unwrap();
        assert_eq!(texts(&out), vec![vec!["x", "1"], vec!["qé", "<null>"]]);
        let rows: Vec<i64> = out.batches[0]
            .column(3)
            .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
            .values()
            .to_vec();
        assert_eq!(rows, vec![10, 14]);
        let bad: Vec<(u64, &str)> = out
            .malformed
            .iter()
            .map(|m| (m.row, m.reason.as_str()))
            .collect();
        assert_eq!(
            bad,
            vec![
                (11, "not a JSON object"),
                (12, "column n: \"z\" is not a valid int64"),
                (13, "empty array element (a stray comma)"),
            ]
        );
    }
}
