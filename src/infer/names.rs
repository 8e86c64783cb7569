//! Schema names for the names files give their columns: a name that is not a plain SQL
//! identifier (upper case, spaces, dots, a keyword) becomes snake_case, so that queries need no
//! double quotes; the file's name is kept in `from`.

use std::collections::HashSet;

use datafusion::sql::sqlparser::ast::{Expr, SelectItem, SetExpr, Statement};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;

/// Output columns with a meaning to sluice: a file column is never given one of these names.
const RESERVED: &[&str] = &["_reject_reason", "_duplicate", "_raw_record"];

/// Whether `name` can be written bare in a query and means itself: lower case letters, digits
/// and `_`, not starting with a digit, and parsed by DataFusion's SQL parser as a column in a
/// select list and a condition (so no keyword such as `order` or `from`).
pub fn is_plain(name: &str) -> bool {
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    let ok = |c: char| c == '_' || c.is_ascii_digit() || (c.is_alphabetic() && c.is_lowercase());
    if first.is_ascii_digit() || !ok(first) || !chars.all(ok) {
        return false;
    }
    let sql = format!(
        "SELECT a, {name}, CAST({name} AS DATE) AS d, CASE WHEN {name} IS NULL THEN 'x' END AS r \
         FROM t WHERE {name} > 0"
    );
    let Ok(statements) = Parser::parse_sql(&GenericDialect {}, &sql) else {
        return false;
    };
    let [Statement::Query(q)] = statements.as_slice() else {
        return false;
    };
    let SetExpr::Select(select) = q.body.as_ref() else {
        return false;
    };
    matches!(
        select.projection.get(1),
        Some(SelectItem::UnnamedExpr(Expr::Identifier(id)))
            if id.value == name && id.quote_style.is_none()
    )
}

/// `Customer ID` → `customer_id`, `createdAt` → `created_at`, `HTTPStatus` → `http_status`,
/// `2nd line` → `col_2nd_line`, `order` → `order_`; `None` if nothing is left (`""`, `"--"`).
pub fn snake(raw: &str) -> Option<String> {
    let raw = raw.trim();
    let chars: Vec<char> = raw.chars().collect();
    let mut out = String::new();
    for (i, &ch) in chars.iter().enumerate() {
        if ch.is_alphanumeric() {
            if ch.is_uppercase() && i > 0 {
                let prev = chars[i - 1];
                let next_lower = chars.get(i + 1).is_some_and(|n| n.is_lowercase());
                if prev.is_lowercase()
                    || prev.is_ascii_digit()
                    || (prev.is_uppercase() && next_lower)
                {
                    out.push('_');
                }
            }
            out.extend(ch.to_lowercase());
        } else {
            out.push('_');
        }
    }
    let mut s = String::new();
    for ch in out.chars() {
        if !(ch == '_' && s.ends_with('_')) {
            s.push(ch);
        }
    }
    let mut s = s.trim_matches('_').to_string();
    if s.is_empty() {
        return None;
    }
    if raw.starts_with('_') {
        s.insert(0, '_');
    }
    if s.starts_with(|c: char| c.is_ascii_digit()) {
        s.insert_str(0, "col_");
    }
    if s.starts_with("_source_") || RESERVED.contains(&s.as_str()) {
        s = s.trim_start_matches('_').to_string();
    }
    if !is_plain(&s) {
        s.push('_');
    }
    if !is_plain(&s) {
        s.insert_str(0, "col_");
    }
    Some(s)
}

/// Schema names for a file's column names, in order: a plain name as it is, others snake_cased
/// (empty ones `column_<n>`), made unique with `_2`, `_3`...
pub fn schema_names(file_names: &[String]) -> Vec<String> {
    let mut used = HashSet::new();
    file_names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let base =
                if is_plain(n) && !n.starts_with("_source_") && !RESERVED.contains(&n.as_str()) {
                    n.clone()
                } else {
                    snake(n).unwrap_or_else(|| format!("column_{}", i + 1))
                };
            let mut name = base.clone();
            let mut k = 2;
            while !used.insert(name.clone()) {
                name = format!("{base}_{k}");
                k += 1;
            }
            name
        })
        .collect()
}

/// A sanitized name for a project, table and source (the file's stem): snake_case, `t_` before
/// a leading digit.
pub fn project_name(stem: &str) -> String {
    match snake(stem) {
        None => "sample".into(),
        Some(s) => match s.strip_prefix("col_") {
            Some(rest) if rest.starts_with(|c: char| c.is_ascii_digit()) => format!("t_{rest}"),
            _ => s,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_plain_identifiers() {
        for (raw, want) in [
            ("Customer ID", "customer_id"),
            ("createdAt", "created_at"),
            ("HTTPStatus", "http_status"),
            ("LineId", "line_id"),
            ("user.name", "user_name"),
            ("2nd line", "col_2nd_line"),
            ("e-mail  address", "e_mail_address"),
            ("order", "order_"),
            ("select", "select_"),
            ("from", "from_"),
            ("_Id", "_id"),
            ("_source_file", "source_file"),
            ("größe", "größe"),
        ] {
            assert_eq!(snake(raw).as_deref(), Some(want), "{raw}");
        }
        assert_eq!(snake("--"), None);
        for k in ["order", "from", "select", "user", "group", "limit", "null"] {
            assert!(!is_plain(k), "{k}");
        }
        assert!(
            is_plain("ticket_id") && is_plain("_id") && !is_plain("Ticket") && !is_plain("select")
        );
        assert_eq!(
            schema_names(&["id".into(), "ID".into(), "".into(), "Amount".into()]),
            ["id", "id_2", "column_3", "amount"]
        );
        assert_eq!(project_name("2024-03-01"), "t_2024_03_01");
        assert_eq!(project_name("CRM Export"), "crm_export");
    }
}
