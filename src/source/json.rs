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
    for (this, raw) in (first_line..).zip(data.split(|b| *b == b'\n')) {
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        if line.iter().all(u8::is_ascii_whitespace) {
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
        match parse_object(ctx, text, &mut cells) {
            Ok(()) => {
                if let Err(reason) = rows.push(&cells, this) {
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
                if let Err(reason) = rows.push(&cells, row) {
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
            if let Some(&i) = self.ctx.index.get(key.as_ref()) {
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
        ReadContext::new(&SourceSchema {
            columns: vec![
                ColumnDef {
                    name: "a".into(),
                    ty: ColumnType::String,
                },
                ColumnDef {
                    name: "n".into(),
                    ty: ColumnType::Int64,
                },
            ],
        })
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
