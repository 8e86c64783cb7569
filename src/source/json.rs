//! JSON readers: JSON lines (split into chunks for parallel reading) and whole JSON documents.
//!
//! Values are taken from the raw JSON text: a string is unescaped, a number keeps its exact text,
//! `true`/`false` stay words, and objects or arrays stay JSON text. So a field that is a number in
//! one row and a string in another reads fine as a string column.

use std::borrow::Cow;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::ReadOutput;
use super::columns::{ReadContext, RowBuilder, truncate};
use crate::error::{Error, Result};

/// Reads JSON lines; `first_line` is the line number of the first line of `data`.
pub(super) fn read_lines(
    ctx: &ReadContext,
    key: &str,
    data: &[u8],
    first_line: u64,
) -> Result<ReadOutput> {
    let mut rows = RowBuilder::new(ctx, key);
    let mut cells: Vec<Option<Cow<'_, str>>> = Vec::with_capacity(ctx.width());
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
        let text = match std::str::from_utf8(line) {
            Ok(t) => t,
            Err(e) => {
                rows.malformed(
                    this,
                    format!("invalid UTF-8 at byte {}", e.valid_up_to() + 1),
                    line,
                );
                continue;
            }
        };
        cells.clear();
        cells.resize(ctx.width(), None);
        let parsed = if scan_flat(ctx, text, &mut cells) {
            Ok(())
        } else {
            cells.iter_mut().for_each(|c| *c = None);
            parse_object(ctx, text, &mut cells)
        };
        match parsed {
            Ok(()) => {
                if let Err(reason) = rows.push(|i| cells[i].as_deref(), this) {
                    rows.malformed(this, reason, line);
                }
            }
            Err(reason) => rows.malformed(this, reason, line),
        }
    }
    rows.finish().map_err(|message| Error::Read {
        key: key.to_string(),
        message,
    })
}

/// Reads a JSON document: an array of objects (one row each) or a single object.
pub(super) fn read_document(ctx: &ReadContext, key: &str, data: &[u8]) -> Result<ReadOutput> {
    let mut rows = RowBuilder::new(ctx, key);
    let text = std::str::from_utf8(data).map_err(|e| Error::Read {
        key: key.to_string(),
        message: format!("invalid UTF-8 at byte {}", e.valid_up_to() + 1),
    })?;
    if text.trim().is_empty() {
        return Ok(ReadOutput::default());
    }
    let elements: Vec<&RawValue> = if text.trim_start().starts_with('[') {
        serde_json::from_str(text)
    } else {
        serde_json::from_str::<&RawValue>(text).map(|v| vec![v])
    }
    .map_err(|e| Error::Read {
        key: key.to_string(),
        message: format!("not a JSON document: {e}"),
    })?;
    let mut cells: Vec<Option<Cow<'_, str>>> = Vec::with_capacity(ctx.width());
    for (i, el) in elements.iter().enumerate() {
        let row = i as u64 + 1;
        cells.clear();
        cells.resize(ctx.width(), None);
        match parse_object(ctx, el.get(), &mut cells) {
            Ok(()) => {
                if let Err(reason) = rows.push(|i| cells[i].as_deref(), row) {
                    rows.malformed(row, reason, el.get().as_bytes());
                }
            }
            Err(reason) => rows.malformed(row, reason, el.get().as_bytes()),
        }
    }
    rows.finish().map_err(|message| Error::Read {
        key: key.to_string(),
        message,
    })
}

/// The fast path for the common line: a flat object whose strings have no escapes. Fills
/// `cells` and returns `true`, or returns `false` for anything else (nested values, escapes,
/// bad JSON), which the full parser then reads, with its error messages.
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
            cells[slot] = value.map(Cow::Borrowed);
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
                self.cells[i] = value_text(raw.get()).map_err(serde::de::Error::custom)?;
            }
        }
        Ok(())
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
}
