//! SQL text for external warehouses: splitting a DDL file into statements and `:name`
//! parameters, both outside quotes, comments and dollar-quoted bodies (PL/pgSQL procedures).

use std::collections::BTreeMap;
use std::ops::Range;

/// The byte ranges of `sql` that are code, not string literals, quoted identifiers, comments
/// or dollar-quoted bodies.
fn code_ranges(sql: &str) -> Vec<Range<usize>> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let (mut i, mut start) = (0, 0);
    while i < b.len() {
        let skip_to = match b[i] {
            b'\'' | b'"' => {
                let q = b[i];
                let mut j = i + 1;
                while j < b.len() {
                    if b[j] == q {
                        if b.get(j + 1) == Some(&q) {
                            j += 2;
                            continue;
                        }
                        break;
                    }
                    j += 1;
                }
                Some(j + 1)
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                Some(memchr::memchr(b'\n', &b[i..]).map_or(b.len(), |n| i + n + 1))
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                Some(memchr::memmem::find(&b[i + 2..], b"*/").map_or(b.len(), |n| i + 2 + n + 2))
            }
            b'$' => dollar_tag(&sql[i..]).map(|tag| {
                let body = i + tag.len();
                memchr::memmem::find(&b[body..], tag.as_bytes())
                    .map_or(b.len(), |n| body + n + tag.len())
            }),
            _ => None,
        };
        match skip_to {
            Some(end) => {
                out.push(start..i);
                i = end.min(b.len());
                start = i;
            }
            None => i += 1,
        }
    }
    out.push(start..b.len());
    out.retain(|r| !r.is_empty());
    out
}

/// `$tag$` or `$$` at the start of `s` (not a `$1` placeholder).
fn dollar_tag(s: &str) -> Option<&str> {
    let rest = &s[1..];
    let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))?;
    if rest.as_bytes().get(end) != Some(&b'$')
        || rest[..end].starts_with(|c: char| c.is_ascii_digit())
    {
        return None;
    }
    Some(&s[..end + 2])
}

/// The statements of a SQL file, without the separating semicolons; comment-only parts are
/// dropped.
pub fn split_statements(sql: &str) -> Vec<String> {
    let mut cuts = Vec::new();
    for r in code_ranges(sql) {
        cuts.extend(sql[r.clone()].match_indices(';').map(|(n, _)| r.start + n));
    }
    let mut out = Vec::new();
    let mut start = 0;
    for end in cuts.into_iter().chain([sql.len()]) {
        let stmt = sql[start..end].trim();
        let has_code = code_ranges(stmt)
            .into_iter()
            .any(|r| !stmt[r].trim().is_empty());
        if has_code {
            out.push(stmt.to_string());
        }
        start = (end + 1).min(sql.len());
    }
    out
}

/// The `:name` placeholders of a statement (not `::` casts), each once, with their positions.
fn placeholders(sql: &str) -> Vec<(Range<usize>, String)> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    for r in code_ranges(sql) {
        let mut i = r.start;
        while i < r.end {
            if b[i] == b':'
                && (i == 0 || b[i - 1] != b':')
                && b.get(i + 1)
                    .is_some_and(|c| c.is_ascii_alphabetic() || *c == b'_')
            {
                let mut j = i + 1;
                while j < r.end && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                    j += 1;
                }
                out.push((i..j, sql[i + 1..j].to_string()));
                i = j;
            } else {
                i += 1;
            }
        }
    }
    out
}

/// The names of the parameters a statement uses, sorted, each once.
pub fn parameter_names(sql: &str) -> Vec<String> {
    let mut names: Vec<String> = placeholders(sql).into_iter().map(|(_, n)| n).collect();
    names.sort();
    names.dedup();
    names
}

/// Checks that every parameter the statement uses has a value; the error names the missing one.
pub fn check_parameters(sql: &str, params: &BTreeMap<String, String>) -> Result<(), String> {
    match parameter_names(sql)
        .into_iter()
        .find(|n| !params.contains_key(n))
    {
        Some(missing) => Err(format!(
            "the statement uses :{missing}, which has no value (known: {})",
            params
                .keys()
                .map(|k| format!(":{k}"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        None => Ok(()),
    }
}

/// The statement with each `:name` replaced by its value as a quoted string literal, for
/// servers without named parameters and for DDL, which takes no bind parameters.
pub fn inline(sql: &str, params: &BTreeMap<String, String>) -> Result<String, String> {
    check_parameters(sql, params)?;
    let mut out = String::with_capacity(sql.len());
    let mut last = 0;
    for (range, name) in placeholders(sql) {
        out.push_str(&sql[last..range.start]);
        out.push_str(&quote_literal(&params[&name]));
        last = range.end;
    }
    out.push_str(&sql[last..]);
    Ok(out)
}

/// `'text'` with quotes doubled.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Whether a step names a SQL file rather than holding SQL.
pub fn is_file(step: &str) -> bool {
    step.ends_with(".sql") && !step.contains(char::is_whitespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_outside_quotes_comments_and_bodies() {
        let sql = "CREATE SCHEMA a; -- a comment; with a semicolon\n\
            INSERT INTO t VALUES ('x;y', \"we;ird\");\n\
            /* block; */ CREATE PROCEDURE p() AS $$ BEGIN SELECT 1; END; $$ LANGUAGE plpgsql;\n\
            CREATE FUNCTION f() RETURNS int AS $body$ SELECT 1; $body$ LANGUAGE sql;\n\
            -- trailing comment only\n";
        let s = split_statements(sql);
        assert_eq!(s.len(), 4, "{s:#?}");
        assert_eq!(s[0], "CREATE SCHEMA a");
        assert_eq!(
            s[1],
            "-- a comment; with a semicolon\nINSERT INTO t VALUES ('x;y', \"we;ird\")"
        );
        assert!(s[2].ends_with("END; $$ LANGUAGE plpgsql"), "{}", s[2]);
        assert!(s[3].ends_with("$body$ LANGUAGE sql"), "{}", s[3]);
    }

    #[test]
    fn finds_and_inlines_parameters_but_not_casts_or_strings() {
        let sql = "CALL p(:run_date, ':not_me', x::date, :run_id, :run_date) -- :nor_me";
        assert_eq!(parameter_names(sql), ["run_date", "run_id"]);
        let mut params = BTreeMap::new();
        params.insert("run_date".to_string(), "2026-11-22".to_string());
        let e = inline(sql, &params).unwrap_err();
        assert!(e.contains(":run_id"), "{e}");
        params.insert("run_id".to_string(), "it's".to_string());
        assert_eq!(
            inline(sql, &params).unwrap(),
            "CALL p('2026-11-22', ':not_me', x::date, 'it''s', '2026-11-22') -- :nor_me"
        );
        assert_eq!(parameter_names("SELECT $1, $$:x$$"), Vec::<String>::new());
    }
}
